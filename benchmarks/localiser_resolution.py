"""The Dice ceiling a slice localiser's in-plane spacing leaves on the acquired grid.

The localiser predicts each slice at ``localiser_in_plane_mm`` and its softmax is brought back to the image's own
grid bilinearly (``SliceLocaliser.probabilities``). Even a perfect prediction loses boundary detail on that round
trip. This script sends the manual labels themselves through it: one-hot labels resampled to ``s`` mm in-plane
(``to_in_plane_spacing``, slice spacing kept), back onto the acquired grid (``onto_grid``), argmax,
then MONAI ``DiceMetric`` against the labels (per frame, background excluded). The gap below 1 is what no
localiser at that spacing can win back on its own, however long it trains; the blend with the code (sampled on
the acquired grid) is what can.

    python benchmarks/localiser_resolution.py --part validation --spacings 1.0,1.5,2.0,3.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from acdc import dice_of
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from nisf_monai.classes import STRUCTURES
from nisf_monai.data import build_datalist, load_datalist
from nisf_monai.inferers.slice_localiser import onto_grid, to_in_plane_spacing

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DATA = REPO.parent / "shared" / "data" / "acdc"


def round_trip(label: MetaTensor, spacing_mm: float, num_classes: int) -> torch.Tensor:
    """``label`` (1, X, Y, Z) one-hot, to ``spacing_mm`` in-plane and back to its own grid; the argmax (X, Y, Z)."""
    onehot = F.one_hot(label.as_tensor()[0].long(), num_classes).movedim(-1, 0).float()
    coarse = to_in_plane_spacing(MetaTensor(onehot, affine=label.affine), spacing_mm)
    return onto_grid(coarse, label.affine, label.shape[1:]).argmax(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="validation", choices=["training", "validation", "test"])
    parser.add_argument("--spacings", default="1.0,1.5,2.0,3.0", help="in-plane spacings (mm) to score")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / "results" / "localiser_resolution"))
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"ACDC data not found at {DATA} (see shared/data/README.md)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = ConfigParser()
    config.read_config(str(CONFIGS / "train.json"))
    datalist = build_datalist(str(DATA), str(work / "datalist.json"))
    config.update({"datalist": datalist})
    preprocessing = config.get_parsed_content("validate#preprocessing")
    num_classes = int(config.get_parsed_content("num_classes"))
    spacings = [float(s) for s in args.spacings.split(",")]
    cases = load_datalist(datalist, args.part)
    per_spacing: dict[float, list[np.ndarray]] = {s: [] for s in spacings}
    in_plane = []
    for case in cases:
        label = preprocessing(dict(case))["label"]
        in_plane.append(float(label.pixdim[:2].mean()))
        for spacing in spacings:
            per_spacing[spacing].append(dice_of(round_trip(label, spacing, num_classes), label[0]))
    print(
        f"{len(cases)} {args.part} frames, acquired in-plane spacing {np.median(in_plane):.2f} mm median "
        f"({min(in_plane):.2f}-{max(in_plane):.2f})"
    )
    print("| in-plane mm | " + " | ".join(STRUCTURES) + " | mean | lowest frame |")
    print("|---:|" + "---|" * (len(STRUCTURES) + 2))
    result = {"part": args.part, "frames": len(cases), "in_plane_mm": in_plane, "spacings": {}}
    for spacing, dices in per_spacing.items():
        table = np.nanmean(np.stack(dices), axis=0)
        frame_means = [float(np.nanmean(d)) for d in dices]
        print(
            f"| {spacing:.1f} | "
            + " | ".join(f"{d:.3f}" for d in table)
            + f" | {np.mean(frame_means):.3f} | {min(frame_means):.3f} |"
        )
        result["spacings"][str(spacing)] = {
            "mean_dice": [float(d) for d in table],
            "frame_mean_dice": frame_means,
        }
    (work / f"localiser_resolution_{args.part}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
