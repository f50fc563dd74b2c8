"""Command line of nisf_monai (``nisf-monai COMMAND --help``): the package's tools, and shortcuts to the
bundle's geometry runs (``plane``, ``measure``) that take file paths instead of config overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fire

from nisf_monai.data.builder import build_datalist
from nisf_monai.data.synthetic import generate_cohort
from nisf_monai.errors import MissingFileError, report_input_errors

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def _run_bundle(run_id: str, config: str, bundle_root: str | None, overrides: dict[str, Any]) -> None:
    """``python -m monai.bundle run RUN_ID`` with ``inference.json`` + ``config`` of ``bundle_root``."""
    from monai.bundle import run

    root = Path(bundle_root) if bundle_root else DEFAULT_BUNDLE
    configs = root / "configs"
    if not (configs / "inference.json").is_file():
        raise MissingFileError(f"no bundle at {root} (configs/inference.json missing); pass --bundle_root.")
    logging_file = configs / "logging.conf"
    run(
        run_id,
        config_file=[str(configs / "inference.json"), str(configs / config)],
        bundle_root=str(root),
        logging_file=str(logging_file) if logging_file.is_file() else None,
        **{k: v for k, v in overrides.items() if v is not None},
    )


def _model_overrides(model: str | None) -> dict[str, Any]:
    if model is None:
        return {}
    path = Path(model).resolve()
    if not path.is_file():
        raise MissingFileError(f"{model}: model weights do not exist.")
    # the step count selected with a model lives beside it (models/inference_steps.json)
    return {"ckpt_path": str(path), "ckpt_dir": str(path.parent)}


def plane(
    images: str,
    output_dir: str = "planes",
    reference: str | None = None,
    centre: list[float] | None = None,
    origin: list[float] | None = None,
    u: list[float] | None = None,
    v: list[float] | None = None,
    w: list[float] | None = None,
    spacing: float | list[float] = 1.0,
    size: list[int] | None = None,
    name: str = "plane",
    model: str | None = None,
    bundle_root: str | None = None,
    **overrides: Any,
) -> None:
    """Fit each image's code and write its segmentation and intensity on one plane (or box) as NIfTI with
    the plane's affine, the acquired stack interpolated there, a JSON of the grid and a PNG.

    Args:
        images: a NIfTI image, or a folder of them (``*_gt`` labels skipped).
        output_dir: where the results go.
        reference: a NIfTI whose grid (affine and shape) is the plane, e.g. a long-axis acquisition.
        centre / origin: world position (mm, RAS) of the plane's centre / first voxel.
        u, v, w: in-plane directions and an optional third axis (a box).
        spacing: voxel size in mm (1-3 values); size: voxels along u, v (and w).
        name: suffix of the output files.
        model: weights (default: the bundle's ``models/model.pt``).
        bundle_root: the bundle folder (default: this repository's ``bundle``).
        overrides: any other id of ``inference.json`` / ``plane.json``, e.g. ``--inference_steps 100``.
    """
    from nisf_monai.data import expand_cine_datalist, list_images
    from nisf_monai.data.datalist import case_name

    path = Path(images)
    if path.is_dir():
        datalist = list_images(path)
    elif path.is_file():
        datalist = [{"image": str(path.resolve()), "case": case_name(path)}]
    else:
        raise MissingFileError(f"{images}: no such image or folder.")
    settings = {
        "datalist": expand_cine_datalist(datalist, keep_unreadable=True),
        "output_dir": str(Path(output_dir).resolve()),
        "plane_reference": str(Path(reference).resolve()) if reference else None,
        "plane_centre": centre,
        "plane_origin": origin,
        "plane_u": u,
        "plane_v": v,
        "plane_w": w,
        "plane_spacing": spacing,
        "plane_size": size,
        "plane_name": name,
    }
    _run_bundle("sampling_plane", "plane.json", bundle_root, {**settings, **_model_overrides(model), **overrides})


def measure(
    datalist: str | None = None,
    section: str = "validation",
    output_dir: str = "measures",
    spacing: float | list[float] = 1.0,
    source: str = "nisf",
    mesh_format: str = "vtk",
    model: str | None = None,
    bundle_root: str | None = None,
    **overrides: Any,
) -> None:
    """LV/RV volumes at ED and ES, ejection fractions and LV mass from the continuous segmentation at a fine
    spacing, per-structure surface meshes, and the agreement with manual labels when the datalist has them.

    Args:
        datalist: a MONAI datalist (``nisf-monai datalist`` builds one from an ACDC-style folder); default:
            the bundle's synthetic cohort (generated on first use).
        section: its section to measure (``test`` for an ACDC datalist).
        output_dir: where CSV, JSON, meshes and PNGs go.
        spacing: fine spacing in mm (the largest voxel-nested spacing at or below it is used).
        source: ``nisf`` (fit the model) or ``labels`` (the manual labels through the same path: a check).
        mesh_format: ``vtk``, ``stl`` or ``obj``.
        model: weights (default: the bundle's ``models/model.pt``).
        bundle_root: the bundle folder (default: this repository's ``bundle``).
        overrides: any other id of ``inference.json`` / ``measure.json``, e.g. ``--roi_margin_mm 15``.
    """
    if datalist is not None and not Path(datalist).is_file():
        raise MissingFileError(f"datalist {datalist} does not exist.")
    settings = {
        "section": section,
        "output_dir": str(Path(output_dir).resolve()),
        "measure_spacing": spacing,
        "measure_source": source,
        "mesh_format": mesh_format,
        "datalist_file": str(Path(datalist).resolve()) if datalist else None,
    }
    _run_bundle("measuring", "measure.json", bundle_root, {**settings, **_model_overrides(model), **overrides})


COMMANDS = {"synthetic": generate_cohort, "datalist": build_datalist, "plane": plane, "measure": measure}


def main() -> None:
    report_input_errors()
    fire.Fire(COMMANDS, name="nisf-monai")


if __name__ == "__main__":
    main()
