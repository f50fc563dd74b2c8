"""The cine model against the per-frame model on ACDC (``acdc.py cine``): timing, the clinical measures of the UNet
baseline, and the side-by-side table of issue 26.

    python benchmarks/acdc.py cine timing --per-frame MODEL_A --cine MODEL_B --localiser LOC   # one subject, a cine
    python benchmarks/acdc.py cine unet-measures benchmarks/results/acdc_unet117_v2/acdc_unet.json
    python benchmarks/acdc.py cine mass-change DIR [DIR ...]                                   # |mass(ED) - mass(ES)|
    python benchmarks/acdc.py cine dice --run per-frame A_off0.json A_off10.json --run cine B_off0.json B_off10.json

``timing`` runs ``python -m monai.bundle run inference`` as a user does, in fresh processes: on one ACDC test
subject's ED and ES frames with each model (the per-frame model fits two codes, the cine model one), and on a
synthetic 25-frame cine (a 4D NIfTI) with each. Wall and CPU time (user + system of the child) are printed side by
side and written to JSON: the ratio of the two models is what one run compares (these machines are shared).

``unet-measures`` reads the 2D UNet baseline's per-frame volumes on the test frames (voxel counts on the acquired
grid, ``acdc.py unet`` records them) and gives LV/RV EDV, ESV, EF and LV mass against the manual
labels, as ``acdc.py measures`` does for NISF.

``dice`` reads ``acdc.py evaluate`` records (pooled over the files of a run) and splits each run's Dice at
its last step (or ``--step``) into the ED and the ES frames, for the code alone and for the written segmentation
(the localiser's blend with the largest components kept).

``mass-change`` reads ``volumes.csv`` of measuring runs and compares the LV mass at ED and at ES of each subject,
NISF's and the manual labels' (the myocardium does not change its mass in a heartbeat).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from acdc_common import DATA, REPO, RESULTS, add_options, write_record

from nisf_monai.data.synthetic import generate_cine
from nisf_monai.geometry.measures import MYOCARDIAL_DENSITY, agreement_table, cardiac_measures
from nisf_monai.io import json_safe, save_nifti

SHOWN = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_ef_pct", "lv_mass_g")


def _inference(model: Path, localiser: str, data: Path, out: Path, threads: int) -> dict:
    """One ``run inference`` in a fresh process: wall seconds and the child's CPU seconds."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference",
        "--config_file", str(REPO / "bundle" / "configs" / "inference.json"),
        "--bundle_root", str(REPO / "bundle"),
        "--ckpt_dir", str(model.parent), "--ckpt_path", str(model), "--localiser_path", localiser,
        "--dataset_dir", str(data), "--output_dir", str(out),
    ]  # fmt: skip
    env = dict(os.environ, CI="true", OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"inference failed:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "outputs": sorted(p.name for p in out.iterdir())}


def timing(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    shutil.rmtree(work / "inputs", ignore_errors=True)
    subject = work / "inputs" / "subject"
    subject.mkdir(parents=True)
    for frame in sorted((DATA / args.patient).glob(f"{args.patient}_frame??.nii.gz")):
        shutil.copy(frame, subject / frame.name)
    cine = work / "inputs" / "cine"
    cine.mkdir()
    image, _, affine, info = generate_cine(args.seed, args.frames, spacing=(1.5, 1.5, 8.0), shape=(176, 176, 10))
    save_nifti(image, affine, cine / "synthetic_cine.nii.gz", time_unit="sec")
    models = {"per-frame": Path(args.per_frame).resolve(), "cine": Path(args.cine).resolve()}
    runs: dict[str, dict] = {}
    for data_name, data in (("ACDC subject, ED + ES", subject), (f"synthetic {args.frames}-frame cine", cine)):
        for model_name, model in models.items():
            out = work / "outputs" / f"{data.name}_{model_name}"
            shutil.rmtree(out, ignore_errors=True)
            runs[f"{data_name} | {model_name}"] = _inference(model, args.localiser, data, out, args.threads)
    record = {
        "cpu": _cpu_model(),
        "threads": args.threads,
        "patient": args.patient,
        "cine_frames": args.frames,
        "models": {k: str(v) for k, v in models.items()},
        "runs": runs,
    }
    write_record(work / "timing.json", json_safe(record))
    print(f"| input | model | wall s | CPU s |  ({record['cpu']}, {args.threads} thread(s))")
    print("|---|---|---:|---:|")
    for key, run in runs.items():
        data_name, model_name = key.split(" | ")
        print(f"| {data_name} | {model_name} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} |")
    print(f"written {work / 'timing.json'}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _phases_of_acdc() -> dict[str, str]:
    """ED / ES of each ACDC frame file name, from the data's own datalist (ED: the larger LV blood pool)."""
    frames = json.loads((DATA / "datalist.json").read_text())["frames"]
    return {Path(f["image"]).name: f["phase"] for f in frames}


def unet_measures(args: argparse.Namespace) -> None:
    record = json.loads(Path(args.unet_json).read_text())
    phases = _phases_of_acdc()
    by_subject: dict[str, dict[str, dict]] = defaultdict(dict)
    for case in record["cases"]:
        by_subject[case["case"].split("_frame")[0]][phases[case["case"]]] = case
    unet, manual = {}, {}
    for subject, frames in sorted(by_subject.items()):
        unet[subject] = cardiac_measures(frames["ED"]["volumes_ml"], frames["ES"]["volumes_ml"])
        manual[subject] = cardiac_measures(frames["ED"]["manual_volumes_ml"], frames["ES"]["manual_volumes_ml"])
    table = agreement_table(unet, manual, SHOWN)
    mass_change = _mass_change(
        {
            s: (f["ED"]["volumes_ml"]["lv_myocardium"], f["ES"]["volumes_ml"]["lv_myocardium"])
            for s, f in by_subject.items()
        }
    )
    out = Path(args.unet_json).with_name("acdc_unet_measures.json")
    summary = {"source": args.unet_json, "patients": len(unet), "agreement": table, "lv_mass_change_g": mass_change}
    write_record(out, json_safe(summary))
    for m in SHOWN:
        s = table[m]
        print(f"{m}: MAE {s['mae']:.2f}, bias {s['bias']:+.2f}, r {s['pearson_r']:.2f}")
    print(f"LV mass |ED - ES|: median {mass_change['median']:.1f} g; written {out}")


def _mass_change(myocardium_ml: dict[str, tuple[float, float]]) -> dict:
    """|LV mass(ED) - LV mass(ES)| per subject (g) from ED / ES myocardial volumes (ml), and its median."""
    change = {s: abs(ed - es) * MYOCARDIAL_DENSITY for s, (ed, es) in myocardium_ml.items()}
    return {"per_subject": change, "median": float(np.median(list(change.values()))) if change else float("nan")}


def mass_change(args: argparse.Namespace) -> None:
    """From measuring runs' ``volumes.csv`` (sources ``nisf`` and ``manual``, phases ED and ES)."""
    volumes: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for folder in args.folders:
        with open(Path(folder) / "volumes.csv", newline="") as f:
            for row in csv.DictReader(f):
                volumes[row["source"]][row["subject"]][row["phase"]] = float(row["lv_myocardium_ml"])
    result = {
        source: _mass_change({s: (v["ED"], v["ES"]) for s, v in by_subject.items() if {"ED", "ES"} <= set(v)})
        for source, by_subject in volumes.items()
    }
    for source, change in result.items():
        print(
            f"{source}: median |LV mass(ED) - LV mass(ES)| {change['median']:.1f} g over {len(change['per_subject'])}"
        )
    if args.output:
        write_record(args.output, json_safe({"folders": args.folders, **result}))
        print(f"written {args.output}")


def dice(args: argparse.Namespace) -> None:
    phases = _phases_of_acdc()
    rows, record = [], {}
    for name, *files in args.run:
        per_phase: dict[str, dict[str, list]] = {"code": defaultdict(list), "written": defaultdict(list)}
        for path in files:
            result = json.loads(Path(path).read_text())
            step = str(result["steps"][-1] if args.step is None else args.step)
            written = result["blends_largest_component"][args.blend]["per_case"][step]
            for case, code_dice, written_dice in zip(result["cases"], result["per_case"][step], written):
                phase = phases[f"{case}.nii.gz"]
                per_phase["code"][phase].append(code_dice)
                per_phase["written"][phase].append(written_dice)
        record[name] = {}
        for reading, by_phase in per_phase.items():
            for phase in ("ED", "ES", "all"):
                values = np.asarray(by_phase["ED"] + by_phase["ES"] if phase == "all" else by_phase[phase], dtype=float)
                with np.errstate(invalid="ignore"):
                    classes = np.nanmean(values, axis=0)
                    mean = float(np.nanmean(np.nanmean(values, axis=1)))
                record[name][f"{reading}_{phase}"] = {"mean": mean, "classes": classes.tolist(), "frames": len(values)}
        r = record[name]
        rows.append(
            f"| {name} | "
            + " | ".join(f"{r[f'{k}_{p}']['mean']:.3f}" for k in ("code", "written") for p in ("ED", "ES", "all"))
            + " |"
        )
    print("| run | code ED | code ES | code all | written ED | written ES | written all |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.output:
        write_record(args.output, {"runs": {n: f for n, *f in args.run}, "dice": record})
        print(f"written {args.output}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="acdc.py cine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--per-frame", required=True, help="a per-frame model.pt")
    t.add_argument("--cine", required=True, help="a cine model.pt")
    t.add_argument("--localiser", default=str(REPO / "bundle" / "models" / "localiser.pt"))
    t.add_argument("--patient", default="patient049", help="an ACDC test patient")
    t.add_argument("--frames", type=int, default=25, help="frames of the synthetic cine")
    t.add_argument("--seed", type=int, default=3)
    add_options(t, "threads", "work_dir", threads=2, work_dir=str(RESULTS / "acdc_cine_timing"))
    u = sub.add_parser("unet-measures")
    u.add_argument("unet_json", help="acdc_unet.json of acdc.py unet (with per-case volumes)")
    m = sub.add_parser("mass-change")
    m.add_argument("folders", nargs="+", help="measuring runs' output folders (holding volumes.csv)")
    m.add_argument("--output", default="", help="JSON to write")
    d = sub.add_parser("dice")
    d.add_argument("--run", nargs="+", action="append", required=True, metavar="NAME_THEN_FILES")
    d.add_argument("--blend", default="0.5", help="the written segmentation's localiser weight")
    d.add_argument("--step", type=int, default=None, help="the latent step read (default: each record's last)")
    d.add_argument("--output", default="", help="JSON to write")
    args = ap.parse_args(argv)
    commands = {"timing": timing, "unet-measures": unet_measures, "mass-change": mass_change, "dice": dice}
    commands[args.command](args)


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
