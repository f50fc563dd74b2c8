"""Cohort throughput of ``run inference``: one frame's wall time, cases per hour on 1 and 2 processes, peak memory,
and the projection to a 10,000-subject cohort.

- ``frame``: ``run inference`` on a folder holding one ACDC validation frame, as a user runs it on an idle machine
  (2 threads), for the current settings and for ``--before`` overrides (the previous release's), interleaved
  ``--repeats`` times so both see the same machine; wall seconds of the whole command (start-up included) and
  the start-up alone (a folder whose case is already written, so nothing is fitted).
- ``cohort``: ``--frames`` validation frames through one process of one thread, then through ``torchrun
  --nproc_per_node 2`` (one thread each, ``multi_gpu_inference.json``); wall time, cases per hour, the largest
  resident memory of any process (``ru_maxrss`` of the waited-for children), and whether both wrote the same
  labels.

Run: ``python benchmarks/cohort_throughput.py --part all`` (prints a table, writes JSON to ``--output``). Name the
CPU (``lscpu``) beside the numbers: these are ratios of runs made side by side, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from acdc_common import parse_overrides, write_record  # noqa: E402
from frame_profile import validation_frames  # noqa: E402

CONFIGS = ROOT / "bundle" / "configs"
SUBJECTS, FRAMES_PER_SUBJECT = 10_000, (2, 50)  # ED + ES, or a whole cine of 50 phases (UK Biobank's)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_command(configs: list[str], data: Path, out: Path, overrides: dict, processes: int = 1) -> list[str]:
    merged = (
        str(CONFIGS / configs[0]) if len(configs) == 1 else "[" + ",".join(f"'{CONFIGS / c}'" for c in configs) + "]"
    )
    start = [sys.executable]
    if processes > 1:
        start += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
        start += [f"--master_port={_free_port()}"]
    command = [*start, "-m", "monai.bundle", "run", "inference", "--config_file", merged]
    command += ["--bundle_root", str(ROOT / "bundle"), "--dataset_dir", str(data), "--output_dir", str(out)]
    for key, value in overrides.items():
        text = "None" if value is None else value if isinstance(value, str) else json.dumps(value)
        command += [f"--{key}", text]  # None as Python spells it: the bundle CLI reads "null" as text
    return command


_MEASURED = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def timed_run(command: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, peak resident MB of the largest process it started) of one command, run under a fresh
    parent so that the peak is this command's alone."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, *command], env=env, check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    return wall, int(done.stdout.strip().splitlines()[-1]) / 1024.0


def frame_part(args: argparse.Namespace) -> dict:
    frame = validation_frames(1)[0]
    settings = {"current": {}, "before": parse_overrides(args.before)}
    walls: dict[str, list[float]] = {name: [] for name in settings}
    startup: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        shutil.copy(frame, data / frame.name)
        for _ in range(args.repeats):
            for name, overrides in settings.items():
                out = Path(work) / f"out_{name}"
                shutil.rmtree(out, ignore_errors=True)
                walls[name].append(timed_run(bundle_command(["inference.json"], data, out, overrides), 2)[0])
            startup.append(timed_run(bundle_command(["inference.json"], data, Path(work) / "out_current", {}), 2)[0])
    medians = {name: float(np.median(values)) for name, values in walls.items()}
    return {
        "frame": frame.name,
        "before_overrides": settings["before"],
        "wall_s": walls,
        "median_wall_s": medians,
        "startup_s": float(np.median(startup)),
        "speed_up": medians["before"] / medians["current"],
    }


def cohort_part(args: argparse.Namespace) -> dict:
    frames = validation_frames(args.frames)
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        for frame in frames:
            shutil.copy(frame, data / frame.name)
        for processes in (1, 2):
            configs = ["inference.json"] + (["multi_gpu_inference.json"] if processes > 1 else [])
            out = Path(work) / f"out_{processes}"
            wall, peak = timed_run(bundle_command(configs, data, out, {}, processes), 1)
            runs[processes] = {"wall_s": wall, "cases_per_hour": len(frames) * 3600.0 / wall, "peak_mb": peak}
        same = all(
            np.array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj))
            for a, b in zip(
                sorted((Path(work) / "out_1").glob("*_seg.nii.gz")), sorted((Path(work) / "out_2").glob("*_seg.nii.gz"))
            )
        )
    rate = runs[2]["cases_per_hour"]
    projection = {
        f"{frames_per} frames per subject": {
            "hours_one_machine_like_this": SUBJECTS * frames_per / rate,
            "machines_for_one_day": SUBJECTS * frames_per / rate / 24.0,
        }
        for frames_per in FRAMES_PER_SUBJECT
    }
    return {
        "frames": len(frames),
        "runs": runs,
        "ratio_2_to_1": runs[2]["cases_per_hour"] / runs[1]["cases_per_hour"],
        "same_labels": same,
        "projection_10000_subjects": projection,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["frame", "cohort", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--before", nargs="*", default=[], help="the previous release's settings, key=JSON")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cohort_throughput.json"))
    args = parser.parse_args(argv)
    result: dict = {
        "cpu": subprocess.run(["lscpu"], capture_output=True, text=True)
        .stdout.split("Model name:")[-1]
        .split("\n")[0]
        .strip()
    }
    if args.part in ("frame", "all"):
        result["frame"] = frame_part(args)
        f = result["frame"]
        print(f"one frame, whole run inference, 2 threads ({result['cpu']}):")
        for name, wall in f["median_wall_s"].items():
            print(f"  {name:8s} {wall:6.1f} s (runs {', '.join(f'{w:.1f}' for w in f['wall_s'][name])})")
        print(f"  start-up alone {f['startup_s']:.1f} s; speed-up {f['speed_up']:.2f}x")
    if args.part in ("cohort", "all"):
        result["cohort"] = cohort_part(args)
        c = result["cohort"]
        print(f"{c['frames']} frames, one thread per process:")
        for processes, run in c["runs"].items():
            rate, peak = run["cases_per_hour"], run["peak_mb"]
            print(f"  {processes} process(es): {run['wall_s']:7.1f} s, {rate:6.1f} cases/h, peak {peak:.0f} MB")
        print(f"  ratio 2/1: {c['ratio_2_to_1']:.2f}; same labels: {c['same_labels']}")
        for name, p in c["projection_10000_subjects"].items():
            print(f"  10,000 subjects, {name}: {p['hours_one_machine_like_this']:.0f} h on one such machine")
    write_record(args.output, result)
    return result


if __name__ == "__main__":
    main()
