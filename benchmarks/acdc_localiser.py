"""The heart localiser alone (``acdc.py localiser``), with no code fitted.

``pose``: how far the pose from the localiser's coarse labels lands from the labels' pose, with and without keeping
each class's largest connected component before the centroids (``SliceLocaliser(largest_component=...)``), and how
far the scale its LV volume gives (``heart_reference_volume_ml``) lands from the labels' scale.

``resolution``: the Dice ceiling a localiser's in-plane spacing leaves on the acquired grid. The manual labels go
through the localiser's round trip (one-hot, to ``s`` mm in-plane with ``to_in_plane_spacing``, back with
``onto_grid``, argmax) and are scored against themselves: what no localiser at that spacing can win back alone.

    python benchmarks/acdc.py localiser pose --localiser \
        benchmarks/results/acdc_levers/localiser_split_v5_unet5l160/models/localiser.pt
    python benchmarks/acdc.py localiser resolution --part validation --spacings 1.0,1.4,2.0,3.0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from acdc_common import CONFIGS, RESULTS, acdc_datalist, add_options, dice_of, frames_of, require_data, write_record
from acdc_fit import pose_error, scale_error
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from nisf_monai.classes import STRUCTURES
from nisf_monai.data import expand_cine_datalist
from nisf_monai.inferers import load_localiser
from nisf_monai.inferers.slice_localiser import onto_grid, to_in_plane_spacing
from nisf_monai.transforms import heart_pose

WORK = RESULTS / "acdc_levers"


def _validation_transforms(datalist: str) -> ConfigParser:
    """``train.json`` on ``datalist``: its validation preprocessing is how the localiser sees a frame."""
    config = ConfigParser()
    config.read_config(str(CONFIGS / "train.json"))
    config.update({"datalist": datalist})
    return config


def pose(args: argparse.Namespace) -> dict:
    datalist = acdc_datalist(WORK, data=args.data)
    preprocessing = _validation_transforms(datalist).get_parsed_content("validate#preprocessing")
    cases = expand_cine_datalist(frames_of(datalist, "validation"))[: args.frames or None]
    reference_ml = 250.0  # any value: only the ratio of the two scales is compared
    localiser = load_localiser(args.localiser, reference_volume_ml=reference_ml)
    errors: dict[str, list[tuple[float, float, float]]] = {"as predicted": [], "largest components": []}
    for case in cases:
        data = preprocessing(dict(case))
        truth = heart_pose(data["label"].as_tensor(), data["label"].affine, reference_volume_ml=reference_ml).numpy()
        for name, largest in (("as predicted", False), ("largest components", True)):
            localiser.largest_component = largest
            found = localiser.pose(data["image"]).numpy()
            errors[name].append((*pose_error(found, truth), scale_error(found, truth)))
    print(f"{len(cases)} validation frames; origin (mm), angle (deg) and scale (%) errors, median / max")
    summary = {}
    for name, rows in errors.items():
        values = np.asarray(rows)
        summary[name] = {
            "origin_mm": values[:, 0].tolist(),
            "angle_deg": values[:, 1].tolist(),
            "median_origin_mm": float(np.median(values[:, 0])),
            "max_origin_mm": float(values[:, 0].max()),
            "median_angle_deg": float(np.median(values[:, 1])),
            "max_angle_deg": float(values[:, 1].max()),
            "scale_percent": values[:, 2].tolist(),
            "median_scale_percent": float(np.median(values[:, 2])),
            "max_scale_percent": float(values[:, 2].max()),
        }
        s = summary[name]
        print(
            f"{name:<20} origin {s['median_origin_mm']:5.1f} / {s['max_origin_mm']:5.1f}  "
            f"angle {s['median_angle_deg']:5.1f} / {s['max_angle_deg']:5.1f}  "
            f"scale {s['median_scale_percent']:5.1f} / {s['max_scale_percent']:5.1f}"
        )
    output = Path(args.output) if args.output else Path(args.localiser).parent.parent / "localiser_pose.json"
    print(f"written {write_record(output, {'localiser': str(args.localiser), 'frames': len(cases), **summary})}")
    return summary


def round_trip(label: MetaTensor, spacing_mm: float, num_classes: int) -> torch.Tensor:
    """``label`` (1, X, Y, Z) one-hot, to ``spacing_mm`` in-plane and back to its own grid; the argmax (X, Y, Z)."""
    onehot = F.one_hot(label.as_tensor()[0].long(), num_classes).movedim(-1, 0).float()
    coarse = to_in_plane_spacing(MetaTensor(onehot, affine=label.affine), spacing_mm)
    return onto_grid(coarse, label.affine, label.shape[1:]).argmax(0)


def resolution(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    config = _validation_transforms(acdc_datalist(work, data=args.data))
    preprocessing = config.get_parsed_content("validate#preprocessing")
    num_classes = int(config.get_parsed_content("num_classes"))
    spacings = [float(s) for s in args.spacings.split(",")]
    cases = frames_of(config["datalist"], args.part, args.frames, args.offset)
    per_spacing: dict[float, list[np.ndarray]] = {s: [] for s in spacings}
    in_plane = []
    for case in cases:
        label = preprocessing(dict(case))["label"]
        in_plane.append(float(label.pixdim[:2].mean()))
        for spacing in spacings:
            per_spacing[spacing].append(dice_of(round_trip(label, spacing, num_classes), label[0]))
    print(f"{len(cases)} {args.part} frames, acquired in-plane spacing {np.median(in_plane):.2f} mm median")
    print("| in-plane mm | " + " | ".join(STRUCTURES) + " | mean | lowest frame |")
    result: dict = {"part": args.part, "frames": len(cases), "in_plane_mm": in_plane, "spacings": {}}
    for spacing, dices in per_spacing.items():
        table = np.nanmean(np.stack(dices), axis=0)
        frame_means = [float(np.nanmean(d)) for d in dices]
        print(
            f"| {spacing:.1f} | "
            + " | ".join(f"{d:.3f}" for d in table)
            + f" | {np.mean(frame_means):.3f} | {min(frame_means):.3f} |"
        )
        result["spacings"][str(spacing)] = {"mean_dice": [float(d) for d in table], "frame_mean_dice": frame_means}
    print(f"written {write_record(work / f'localiser_resolution_{args.part}.json', result)}")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="acdc.py localiser", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pose", help="the localiser's pose and scale against the labels' (validation frames)")
    p.add_argument("--localiser", required=True, help="localiser weights (train_localiser.json)")
    p.add_argument("--output", default="", help="JSON path (default: beside the localiser's run)")
    add_options(p, "data", "frames", "threads")
    r = sub.add_parser("resolution", help="the manual labels' Dice after the localiser's in-plane round trip")
    r.add_argument("--part", default="validation", choices=["training", "validation", "test"])
    r.add_argument("--spacings", default="1.0,1.5,2.0,3.0", help="in-plane spacings (mm) to score")
    add_options(r, "data", "work_dir", "frames", "offset", "threads", work_dir=str(RESULTS / "localiser_resolution"))
    args = ap.parse_args(argv)
    require_data(args.data)
    torch.set_num_threads(args.threads)
    return pose(args) if args.command == "pose" else resolution(args)


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
