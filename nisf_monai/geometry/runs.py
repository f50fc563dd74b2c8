"""The bundle's geometry runs: segmentation on any plane (``sampling_plane``) and clinical measures with
surfaces (``measuring``). Both take the network, inferer and preprocessing of ``inference.json``, so a
model is read exactly as inference reads it; ``nisf-monai plane`` / ``nisf-monai measure`` run them too."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from nisf_monai.data.datalist import subject_of_case
from nisf_monai.data.dataset import SKIPPED_KEY, SkippingDataset, report_failed_cases, write_failed_cases
from nisf_monai.errors import InputDataError, MissingFileError, SettingsError
from nisf_monai.geometry.cycle import curve_phases, cycle_extremes, volume_curve, volume_curve_figure
from nisf_monai.geometry.fields import LabelField, NetworkField, measure_frame, structure_meshes
from nisf_monai.geometry.figures import agreement_figure, plane_figure, surface_figure
from nisf_monai.geometry.grids import footprint_grid
from nisf_monai.geometry.measures import (
    MEASURES,
    MYOCARDIAL_DENSITY,
    STRUCTURES,
    agreement_table,
    cardiac_measures,
    class_volumes,
    write_csv,
)
from nisf_monai.geometry.meshes import MESH_FORMATS, write_mesh
from nisf_monai.geometry.planes import grid_centre, plane_grid, reference_grid, resample_image
from nisf_monai.io import atomic_write_json, json_safe, save_nifti
from nisf_monai.spatial import affine_array, voxel_sizes, voxel_volume_ml
from nisf_monai.transforms.coordinates import CINE_COORD_DIM, phase_of
from nisf_monai.transforms.heart_frame import split_pose

__all__ = ["MeasureRun", "PlaneRun", "load_weights"]

logger = logging.getLogger("nisf_monai")


def load_weights(network: nn.Module, path: str | os.PathLike | None, device: Any = None) -> nn.Module:
    """Load a plain ``state_dict`` (``model.pt``) or ``{"model": state_dict}`` into ``network``; eval mode."""
    if path is not None:
        if not os.path.isfile(path):
            raise MissingFileError(f"{path}: model weights do not exist (train the bundle, or pass the model's path).")
        state = torch.load(str(path), map_location=device or "cpu", weights_only=True)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        try:
            if not isinstance(state, Mapping):
                raise TypeError(f"expected a state_dict, found {type(state).__name__}")
            network.load_state_dict(state)
        except (RuntimeError, TypeError) as error:
            raise SettingsError(
                "ckpt_path",
                f"the weights in {path} do not fit this network ({str(error).splitlines()[0]})",
                "pass a model.pt written by the bundle's training, with the latent_dim, hidden_dim, num_layers and"
                " activation it was trained with",
            ) from error
    return network.eval()


def _cases(
    datalist: Sequence[Mapping[str, Any]], preprocessing: Callable, failed: list[tuple[str, str]] | None = None
) -> list[tuple[dict, dict]]:
    """(entry, loaded case) pairs; cases with bad files are logged and left out (``SkippingDataset``), and their
    ``(source, reason)`` appended to ``failed``."""
    dataset = SkippingDataset(data=[dict(e) for e in datalist], transform=preprocessing)
    out = []
    for i, entry in enumerate(dataset.data):
        item = dataset[i]
        if SKIPPED_KEY in item:
            if failed is not None:
                failed.append((item["source"], item[SKIPPED_KEY]))
            continue
        out.append((entry, item))
    return out


def _name(entry: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    if "case" in entry:
        return str(entry["case"])
    from nisf_monai.data.datalist import case_name

    return case_name(str(item["image"].meta.get("filename_or_obj", "case")))


def _log_measures(subject: str, m: Mapping[str, float], seconds: float) -> None:
    logger.info(
        "%s: LV EDV %.1f ml, ESV %.1f ml, EF %.1f %%; RV EDV %.1f ml, EF %.1f %%; LV mass %.1f g (%.0f s)",
        subject,
        m["lv_edv_ml"],
        m["lv_esv_ml"],
        m["lv_ef_pct"],
        m["rv_edv_ml"],
        m["rv_ef_pct"],
        m["lv_mass_g"],
        seconds,
    )


class _FittedRun:
    """What both runs share: a network (weights loaded from ``ckpt_path`` when given), the inferer that fits
    each image's code, the preprocessing and the cases, and where to write."""

    def __init__(
        self,
        network: nn.Module,
        inferer: Any,
        preprocessing: Callable,
        datalist: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        ckpt_path: str | os.PathLike | None = None,
        device: Any = None,
    ) -> None:
        self.network, self.inferer, self.preprocessing = network, inferer, preprocessing
        self.datalist = list(datalist)
        self.output_dir = Path(output_dir)
        self.ckpt_path = ckpt_path
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.failed: list[tuple[str, str]] = []  # (source, reason) of the cases of the last run that failed

    def _prepare_network(self) -> None:
        load_weights(self.network, self.ckpt_path, self.device)
        self.network.to(self.device)

    def _load_cases(self) -> list[tuple[dict, dict]]:
        self.failed = []
        return _cases(self.datalist, self.preprocessing, self.failed)

    def _account_for_failures(self, num_done: int) -> None:
        """List the failed cases in ``output_dir/failed_cases.txt`` and end the run with how many there were,
        or raise ``NoUsableCaseError`` if no case could be used."""
        listed_in = write_failed_cases(self.output_dir, self.failed)
        report_failed_cases(self.failed, num_done, listed_in)


