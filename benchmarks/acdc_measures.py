"""ACDC clinical measures (``acdc.py measures``): NISF's LV/RV volumes, ejection fractions and LV mass against the
manual labels.

On the ACDC test patients of the data README's split (patient number % 5 == 4), runs the bundle's
``measuring`` run (``inference.json`` + ``measure.json``): per patient, fits a code to the ED and the ES
frame (phases from the data's ``datalist.json``), reads the segmentation at a fine spacing over each stack's
slab, and compares LV EDV / ESV / EF, RV EDV / ESV / EF and LV mass (1.05 g/ml) with the same measures from
the manual labels (disc sums on the acquired grid): mean absolute error, bias, limits of agreement and
Pearson r. Writes CSV, JSON, meshes and PNGs (Bland-Altman, scatter, surfaces) to --work-dir.

    python benchmarks/acdc.py measures --model path/to/model.pt            # NISF vs manual
    python benchmarks/acdc.py measures --source labels --limit 2           # pipeline check: manual vs itself
    python benchmarks/acdc.py measures --offset 10 --limit 10 ...           # half the patients (one of two processes)
    python benchmarks/acdc.py measures --combine DIR_A DIR_B --work-dir OUT # one table over both halves

``--source labels`` sends the manual labels through the same fine-grid path instead of the network; it
must reproduce the manual disc sums exactly (MAE 0), which checks the grids, the region of interest and
the phase pairing without any model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from acdc_common import (
    CONFIGS,
    REPO,
    RESULTS,
    add_options,
    command_parser,
    inference_config,
    parse_overrides,
    require_data,
    write_record,
)

from nisf_monai.data import ACDC_LABEL_MAPPING, build_datalist, split_of
from nisf_monai.geometry.measures import agreement_table
from nisf_monai.io import json_safe

SHOWN = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct", "lv_mass_g")
logger = logging.getLogger("acdc_measures")


def test_datalist(data: Path, out: Path, limit: int, offset: int = 0, part: str = "test") -> str:
    """A MONAI datalist (section ``test``) of the ``part`` patients with ED / ES phases (from the data's own
    ``datalist.json``, where ED is the frame with the larger LV blood pool); without it, ``nisf-monai datalist``'s
    split and the measuring run's own rule (largest / smallest manual LV blood pool) give the same pairing."""
    source = data / "datalist.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        frames = json.loads(source.read_text())["frames"]
        entries = [
            {
                "image": str(data / f["image"]),
                "label": str(data / f["label"]),
                "case": f["id"],
                "subject": f["patient"],
                "phase": f["phase"],
            }
            for f in frames
            if split_of(int(f["patient"][-3:])) == part
        ]
        datalist = {"label_mapping": {str(k): v for k, v in ACDC_LABEL_MAPPING.items()}, "test": entries}
    else:
        datalist = json.loads(Path(build_datalist(str(data), str(out))).read_text())
        datalist["test"] = datalist[part]
    patients = sorted({e["subject"] for e in datalist["test"]})[offset:]
    if limit:
        patients = patients[:limit]
    datalist["test"] = sorted((e for e in datalist["test"] if e["subject"] in patients), key=lambda e: e["case"])
    out.write_text(json.dumps(datalist, indent=2))
    logger.info("%d %s patients, %d frames: %s", len(patients), part, len(datalist["test"]), ", ".join(patients))
    return str(out)


