"""Held-out slice interpolation on ACDC: NISF against nearest-slice and shape-based label interpolation.

On the ACDC test patients (number % 5 == 4, see shared/data/README.md; --part validation for the validation
patients), every other short-axis slice is
hidden from the latent optimisation; NISF then segments the hidden slices, and two baselines interpolate
the ground-truth labels of the kept neighbours (which NISF never sees). Dice per class on the hidden
slices (MONAI DiceMetric, background excluded) for the three methods, through the bundle's
`interpolating` config (inference.json + evaluate.json + interpolate.json):

    python benchmarks/acdc_interpolation.py --model bundle/models/model.pt --limit 2

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

from acdc_levers import parse_overrides  # noqa: E402  (beside this script)
from monai.bundle import ConfigParser

from nisf_monai.data import build_datalist
from nisf_monai.handlers import selected_inference_steps

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "bundle" / "configs" / name for name in ("inference.json", "evaluate.json", "interpolate.json")]
METHODS = {
    "nisf": "NISF (hidden slices)",
    "nearest": "nearest slice (GT)",
    "shape_based": "shape-based (GT)",
    "nisf_all_slices": "NISF (all slices)",
}
logger = logging.getLogger("acdc_interpolation")


def run_interpolating(overrides: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run the bundle's `interpolating` config with ``overrides``; its JSON record and the wall time."""
    parser = ConfigParser()
    parser.read_config([str(c) for c in CONFIGS])
    parser.update({"bundle_root": str(REPO / "bundle"), **overrides})
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
    ap.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any other config override, e.g. --set latent_dim=64"
    )
    ap.add_argument(
        "--limit", type=int, default=0, help="use only the first N subjects (patients, both frames) of the section"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--work-dir", default=str(REPO / "benchmarks" / "results" / "acdc_interpolation"))
    ap.add_argument(
        "--keep", default="every_other", help="slices the fit sees: every_other, a fraction, or a JSON list of indices"
    )
    ap.add_argument("--offset", type=int, default=0, help="first kept slice for every_other")
    ap.add_argument(
        "--part",
        default="test",
        choices=("validation", "test"),
        help="patients scored: validation (choosing settings) or test (reading a configuration once)",
    )
    add_model_arguments(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if not Path(args.data).is_dir():
        sys.exit(f"ACDC data not found at {args.data} (see shared/data/README.md)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    datalist = build_datalist(args.data, str(work / "datalist.json"))
    if args.limit:
        full = json.loads(Path(datalist).read_text())
        keep = sorted({e["subject"] for e in full[args.part]})[: args.limit]
        full[args.part] = [e for e in full[args.part] if e["subject"] in keep]
        Path(datalist).write_text(json.dumps(full, indent=2))
    keep_slices: Any = args.keep if args.keep in ("every_other", "all") else json.loads(args.keep)
    overrides = {
        **model_overrides(args),
        "datalist_file": datalist,
        "section": args.part,
        "output_dir": str(work),
        "keep_slices": keep_slices,
        "slice_offset": args.offset,
    }
    record, elapsed = run_interpolating(overrides)
    result = {
        "settings": {**vars(args), **{k: v for k, v in overrides.items() if k != "datalist_file"}},
        "wall_s": elapsed,
        "num_cases": record["num_cases"],
        "num_scored_slices": record["num_scored_slices"],
        "summary": record["summary"],
    }
    (work / "acdc_interpolation.json").write_text(json.dumps(result, indent=2))
    print(table(record["summary"], record["classes"]))
    print(
        f"{record['num_cases']} cases, {record['num_scored_slices']} hidden slices scored, {elapsed:.0f} s; "
        f"results in {work}"
    )


if __name__ == "__main__":
    main()