class MeasureRun(_FittedRun):
    """Per subject: fit a code to each frame (ED and ES), read the segmentation at ``spacing`` mm over the
    stack's slab, and write LV/RV volumes, ejection fractions and LV mass, a surface mesh per structure
    and frame, and, where the datalist has manual labels, the same measures from them (disc sums on the
    acquired grid) with their agreement (MAE, bias, limits of agreement, Pearson r) and figures.

    Frames are grouped by the datalist's ``subject``; ED and ES come from ``phase`` entries when present,
    else ED is the frame with the largest and ES the one with the smallest LV blood pool (manual labels
    if every frame has one, else NISF's), the clinical definition.

    With a cine network (``coord_dim=5``) a subject's frames get one code, fitted to all of them, and that code is
    also read at ``curve_phases`` evenly spread phases of the cycle (at ``curve_spacing`` mm, over the box around the
    heart of its earliest frame): the LV and RV volume
    curves (``volume_curves.csv``, ``figures/<subject>_volume_curve.png``). When the datalist does not name ED and
    ES, they are the phases of the curve's largest and smallest LV blood pool, read again at ``spacing``, so they
    may fall between the acquired frames.

    Outputs in ``output_dir``: ``measures.csv`` (one row per subject and source), ``volumes.csv`` (per
    frame), ``agreement.csv``, ``measures.json`` (all of it and the settings), ``meshes/<case>_<structure>.<fmt>``,
    ``segmentations/<case>_fine_seg.nii.gz`` (the fine labels over the region read), and
    ``figures/{bland_altman,scatter,<subject>_surfaces}.png``; with a cine network also ``volume_curves.csv``
    (one row per subject and phase) and ``figures/<subject>_volume_curve.png``.

    Args:
        network, inferer, preprocessing, datalist: as in ``inference.json`` (entries with ``image`` and
            optionally ``label``, ``subject``, ``phase``).
        output_dir: where everything goes.
        ckpt_path: weights to load (None: the network is used as it is).
        device: where the network runs.
        spacing: fine spacing in mm (one value or three).
        roi_margin_mm: margin around the coarse foreground read finely (None: the whole slab).
        roi_spacing: spacing of that coarse pass (mm).
        volume_mode: ``"label"`` (argmax voxel counts) or ``"probability"`` (summed probabilities).
        source: ``"nisf"`` (the network) or ``"labels"`` (the manual labels through the same fine-grid path:
            a check of the pipeline, which must reproduce the disc sums).
        mesh_format: ``vtk``, ``stl``, ``obj`` or None (no meshes).
        blend: read the segmentation the inference run writes, the localiser's probabilities mixed into the
            network's by the inferer's ``output_blend``, instead of the code alone (needs a localiser).
        save_segmentations: write the fine label maps.
        max_surface_figures: subjects that get a surface figure.
        curve_phases: phases of a cine code's volume curve (0: no curve).
        curve_spacing: spacing (mm) the curve is read at.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: Any,
        preprocessing: Callable,
        datalist: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        ckpt_path: str | os.PathLike | None = None,
        device: Any = None,
        spacing: float | Sequence[float] = 1.0,
        roi_margin_mm: float | None = 10.0,
        roi_spacing: float = 4.0,
        volume_mode: str = "label",
        source: str = "nisf",
        mesh_format: str | None = "vtk",
        blend: bool = False,
        save_segmentations: bool = True,
        max_surface_figures: int = 4,
        curve_phases: int = 20,
        curve_spacing: float | Sequence[float] = 3.0,
    ) -> None:
        if source not in ("nisf", "labels"):
            raise ValueError(f"source must be 'nisf' or 'labels', got {source!r}.")
        if mesh_format is not None and mesh_format not in MESH_FORMATS:
            raise ValueError(f"mesh_format must be one of {MESH_FORMATS} or None, got {mesh_format!r}.")
        super().__init__(network, inferer, preprocessing, datalist, output_dir, ckpt_path, device)
        self.spacing = spacing
        self.roi_margin_mm = roi_margin_mm
        self.roi_spacing = roi_spacing
        self.volume_mode = volume_mode
        self.source = source
        self.mesh_format = mesh_format
        self.blend = bool(blend)
        self.save_segmentations = save_segmentations
        self.max_surface_figures = max_surface_figures
        if curve_phases == 1:
            raise SettingsError("curve_phases", "1 phase is no curve", "give 0 for no curve, or 2 or more phases")
        self.curve_phases = int(curve_phases)
        self.curve_spacing = curve_spacing
        self._curve_rows: list[dict] = []

    @property
    def _cine(self) -> bool:
        """Whether the run reads a cine code (one per subject, any phase)."""
        return self.source == "nisf" and int(getattr(self.network, "coord_dim", 3)) == CINE_COORD_DIM

    def _fields(self, items: list[dict], subject: str = "") -> list[Any]:
        if self.source == "labels":
            missing = [i for i, item in enumerate(items) if "label" not in item]
            if missing:
                raise InputDataError("source 'labels' needs a label for every frame of the datalist.")
            return [
                LabelField(np.asarray(item["label"])[0], affine_array(item["image"]), int(self.network.num_classes))
                for item in items
            ]
        images = [item["image"].to(self.device) for item in items]
        latents = self.inferer.fit(images, self.network, groups=[subject] * len(images) if self._cine else None)
        fields = []
        for image, latent in zip(images, latents):
            case = image[None]
            blend = self.inferer.blend_source(case) if self.blend else None
            if self.blend and blend is None:
                logger.warning("measure_blend is set but nothing is blended: the measures read the code alone.")
            fields.append(NetworkField(self.network, self.inferer, latent, self.inferer.frame_of(case), blend))
        return fields

    def run(self) -> dict[str, Any]:
        self._prepare_network()
        self._curve_rows = []
        subjects = self._subjects()
        frames_rows: list[dict] = []
        measures: dict[str, dict[str, dict[str, float]]] = {self.source: {}, "manual": {}}
        subject_info: dict[str, dict] = {}
        figures = 0
        for subject, cases in sorted(subjects.items()):
            start = time.perf_counter()
            entries, items = [c[0] for c in cases], [c[1] for c in cases]
            names = [_name(e, i) for e, i in cases]
            measured, manual, meshes = [], [], []
            fields = self._fields(items, subject)
            for name, entry, item, source in zip(names, entries, items, fields):
                volumes, manual_volumes, figure_meshes, rows = self._measure_frame(subject, name, entry, item, source)
                measured.append(volumes)
                meshes.append(figure_meshes)
                frames_rows.extend(rows)
                if manual_volumes is not None:
                    manual.append(manual_volumes)
            ed, es, rule = self._phases(entries, measured, manual if len(manual) == len(items) else None)
            ed_volumes, es_volumes = measured[ed], measured[es] if es is not None else None
            info = {"ed_case": names[ed], "es_case": names[es] if es is not None else None}
            if self._cine and self.curve_phases:
                complete = manual if len(manual) == len(items) else None
                named = (ed, es) if rule == "datalist phase" else None
                cycle = self._cycle(subject, items, fields, measured, complete, named)
                info.update({"ed_phase": cycle["ed_phase"], "es_phase": cycle["es_phase"]})
                if rule != "datalist phase":  # the cycle's extremes, between the acquired frames if need be
                    ed_volumes, es_volumes = cycle["ed_volumes"], cycle["es_volumes"]
                    rule = f"largest / smallest LV blood pool of the code over {self.curve_phases} phases"
                    info.update(
                        {"ed_case": f"phase {cycle['ed_phase']:.3f}", "es_case": f"phase {cycle['es_phase']:.3f}"}
                    )
            measures[self.source][subject] = cardiac_measures(ed_volumes, es_volumes)
            if len(manual) == len(items):
                measures["manual"][subject] = cardiac_measures(manual[ed], manual[es] if es is not None else None)
            subject_info[subject] = {**info, "phase_rule": rule, "seconds": time.perf_counter() - start}
            _log_measures(subject, measures[self.source][subject], subject_info[subject]["seconds"])
            if figures < self.max_surface_figures and meshes[ed]:
                surface_figure(
                    self.output_dir / "figures" / f"{subject}_surfaces.png", meshes[ed], f"{subject} {names[ed]} (ED)"
                )
                figures += 1
        report = self._write(measures, frames_rows, subject_info)
        self._account_for_failures(sum(len(cases) for cases in subjects.values()))
        return report

    def _cycle(
        self,
        subject: str,
        items: list[dict],
        fields: list[Any],
        measured: list[dict],
        manual: list[dict] | None,
        named: tuple[int, int | None] | None,
    ) -> dict[str, Any]:
        """A cine code's volume curve over the cycle (kept for ``volume_curves.csv``, drawn per subject) and its ED and
        ES phases: those of the frames the datalist ``named`` (their indices), else the curve's extremes, then read
        again at the run's fine spacing."""
        phases = [phase_of(item["image"]) or 0.0 for item in items]
        reference = int(np.argmin(phases))
        image = items[reference]["image"]
        affine, shape = affine_array(image), list(image.shape[1:])
        base = fields[reference]

        def field_at(phase: float) -> NetworkField:
            return NetworkField(self.network, self.inferer, base.latent, base.frame.with_phase(phase))

        curve = volume_curve(
            field_at,
            curve_phases(self.curve_phases),
            affine,
            shape,
            self.curve_spacing,
            self.roi_margin_mm,
            roi_phase=phases[reference],
            roi_spacing=self.roi_spacing,
            mode=self.volume_mode,
            heart_centre_mm=None if base.frame.pose is None else split_pose(base.frame.pose)[0].numpy(),
        )
        self._curve_rows.extend(curve.rows(subject))
        fine = {}
        if named is not None:
            ed_phase, es_phase = phases[named[0]], phases[named[1]] if named[1] is not None else None
        else:
            ed_phase, es_phase = cycle_extremes(curve)
            fine = {
                phase: measure_frame(
                    field_at(phase), affine, shape, self.spacing, self.roi_margin_mm, self.roi_spacing, self.volume_mode
                ).volumes
                for phase in (ed_phase, es_phase)
            }
        volume_curve_figure(
            self.output_dir / "figures" / f"{subject}_volume_curve.png",
            curve,
            f"{subject}: ED at phase {ed_phase:.2f}, ES at {es_phase:.2f}" if es_phase is not None else subject,
            acquired=dict(zip(phases, measured)),
            manual=dict(zip(phases, manual)) if manual else None,
            ed_es=(ed_phase, es_phase) if es_phase is not None else None,
        )
        return {
            "ed_phase": ed_phase,
            "es_phase": es_phase,
            "ed_volumes": fine.get(ed_phase),
            "es_volumes": fine.get(es_phase),
        }

    def _subjects(self) -> dict[str, list[tuple[dict, dict]]]:
        """The loaded cases, grouped by the datalist's ``subject`` (a case without one is its own subject)."""
        subjects: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
        for entry, item in self._load_cases():
            subjects[str(entry.get("subject", _name(entry, item)))].append((entry, item))
        if not subjects:
            self._account_for_failures(0)  # raises when cases failed
            raise InputDataError("no case could be loaded for measuring: the datalist is empty.")
        return subjects

    def _measure_frame(
        self, subject: str, name: str, entry: Mapping[str, Any], item: Mapping[str, Any], source: Any
    ) -> tuple[dict[str, float], dict[str, float] | None, dict, list[dict]]:
        """One frame read at the fine spacing from ``source``: its volumes, the manual labels' volumes (None
        without a label), the light meshes for a figure and its rows of ``volumes.csv``. Writes its meshes and
        fine segmentation."""
        image = item["image"]
        affine, shape = affine_array(image), list(image.shape[1:])
        result = measure_frame(
            source, affine, shape, self.spacing, self.roi_margin_mm, self.roi_spacing, self.volume_mode
        )
        row = {
            "subject": subject,
            "case": name,
            "phase": entry.get("phase", ""),
            "source": self.source,
            **{f"{k}_ml": v for k, v in result.volumes.items()},
            "spacing_mm": "x".join(f"{s:.3g}" for s in result.spacing),
            "roi_shape": "x".join(map(str, result.roi_shape)),
        }
        figure_meshes = {}
        if result.probabilities is not None:
            row.update(self._write_surfaces(name, result))
            if self.save_segmentations:
                labels = result.probabilities.argmax(axis=0).astype(np.uint8)
                save_nifti(labels, result.affine, self.output_dir / "segmentations" / f"{name}_fine_seg.nii.gz")
            figure_meshes = self._figure_meshes(result)
        rows, manual = [row], None
        if "label" in item:
            label = np.asarray(torch.as_tensor(item["label"]).cpu())[0]
            manual = class_volumes(label, voxel_volume_ml(affine))
            rows.append(
                {
                    "subject": subject,
                    "case": name,
                    "phase": entry.get("phase", ""),
                    "source": "manual",
                    **{f"{k}_ml": v for k, v in manual.items()},
                    "spacing_mm": "x".join(f"{s:.3g}" for s in voxel_sizes(affine)),
                    "roi_shape": "x".join(map(str, shape)),
                }
            )
        return result.volumes, manual, figure_meshes, rows

    def _write_surfaces(self, name: str, result: Any) -> dict[str, float]:
        """Each structure's surface (written when ``mesh_format`` is set) and its enclosed volume and area."""
        stats = {}
        for structure, mesh in structure_meshes(result.probabilities, result.affine).items():
            stats[f"{structure}_mesh_ml"] = mesh.volume / 1000.0
            stats[f"{structure}_area_cm2"] = mesh.area / 100.0
            if self.mesh_format and len(mesh):
                path = self.output_dir / "meshes" / f"{name}_{structure}.{self.mesh_format}"
                write_mesh(path, mesh, f"{name} {structure}")
        return stats

    @staticmethod
    def _figure_meshes(result: Any, spacing_mm: float = 2.0) -> dict:
        """Surfaces on a grid of about 2 mm (every k-th fine voxel), light enough to draw."""
        step = max(1, int(round(spacing_mm / min(result.spacing))))
        affine = result.affine.copy()
        affine[:3, :3] = affine[:3, :3] * step
        return structure_meshes(result.probabilities[:, ::step, ::step, ::step], affine)

    @staticmethod
    def _phases(entries: list[dict], measured: list[dict], manual: list[dict] | None) -> tuple[int, int | None, str]:
        phases = [str(e.get("phase", "")).upper() for e in entries]
        if "ED" in phases and "ES" in phases:
            return phases.index("ED"), phases.index("ES"), "datalist phase"
        if len(entries) == 1:
            return 0, None, "single frame (no ES)"
        volumes = manual if manual is not None else measured
        lv = [v["lv_blood_pool"] for v in volumes]
        which = "manual" if manual is not None else "measured"
        return int(np.argmax(lv)), int(np.argmin(lv)), f"largest / smallest {which} LV blood pool"

    def _write(self, measures: dict, frames_rows: list[dict], subject_info: dict) -> dict[str, Any]:
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for source, by_subject in measures.items():
            for subject, values in by_subject.items():
                rows.append(
                    {
                        "subject": subject,
                        "source": source,
                        "ed_case": subject_info[subject]["ed_case"],
                        "es_case": subject_info[subject]["es_case"] or "",
                        **values,
                    }
                )
        rows.sort(key=lambda r: (r["subject"], r["source"] != self.source))
        write_csv(out / "measures.csv", rows)
        write_csv(out / "volumes.csv", frames_rows)
        if self._curve_rows:
            write_csv(out / "volume_curves.csv", self._curve_rows)
        agreement = {}
        if measures["manual"]:
            agreement = agreement_table(measures[self.source], measures["manual"])
            write_csv(out / "agreement.csv", [{"measure": m, **stats} for m, stats in agreement.items()])
            label = "NISF" if self.source == "nisf" else "labels (fine grid)"
            shown = [m for m in MEASURES if not m.endswith("_sv_ml")]
            agreement_figure(
                out / "figures" / "bland_altman.png",
                measures[self.source],
                measures["manual"],
                shown,
                "bland_altman",
                f"{label} vs manual, {len(measures['manual'])} subjects",
                (label, "manual"),
            )
            agreement_figure(
                out / "figures" / "scatter.png",
                measures[self.source],
                measures["manual"],
                shown,
                "scatter",
                f"{label} vs manual, {len(measures['manual'])} subjects",
                (label, "manual"),
            )
        spacing = np.asarray(self.spacing, dtype=float).ravel().tolist()
        report = {
            "settings": {
                "source": self.source,
                "spacing_mm": spacing,
                "roi_margin_mm": self.roi_margin_mm,
                "roi_spacing_mm": self.roi_spacing,
                "volume_mode": self.volume_mode,
                "blend": self.blend,
                "curve_phases": self.curve_phases if self._cine else 0,
                "curve_spacing_mm": np.asarray(self.curve_spacing, dtype=float).ravel().tolist(),
                "myocardial_density_g_per_ml": MYOCARDIAL_DENSITY,
                "inference_steps": getattr(self.inferer, "num_steps", None),
                "ckpt_path": str(self.ckpt_path) if self.ckpt_path else None,
            },
            "measures": measures,
            "subjects": subject_info,
            "frames": frames_rows,
            "agreement": agreement,
        }
        atomic_write_json(out / "measures.json", json_safe(report))
        logger.info("measures of %d subject(s) written to %s", len(subject_info), out)
        return report


