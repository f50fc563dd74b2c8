"""Where one frame's inference time goes: the shipped bundle's stages timed on ACDC validation frames.

The bundle's own objects (``inference.json`` parsed with MONAI's ``ConfigParser``: network, inferer, QC handler)
run each stage of one frame in turn: loading and scaling, the localiser's class probabilities, the pose search,
the latent fit, sampling the written segmentation (with the localiser's blend), quality control, and the Dice
of the written segmentation and of NISF's own labels. Whole ``run inference`` runs, start-up included, are
``cohort_throughput.py``'s. Overrides (``--set key=value``, JSON values) show what a lever saves.

Run: ``python benchmarks/frame_profile.py --frames 2 [--set inference_steps=100]``; prints a table and
writes ``--output`` (JSON). Name the CPU (``lscpu``) beside the numbers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from acdc_common import DATA as ACDC  # noqa: E402
from acdc_common import data_frames, parse_overrides, write_record  # noqa: E402


def validation_frames(count: int) -> list[Path]:
    """The first ``count`` ACDC validation frames' image files."""
    return [ACDC / f["image"] for f in data_frames("validation", ACDC)[:count]]


def bundle(overrides: dict, output_dir: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT / "bundle"), "output_dir": output_dir, **overrides})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), map_location="cpu", weights_only=True))
    network.eval()
    return parser, network


def profile_frame(parser, network, path: Path) -> dict[str, float]:
    from nisf_monai.handlers import case_quality

    inferer = parser.get_parsed_content("inferer")
    preprocessing = parser.get_parsed_content("preprocessing")
    times: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - start
        return result

    item = timed("load and scale", lambda: preprocessing({"image": str(path), "case": path.name}))
    image = item["image"]
    localiser = inferer.heart_locator.localiser
    timed("localiser probabilities", lambda: localiser.coarse_probabilities(image))
    timed("pose search", lambda: inferer.locate([image], network))
    latent = timed("latent fit", lambda: inferer.fit([image], network))
    case = image[None]
    own = torch.empty(case.shape[2:], dtype=torch.uint8)
    labels, recon = timed(
        "written segmentation",
        lambda: inferer.sample(
            network,
            latent,
            inferer.frame_of(case),
            case.affine,
            case.shape[2:],
            blend=inferer.blend_source(case),
            own_labels=own,
        ),
    )
    if parser.get_parsed_content("keep_largest_component"):
        labels = timed("largest components", lambda: largest_components(labels[0]))[None]
    times["dice"] = frame_dice(labels[0, 0].numpy(), path)
    times["code_dice"] = frame_dice(own.numpy(), path)  # NISF's own labels: what planes, meshes and measures read
    label_names = parser.get_parsed_content("label_names")
    sampled = (own, recon[0, 0])  # as the bundle's QC handler reuses them
    timed("quality control", lambda: case_quality(inferer, network, image, latent[0], label_names, None, sampled))
    times["total"] = sum(v for k, v in times.items() if not k.endswith("dice"))
    return times


def largest_components(labels: torch.Tensor) -> torch.Tensor:
    from monai.transforms import KeepLargestConnectedComponent

    return KeepLargestConnectedComponent(applied_labels=[1, 2, 3])(labels)


def frame_dice(labels: np.ndarray, image_path: Path) -> float:
    """Mean Dice of LV, myocardium and RV against the frame's manual labels (ACDC classes mapped to the bundle's)."""
    from qc_calibration import bundle_labels, dice

    return float(np.mean(dice(labels, bundle_labels(Path(str(image_path).replace(".nii.gz", "_gt.nii.gz"))))))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON values)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "frame_profile.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    frames = validation_frames(args.frames)
    with tempfile.TemporaryDirectory() as out:
        config, network = bundle(overrides, out)
        rows = [profile_frame(config, network, frame) for frame in frames]
    stages = list(rows[0])
    median = {stage: float(np.median([row[stage] for row in rows])) for stage in stages if not stage.endswith("dice")}
    result = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "overrides": overrides,
        "frames": [f.name for f in frames],
        "median_s": median,
        "mean_dice": float(np.mean([row["dice"] for row in rows])),
        "mean_code_dice": float(np.mean([row["code_dice"] for row in rows])),
        "per_frame_s": rows,
    }
    print(f"{'stage':26s} {'median s':>9s}")
    for stage, seconds in median.items():
        print(f"{stage:26s} {seconds:9.2f}")
    print(f"{'mean Dice (written)':26s} {result['mean_dice']:9.4f}")
    print(f"{'mean Dice (code alone)':26s} {result['mean_code_dice']:9.4f}")
    write_record(args.output, result)
    return result


if __name__ == "__main__":
    main()
