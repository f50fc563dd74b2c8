"""One ACDC frame through ``run inference``, this checkout against an earlier release's, side by side.

The earlier release runs from its own checkout (``git worktree add /tmp/old <commit>``, with the shipped weights
copied into its ``bundle/models``), each in a fresh process with 2 threads on an idle machine, interleaved
``--repeats`` times; the whole command is timed (start-up included), as a user waits for it.

Run: ``python benchmarks/release_frame_time.py --old /tmp/old --old-name "0.12.0 (04174e5)"``; prints JSON and
writes it to ``--output``. Name the CPU beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAME = ROOT.parent / "shared" / "data" / "acdc" / "patient002" / "patient002_frame01.nii.gz"


def run_once(checkout: Path, data: Path, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    root = checkout / "bundle"
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file"]
    command += [str(root / "configs" / "inference.json"), "--bundle_root", str(root)]
    command += ["--dataset_dir", str(data), "--output_dir", str(out)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="checkout of the earlier release, weights in bundle/models")
    parser.add_argument("--old-name", default="earlier release")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "frame_v012_vs_v013.json"))
    args = parser.parse_args(argv)
    checkouts = {args.old_name: Path(args.old), "this checkout": ROOT}
    walls: dict[str, list[float]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        shutil.copy(FRAME, data / FRAME.name)
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():
                out = Path(work) / "out"
                shutil.rmtree(out, ignore_errors=True)
                walls[name].append(run_once(checkout, data, out))
    medians = {name: statistics.median(values) for name, values in walls.items()}
    result = {
        "frame": FRAME.name,
        "threads": 2,
        "wall_s": walls,
        "median_s": medians,
        "speed_up": medians[args.old_name] / medians["this checkout"],
    }
    print(json.dumps(result, indent=1))
    Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
