"""Resident memory of one ``run inference`` process over a cohort, for two settings side by side.

Each setting runs the bundle on the same frames in its own process, one thread each, both at once (so each sees
the same load); the process's resident memory is read every half second and its peak kept per number of cases
written. Linux only (reads ``/proc``).

    python benchmarks/cohort_memory.py --frames 20 --a "--onednn_primitive_cache 1024" --b "" \
        --output benchmarks/results/cohort_memory.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acdc_common import REPO, cpu_name, data_frames, require_data, write_record  # noqa: E402


def resident_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(status.split("VmRSS:")[1].split()[0]) / 1024.0


def start(frames: Path, output: Path, overrides: list[str]) -> subprocess.Popen:
    bundle = Path(tempfile.mkdtemp(prefix="bundle_"))
    (bundle / "models").symlink_to(REPO / "bundle" / "models")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file"]
    cmd += [str(REPO / "bundle" / "configs" / "inference.json"), "--bundle_root", str(bundle)]
    cmd += ["--dataset_dir", str(frames), "--output_dir", str(output), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=bundle, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20, help="first N ACDC validation frames")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "acdc"))
    parser.add_argument("--a", default="--onednn_primitive_cache 1024", help="overrides of run A")
    parser.add_argument("--b", default="", help="overrides of run B")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    data = require_data(args.data)
    work = Path(tempfile.mkdtemp(prefix="cohort_memory_"))
    frames = work / "frames"
    frames.mkdir()
    for frame in data_frames("validation", data)[: args.frames]:
        (frames / Path(frame["image"]).name).symlink_to(Path(data, frame["image"]).resolve())
    runs = {name: shlex.split(text) for name, text in (("A", args.a), ("B", args.b))}
    began = time.perf_counter()
    procs = {name: start(frames, work / name, overrides) for name, overrides in runs.items()}
    peaks: dict[str, dict[int, float]] = {name: {} for name in runs}
    seconds: dict[str, float] = {}
    while len(seconds) < len(procs):
        for name, proc in procs.items():
            if name in seconds:
                continue
            if proc.poll() is not None:
                seconds[name] = time.perf_counter() - began
                if proc.returncode:
                    raise SystemExit(f"run {name} failed:\n{proc.stderr.read()[-3000:]}")
                continue
            mb = resident_mb(proc.pid)
            written = len(list((work / name).glob("*_seg.nii.gz"))) if (work / name).is_dir() else 0
            if mb is not None:
                peaks[name][written] = max(peaks[name].get(written, 0.0), mb)
        time.sleep(0.5)
    print(f"{'run':<4} {'overrides':<32} {'peak MB':>8} {'after 1 case':>13} {'seconds':>8}")
    rows = {}
    for name, overrides in runs.items():
        peak = max(peaks[name].values())
        first = peaks[name].get(1, float("nan"))
        rows[name] = {"overrides": overrides, "peak_mb": round(peak), "peak_mb_by_cases_written": peaks[name]}
        rows[name]["seconds"] = round(seconds[name], 1)
        print(f"{name:<4} {' '.join(overrides) or '(defaults)':<32} {peak:>8.0f} {first:>13.0f} {seconds[name]:>8.1f}")
    if args.output:
        record = {
            "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
            "cpu": cpu_name(),
            "frames": args.frames,
            "note": "A and B ran side by side, one thread each; resident memory polled every 0.5 s",
            "runs": rows,
        }
        write_record(args.output, record)


if __name__ == "__main__":
    main()