class PlaneRun(_FittedRun):
    """Per image: fit its code, then read the segmentation and intensity on one plane (or box) in world
    space, and write them as NIfTI with the plane's affine (``<case>_<name>_seg.nii.gz``, ``_recon``, and
    ``_input``: the acquired image interpolated trilinearly onto the same plane), the grid as JSON, and a
    PNG comparing the interpolated stack, NISF's intensity and NISF's segmentation (with the reference
    image when one is given).

    The plane is, in order of precedence: the grid of a ``reference`` NIfTI (e.g. a long-axis acquisition
    of the same scan session); or ``u``, ``v`` (and ``w``), ``spacing``, ``size`` and ``origin`` or
    ``centre`` in world mm. Whatever is not given defaults to: ``u`` along the image's first axis, ``v``
    along its slice axis (a plane across the short-axis slices), ``centre`` at the centroid of NISF's LV
    blood pool (read coarsely; the image centre if there is none), 1 mm spacing and a size that spans the
    image.

    With a cine network the frames of a subject share one code (fitted to all of them), and ``phase`` (in [0, 1))
    reads the subject's plane once at that point of the cycle, acquired or not (``<subject>_phase0.400_<name>``);
    None reads every frame at its own phase.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: Any,
        preprocessing: Callable,
        datalist: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        ckpt_path: str | os.PathLike | None = None,
        device: Any = None,
        reference: str | None = None,
        origin: Sequence[float] | None = None,
        centre: Sequence[float] | None = None,
        u: Sequence[float] | None = None,
        v: Sequence[float] | None = None,
        w: Sequence[float] | None = None,
        spacing: float | Sequence[float] = 1.0,
        size: Sequence[int] | None = None,
        name: str = "plane",
        phase: float | None = None,
    ) -> None:
        if origin is not None and centre is not None:
            raise InputDataError("give the plane's origin or its centre, not both.")
        if phase is not None and not 0.0 <= float(phase) < 1.0:
            raise SettingsError(
                "plane_phase", f"{phase} is not a phase of the cycle", "give a value in [0, 1), or None"
            )
        self.phase = None if phase is None else float(phase)
        super().__init__(network, inferer, preprocessing, datalist, output_dir, ckpt_path, device)
        self.reference = reference
        self.origin, self.centre, self.u, self.v, self.w = origin, centre, u, v, w
        self.spacing, self.size, self.name = spacing, size, name
        # fail early, before any fitting, on a bad reference file or plane
        if reference is not None:
            reference_grid(reference)
        elif u is not None and v is not None:
            plane_grid(u, v, spacing, size if size is not None else [1, 1], centre=[0.0, 0.0, 0.0], w=w)

    def grid(
        self, field: NetworkField, image_affine: np.ndarray, image_shape: Sequence[int]
    ) -> tuple[np.ndarray, list[int]]:
        """The plane's affine and shape for one image (see the class docstring for the defaults)."""
        if self.reference is not None:
            return reference_grid(self.reference)
        axes = image_affine[:3, :3] / voxel_sizes(image_affine)[None, :]
        u = self.u if self.u is not None else axes[:, 0]
        v = self.v if self.v is not None else axes[:, 2]
        centre, origin = self.centre, self.origin
        if centre is None and origin is None:
            centre = self._lv_centre(field, image_affine, image_shape)
        size = self.size
        if size is None:
            size = self._spanning_size(u, v, image_affine, image_shape)
        return plane_grid(u, v, self.spacing, size, origin=origin, centre=centre, w=self.w)

    def _lv_centre(self, field: NetworkField, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        coarse_affine, coarse_shape = footprint_grid(affine, shape, 4.0)
        probs, _ = field.sample(coarse_affine, coarse_shape)
        index = np.argwhere(probs.argmax(axis=0) == STRUCTURES["lv_blood_pool"])
        if len(index) == 0:
            return grid_centre(affine, shape)
        return coarse_affine[:3, :3] @ index.mean(axis=0) + coarse_affine[:3, 3]

    def _spanning_size(self, u: Any, v: Any, affine: np.ndarray, shape: Sequence[int]) -> list[int]:
        """Voxels along u and v that span the image's footprint seen along each direction."""
        corners = np.array(
            [[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)]
        )
        world = corners @ affine[:3, :3].T
        steps = np.asarray(self.spacing, dtype=float).ravel()
        steps = np.repeat(steps, 2) if steps.size == 1 else steps
        sizes = []
        for direction, step in zip((u, v), steps[:2]):
            d = np.asarray(direction, dtype=float) / np.linalg.norm(direction)
            extent = np.ptp(world @ d)
            sizes.append(max(1, int(math.ceil(extent / step))))
        return sizes

    def _reference_slice(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
        """The reference image's voxels on its own grid (middle slice, first frame) for the figure."""
        if self.reference is None:
            return None
        data = np.asarray(nib.load(self.reference).dataobj, dtype=np.float32)
        while data.ndim > 3:
            data = data[..., 0]
        data = data.reshape([int(s) for s in shape])
        return data[:, :, shape[2] // 2]

    def _fitted(self) -> list[tuple[str, MetaTensor, NetworkField]]:
        """(name, image, field) per plane to read: each case with its own code, or, for a cine network, the frames
        of a subject with their shared code, each at its own phase or all read once at ``phase``."""
        cases = self._load_cases()
        if int(getattr(self.network, "coord_dim", 3)) != CINE_COORD_DIM:
            groups = [[case] for case in cases]
        else:
            by_subject: dict[str, list] = defaultdict(list)
            for entry, item in cases:
                by_subject[str(entry.get("subject", _name(entry, item)))].append((entry, item))
            groups = list(by_subject.values())
        planes = []
        for group in groups:
            images = [item["image"].to(self.device) for _, item in group]
            latents = self.inferer.fit(images, self.network, groups=[0] * len(images))
            for (entry, item), image, latent in zip(group, images, latents):
                mapping = self.inferer.frame_of(image[None])
                name = _name(entry, item)
                if self.phase is not None:
                    mapping = mapping.with_phase(self.phase)
                    name = f"{entry.get('subject', subject_of_case(name))}_phase{self.phase:.3f}"
                planes.append((name, image, NetworkField(self.network, self.inferer, latent, mapping)))
                if self.phase is not None:
                    break  # one plane per subject at the asked phase
        return planes

    def run(self) -> list[dict[str, Any]]:
        self._prepare_network()
        written = []
        for name, image, field in self._fitted():
            image_affine = affine_array(image)
            affine, shape = self.grid(field, image_affine, list(image.shape[1:]))
            probs, intensity = field.sample(affine, shape)
            labels = probs.argmax(axis=0).astype(np.uint8)
            acquired = resample_image(np.asarray(image.cpu())[0], image_affine, affine, shape)
            stem = self.output_dir / f"{name}_{self.name}"
            paths = {
                "seg": save_nifti(labels, affine, f"{stem}_seg.nii.gz"),
                "recon": save_nifti(intensity.astype(np.float32), affine, f"{stem}_recon.nii.gz"),
                "input": save_nifti(acquired, affine, f"{stem}_input.nii.gz"),
            }
            k = shape[2] // 2
            panels = [
                ("acquired stack, interpolated", acquired[:, :, k], None),
                ("NISF intensity", intensity[:, :, k], None),
                ("NISF segmentation", intensity[:, :, k], labels[:, :, k]),
            ]
            reference = self._reference_slice(affine, shape)
            if reference is not None:
                panels.insert(0, ("reference image", reference, None))
                panels.append(("NISF segmentation on reference", reference, labels[:, :, k]))
            paths["png"] = plane_figure(f"{stem}.png", panels, voxel_sizes(affine)[:2], f"{name}: {self.name}")
            info = {
                "case": name,
                "affine": affine,
                "shape": shape,
                "spacing_mm": voxel_sizes(affine),
                "centre_mm": grid_centre(affine, shape),
                "reference": self.reference,
                "files": paths,
                "label_voxels": {n: int((labels == c).sum()) for n, c in STRUCTURES.items()},
            }
            atomic_write_json(f"{stem}.json", json_safe(info))
            logger.info("%s: %s %s written to %s", name, self.name, "x".join(map(str, shape)), stem.parent)
            written.append(info)
        self._account_for_failures(len(written))
        return written