def print_table(agreement: dict, label: str) -> None:
    """The agreement of the shown measures as an aligned text table."""
    rows = [("measure", f"mean {label}", "mean manual", "MAE", "bias", "95% LoA", "r")]
    for m in SHOWN:
        s = agreement[m]
        fmt = lambda v: "nan" if v is None or v != v else f"{v:.2f}"  # noqa: E731
        rows.append(
            (
                m,
                fmt(s["mean_predicted"]),
                fmt(s["mean_reference"]),
                fmt(s["mae"]),
                fmt(s["bias"]),
                f"{fmt(s['loa_lower'])} .. {fmt(s['loa_upper'])}",
                fmt(s["pearson_r"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def combine(folders: list[str], source: str, out: Path) -> None:
    """Agreement over all patients of several runs (e.g. ``--offset 0 --limit 10`` and ``--offset 10`` in two
    processes), from their ``measures.csv``; written to ``out/acdc_measures.json``."""
    measured: dict[str, dict[str, float]] = {}
    manual: dict[str, dict[str, float]] = {}
    for folder in folders:
        with open(Path(folder) / source / "measures.csv", newline="") as f:
            for row in csv.DictReader(f):
                target = manual if row["source"] == "manual" else measured
                target[row["subject"]] = {m: float(row[m]) if row[m] else math.nan for m in SHOWN}
    table = agreement_table(measured, manual, SHOWN)
    summary = {"source": source, "folders": folders, "patients": len(set(measured) & set(manual)), "agreement": table}
    write_record(out / "acdc_measures.json", json_safe(summary))
    print_table(table, "NISF" if source == "nisf" else "labels (fine grid)")
    print(f"{summary['patients']} patients from {len(folders)} runs; written {out / 'acdc_measures.json'}")


def main(argv: list[str] | None = None) -> dict | None:
    ap = command_parser("measures", __doc__)
    add_options(ap, "data", "work_dir", "threads", "set", work_dir=str(RESULTS / "acdc_measures"))
    ap.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"), help="NISF weights (model.pt)")
    ap.add_argument(
        "--source", choices=("nisf", "labels"), default="nisf", help="labels: the manual labels through the same path"
    )
    ap.add_argument(
        "--spacing", type=float, default=1.0, help="fine spacing in mm (nested in the voxels, at most this)"
    )
    ap.add_argument(
        "--inference-steps",
        type=int,
        default=None,
        help="latent steps (default: inference_steps.json beside the model)",
    )
    ap.add_argument("--num-points", type=int, default=None, help="voxels per latent step (default: inference.json's)")
    ap.add_argument("--roi-margin", type=float, default=10.0, help="mm around the coarse foreground read finely")
    ap.add_argument("--mesh-format", default="vtk", help="surface meshes written per structure (vtk, stl, obj) or none")
    ap.add_argument(
        "--part",
        choices=("test", "validation"),
        default="test",
        help="the split's patients measured (tune on validation)",
    )
    ap.add_argument(
        "--measure-blend",
        action="store_true",
        help="measure the written segmentation (the localiser's probabilities mixed in) instead of the code alone",
    )
    ap.add_argument("--limit", type=int, default=0, help="only the first N patients (smoke test)")
    add_options(ap, "offset")
    ap.add_argument(
        "--combine",
        nargs="+",
        default=[],
        metavar="WORK_DIR",
        help="only combine the measures of earlier runs' work dirs into one agreement table (in --work-dir)",
    )
    args = ap.parse_args(argv)
    if args.combine:
        combine(args.combine, args.source, Path(args.work_dir))
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    data = require_data(args.data)
    model = Path(args.model).resolve()
    if args.source == "nisf" and not model.is_file():
        sys.exit(f"no model at {model}")
    work = Path(args.work_dir) / args.source
    datalist = test_datalist(data, work / "datalist.json", args.limit, args.offset, args.part)

    overrides = {
        "datalist_file": datalist,
        "section": "test",
        "output_dir": str(work),
        "ckpt_path": str(model),
        "ckpt_dir": str(model.parent),
        "measure_spacing": args.spacing,
        "measure_source": args.source,
        "mesh_format": None if args.mesh_format == "none" else args.mesh_format,
        "roi_margin_mm": args.roi_margin,
        "measure_blend": args.measure_blend,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if args.num_points is not None:
        overrides["num_points"] = args.num_points
    if args.inference_steps is not None:
        overrides["inference_steps"] = args.inference_steps
    parser = inference_config(overrides | parse_overrides(args.set), str(CONFIGS / "measure.json"))
    start = time.perf_counter()
    report = parser.get_parsed_content("measurer").run()
    elapsed = time.perf_counter() - start

    summary = {
        "source": args.source,
        "model": str(model) if args.source == "nisf" else None,
        "settings": report["settings"],
        "patients": len(report["subjects"]),
        "seconds": elapsed,
        "torch_threads": torch.get_num_threads(),
        "agreement": {m: report["agreement"][m] for m in SHOWN},
    }
    write_record(work / "acdc_measures.json", json_safe(summary))
    print_table(report["agreement"], "NISF" if args.source == "nisf" else "labels (fine grid)")
    print(f"{len(report['subjects'])} patients in {elapsed:.0f} s; CSV / JSON / PNG / meshes in {work}")
    return summary


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
