"""Held-out slices on ACDC (``acdc.py interpolate``): NISF against nearest-slice and shape-based label interpolation.

On the ACDC test patients (number % 5 == 4, see shared/data/README.md; --part validation for the validation
patients), every other short-axis slice is
hidden from the latent optimisation; NISF then segments the hidden slices, and two baselines interpolate
the ground-truth labels of the kept neighbours (which NISF never sees). Dice per class on the hidden
slices (MONAI DiceMetric, background excluded) for the three methods, through the bundle's
`interpolating` config (inference.json + evaluate.json + interpolate.json):

    python benchmarks/acdc.py interpolate --model bundle/models/model.pt --limit 2

Writes to --work-dir: hidden_slice_dice.{csv,json}, hidden_slice_dice_examples.png (the config's
outputs) and acdc_interpolation.json (settings, timing, summary); prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from acdc_common import (
    CONFIGS,
    REPO,
    RESULTS,
    acdc_datalist,
    add_options,
    command_parser,
    first_patients,
    inference_config,
    parse_overrides,
    require_data,
    write_record,
)

from nisf_monai.handlers import selected_inference_steps

METHODS = {
    "nisf": "NISF (hidden slices)",
    "nearest": "nearest slice (GT)",
    "shape_based": "shape-based (GT)",
    "nisf_all_slices": "NISF (all slices)",
}
logger = logging.getLogger("acdc_interpolation")


def run_interpolating(overrides: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run the bundle's `interpolating` config with ``overrides``; its JSON record and the wall time."""
    parser = inference_config(overrides, str(CONFIGS / "evaluate.json"), str(CONFIGS / "interpolate.json"))
    evaluator = parser.get_parsed_content("evaluator")
    start = time.perf_counter()
    evaluator.run()
    elapsed = time.perf_counter() - start
    record = json.loads((Path(parser.get_parsed_content("output_dir")) / "hidden_slice_dice.json").read_text())
    return record, elapsed


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides for the model: its path, its step count, and ``--set key=value`` (JSON values)."""
    model = Path(args.model).resolve()
    steps = args.steps if args.steps is not None else selected_inference_steps(model.parent, default=200)
    out: dict[str, Any] = {
        "ckpt_path": str(model),
        "inference_steps": int(steps),
        "num_points": args.num_points,
        "batch_size": args.batch_size,
    }
    out.update(parse_overrides(args.set or []))
    return out


def table(summary: dict[str, dict[str, list]], classes: list[str]) -> str:
    fmt = lambda v: "-" if v[0] is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    rows = [("method", *classes, "mean")]
    rows += [
        (METHODS.get(m, m), *[fmt(summary[m][c]) for c in classes], fmt(summary[m]["mean"]))
        for m in METHODS
        if m in summary
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--model", default=str(REPO / "bundle" / "models" / "model.pt"), help="network state_dict (bundle model.pt)"
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="latent steps (default: inference_steps.json next to the model, else 200)",
    )
    ap.add_argument("--num-points", type=int, default=8192, help="voxels per case per latent step")
    ap.add_argument("--batch-size", type=int, default=4, help="cases fitted together")
    add_options(ap, "set")
    ap.add_argument(
        "--limit", type=int, default=0, help="use only the first N subjects (patients, both frames) of the section"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = command_parser("interpolate", __doc__)
    add_options(ap, "data", "work_dir", "threads", work_dir=str(RESULTS / "acdc_interpolation"))
    ap.add_argument(
        "--keep", default="every_other", help="slices the fit sees: every_other, a fraction, or a JSON list of indices"
    )
    ap.add_argument("--slice-offset", type=int, default=0, help="first kept slice for every_other")
    ap.add_argument(
        "--part",
        default="test",
        choices=("validation", "test"),
        help="patients scored: validation (choosing settings) or test (reading a configuration once)",
    )
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    require_data(args.data)
    work = Path(args.work_dir)
    datalist = acdc_datalist(work, data=args.data)
    if args.limit:
        full = json.loads(Path(datalist).read_text())
        full[args.part] = first_patients(full[args.part], args.limit)
        Path(datalist).write_text(json.dumps(full, indent=2))
    keep_slices: Any = args.keep if args.keep in ("every_other", "all") else json.loads(args.keep)
    overrides = {
        **model_overrides(args),
        "datalist_file": datalist,
        "section": args.part,
        "output_dir": str(work),
        "keep_slices": keep_slices,
        "slice_offset": args.slice_offset,
    }
    record, elapsed = run_interpolating(overrides)
    result = {
        "settings": {**vars(args), **{k: v for k, v in overrides.items() if k != "datalist_file"}},
        "wall_s": elapsed,
        "num_cases": record["num_cases"],
        "num_scored_slices": record["num_scored_slices"],
        "summary": record["summary"],
    }
    write_record(work / "acdc_interpolation.json", result)
    print(table(record["summary"], record["classes"]))
    print(
        f"{record['num_cases']} cases, {record['num_scored_slices']} hidden slices scored, {elapsed:.0f} s; "
        f"results in {work}"
    )
    return result


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
