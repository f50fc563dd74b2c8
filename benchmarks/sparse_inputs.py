"""Sparse and partial inputs: Dice against the fraction of the image the latent code is fitted to.

For each fraction, the bundle's `interpolating` config fits each case's code to only part of its voxels
and segments the whole volume:

- ``--mode points``: a random fraction of the voxels (``RandPointMaskd``, seeded);
- ``--mode slices``: that fraction of the short-axis slices, evenly spread (``SliceMaskd``); the hidden
  slices between kept ones are also scored against nearest-slice and shape-based interpolation of the
  kept slices' ground truth.

NISF's Dice on the whole volume (MONAI DiceMetric, background excluded) is plotted against the fraction.
A fraction of slices keeps the slice nearest the centre of each of that many equal parts of the stack.

    python benchmarks/sparse_inputs.py                         # synthetic cohort (validation), shipped model
    python benchmarks/sparse_inputs.py --mode slices --limit 1
    python benchmarks/sparse_inputs.py --acdc ../shared/data/acdc --model MODEL --limit 2

Writes to --work-dir: sparse_inputs_<mode>.json and .png, and each fraction's config outputs in f<fraction>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acdc_interpolation import REPO, add_model_arguments, model_overrides, run_interpolating  # noqa: E402

from nisf_monai.data import build_datalist, ensure_synthetic_cohort  # noqa: E402
from nisf_monai.plotting import pyplot  # noqa: E402

logger = logging.getLogger("sparse_inputs")
DEFAULT_FRACTIONS = {"points": [1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 0.002], "slices": [1.0, 0.5, 0.25, 0.1]}


def limited_datalist(datalist: str, section: str, limit: int, work: Path) -> str:
    """The datalist, or a copy in ``work`` with only the first ``limit`` subjects of ``section``."""
    if not limit:
        return datalist
    full = json.loads(Path(datalist).read_text())
    root = Path(datalist).resolve().parent
    keep = sorted({e.get("subject", e["image"]) for e in full[section]})[:limit]
    entries = [e for e in full[section] if e.get("subject", e["image"]) in keep]
    for e in entries:  # paths stay valid from the new folder
        for key in ("image", "label", "mask"):
            if key in e:
                e[key] = str((root / e[key]).resolve())
    full[section] = entries
    path = work / "datalist.json"
    path.write_text(json.dumps(full, indent=2))
    return str(path)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fractions = [r["fraction"] for r in result["runs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in result["classes"]:
        ax.plot(
            fractions,
            [r["summary"]["nisf_all_slices"][name][0] for r in result["runs"]],
            "o-",
            alpha=0.6,
            label=f"NISF {name}",
        )
    ax.plot(
        fractions,
        [r["summary"]["nisf_all_slices"]["mean"][0] for r in result["runs"]],
        "ko-",
        linewidth=2,
        label="NISF mean (whole volume)",
    )
    if result["mode"] == "slices":
        styles = {
            "nisf": ("k--", "NISF, hidden slices"),
            "nearest": ("C7s--", "nearest slice (GT), hidden"),
            "shape_based": ("C9^--", "shape-based (GT), hidden"),
        }
        for method, (style, label) in styles.items():
            points = [
                (r["fraction"], r["summary"][method]["mean"][0]) for r in result["runs"] if method in r["summary"]
            ]
            if points:
                ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:g}" for f in fractions])
    ax.set_xlabel(f"fraction of {'voxels' if result['mode'] == 'points' else 'slices'} the code is fitted to")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Sparse inputs ({result['num_cases']} cases, {result['settings']['inference_steps']} latent steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("points", "slices"), default="points")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=None,
        help=f"fractions kept (default: points {DEFAULT_FRACTIONS['points']}, slices {DEFAULT_FRACTIONS['slices']})",
    )
    ap.add_argument(
        "--datalist", default=None, help="MONAI datalist (default: the synthetic cohort in bundle/data/synthetic)"
    )
    ap.add_argument(
        "--section",
        default=None,
        help="datalist section (default: validation for the synthetic cohort, test otherwise)",
    )
    ap.add_argument(
        "--acdc", default=None, metavar="DIR", help="build the ACDC datalist from DIR and use its test patients"
    )
    ap.add_argument("--work-dir", default=str(REPO / "benchmarks" / "results" / "sparse_inputs"))
    add_model_arguments(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.acdc:
        datalist, section = build_datalist(args.acdc, str(work / "acdc_datalist.json")), args.section or "test"
    elif args.datalist:
        datalist, section = args.datalist, args.section or "test"
    else:
        datalist, section = (
            ensure_synthetic_cohort(str(REPO / "bundle" / "data" / "synthetic")),
            args.section or "validation",
        )
    datalist = limited_datalist(datalist, section, args.limit, work)
    base = {**model_overrides(args), "datalist_file": datalist, "section": section}
    runs = []
    for fraction in sorted(set(args.fractions or DEFAULT_FRACTIONS[args.mode]), reverse=True):
        if args.mode == "points":
            mask = {"keep_slices": "all", "point_fraction": fraction}
        else:
            mask = {"keep_slices": fraction, "point_fraction": 1.0}
        record, elapsed = run_interpolating({**base, **mask, "output_dir": str(work / f"{args.mode}_f{fraction:g}")})
        kept = float(np.mean([c["kept_voxel_fraction"] for c in record["cases"]]))
        runs.append(
            {
                "fraction": fraction,
                "kept_voxel_fraction": kept,
                "wall_s": elapsed,
                "summary": record["summary"],
                "num_scored_slices": record["num_scored_slices"],
            }
        )
        logger.info(
            "fraction %g: NISF mean Dice %s (whole volume), %.0f s",
            fraction,
            record["summary"]["nisf_all_slices"]["mean"][0],
            elapsed,
        )
    result = {
        "mode": args.mode,
        "settings": {**vars(args), **base},
        "classes": record["classes"],
        "num_cases": record["num_cases"],
        "runs": runs,
    }
    (work / f"sparse_inputs_{args.mode}.json").write_text(json.dumps(result, indent=2))
    plot(result, work / f"sparse_inputs_{args.mode}.png")
    print(
        "fraction  kept voxels  NISF mean Dice (whole volume)"
        + ("  hidden slices: NISF / nearest / shape-based" if args.mode == "slices" else "")
    )
    fmt = lambda s, m: "-" if m not in s or s[m]["mean"][0] is None else f"{s[m]['mean'][0]:.3f}"  # noqa: E731
    for r in runs:
        line = f"{r['fraction']:<8g}  {r['kept_voxel_fraction']:<11.4g}  {fmt(r['summary'], 'nisf_all_slices')}"
        if args.mode == "slices":
            line += "                          " + " / ".join(
                fmt(r["summary"], m) for m in ("nisf", "nearest", "shape_based")
            )
        print(line)
    print(f"results in {work}")


if __name__ == "__main__":
    main()
