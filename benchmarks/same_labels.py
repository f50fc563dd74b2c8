"""Does a change of the package change what ``run inference`` writes? Runs the bundle's inference twice on the same
images, once with the package of an earlier revision (a ``git worktree`` of it) and once with this checkout's, one
after the other with the same settings, and compares every written segmentation voxel by voxel.

    python benchmarks/same_labels.py --before 7e737d8 --dataset_dir DIR [--output benchmarks/results/x.json]

Prints a table (case, voxels, voxels that differ, seconds before/after) and writes it as JSON. Meant for refactors
that promise "behaviour unchanged": any differing voxel is reported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from acdc_common import cpu_name, write_record

ROOT = Path(__file__).resolve().parents[1]


def revision(ref: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "rev-parse", ref], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def run_inference(package_root: Path, dataset_dir: Path, output_dir: Path, overrides: list[str]) -> float:
    """``monai.bundle run inference`` with ``package_root``'s package and configs (the shipped weights of this
    checkout's ``bundle/models``); returns the wall seconds."""
    bundle = Path(tempfile.mkdtemp(prefix="bundle_"))
    (bundle / "models").symlink_to(ROOT / "bundle" / "models")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        str(package_root / "bundle" / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(package_root), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"inference with {package_root} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier revision (commit, tag, branch)")
    parser.add_argument("--dataset_dir", required=True, type=Path, help="images to segment (NIfTI or DICOM)")
    parser.add_argument("--output", type=Path, default=None, help="JSON record (default: print only)")
    parser.add_argument("overrides", nargs="*", help="bundle overrides for both runs, e.g. --inference_steps 50")
    args, extra = parser.parse_known_args()
    overrides = [*args.overrides, *extra]
    work = Path(tempfile.mkdtemp(prefix="same_labels_"))
    before_tree = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=ROOT, check=True)
    try:
        seconds = {
            "before": run_inference(before_tree, args.dataset_dir, work / "out_before", overrides),
            "after": run_inference(ROOT, args.dataset_dir, work / "out_after", overrides),
        }
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, check=True)
    rows = []
    for before in sorted((work / "out_before").glob("*_seg.nii.gz")):
        after = work / "out_after" / before.name
        a, b = np.asarray(nib.load(str(before)).dataobj), np.asarray(nib.load(str(after)).dataobj)
        same_grid = np.allclose(nib.load(str(before)).affine, nib.load(str(after)).affine) and a.shape == b.shape
        differ = int((a != b).sum()) if same_grid else int(a.size)
        rows.append({"case": before.name.removesuffix("_seg.nii.gz"), "voxels": int(a.size), "differ": differ})
    if not rows:
        raise SystemExit(f"no segmentation was written from {args.dataset_dir}.")
    print(f"{'case':<28} {'voxels':>9} {'differ':>7}")
    for row in rows:
        print(f"{row['case']:<28} {row['voxels']:>9} {row['differ']:>7}")
    print(f"run seconds: before {seconds['before']:.1f}, after {seconds['after']:.1f} (start-up included)")
    record = {
        "command": " ".join(["python", *sys.argv]),
        "before": revision(args.before),
        "after": revision("HEAD")
        + (
            " + working tree"
            if subprocess.run(
                ["git", "diff", "--quiet", "HEAD", "--", "nisf_monai", "bundle/configs"], cwd=ROOT
            ).returncode
            else ""
        ),
        "cpu": cpu_name(),
        "cases": rows,
        "differing_voxels": sum(r["differ"] for r in rows),
        "seconds": seconds,
    }
    if args.output:
        write_record(args.output, record)
    if record["differing_voxels"]:
        raise SystemExit(f"{record['differing_voxels']} voxels differ.")


if __name__ == "__main__":
    main()
