"""How far the slice localiser's heart pose lands from the labels' pose, with and without keeping each class's
largest connected component before the centroids (``SliceLocaliser(largest_component=...)``), and how far the
scale that its LV volume gives (``heart_reference_volume_ml``) lands from the labels' scale.

No code is fitted: the pose comes from the localiser's coarse labels alone, on ACDC validation frames. Prints a
table and writes JSON beside the localiser run::

    python benchmarks/localiser_pose.py \
        --localiser benchmarks/results/acdc_levers/localiser_split_v5_unet5l160/models/localiser.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from acdc_levers import CONFIGS, DATA, WORK, acdc_datalist
from levers_eval import pose_error, scale_error
from monai.bundle import ConfigParser

from nisf_monai.data import expand_cine_datalist, load_datalist
from nisf_monai.inferers import load_localiser
from nisf_monai.transforms import heart_pose


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--localiser", required=True, help="localiser weights (train_localiser.json)")
    ap.add_argument("--frames", type=int, default=0, help="first N validation frames (0: all)")
    ap.add_argument("--output", default="", help="JSON path (default: beside the localiser)")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"ACDC data not found at {DATA} (see ../shared/data/README.md)")
    torch.set_num_threads(1)
    datalist = acdc_datalist(WORK, "split")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"datalist": datalist})
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    cases = expand_cine_datalist(load_datalist(datalist, "validation"))
    cases = cases[: args.frames] if args.frames > 0 else cases
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
    print(f"{'labels':<20} {'origin':>14} {'angle':>14} {'scale':>14}")
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
            f"{name:<20} {s['median_origin_mm']:6.1f} / {s['max_origin_mm']:5.1f} "
            f"{s['median_angle_deg']:6.1f} / {s['max_angle_deg']:5.1f} "
            f"{s['median_scale_percent']:6.1f} / {s['max_scale_percent']:5.1f}"
        )
    output = Path(args.output) if args.output else Path(args.localiser).parent.parent / "localiser_pose.json"
    output.write_text(json.dumps({"localiser": str(args.localiser), "frames": len(cases), **summary}, indent=2))
    print(f"written {output}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
