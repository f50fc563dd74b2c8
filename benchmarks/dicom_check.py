"""A real heart as the scanner exports it: ACDC frames written as an oblique DICOM cine, run through ``run inference``
with no step of the user's own, against the same voxels given as NIfTI.

Per patient, ED and ES become a 2-phase cine (one file per slice and phase, one series per slice position), placed
in the world by a random rigid short-axis orientation; ``run inference`` reads the DICOM folder as it is. The same
voxels and affine go in as one 4D NIfTI. Reported: the written labels' agreement, the output affines' difference,
and each run's wall time. Run: ``python benchmarks/dicom_check.py --patients 2`` (prints a table, writes JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from qc_calibration import ACDC, random_rigid, split_frames  # noqa: E402

from nisf_monai.data.dicom import write_dicom_cine  # noqa: E402


def run_inference(data: Path, out: Path) -> float:
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file"]
    command += [str(ROOT / "bundle/configs/inference.json"), "--bundle_root", str(ROOT / "bundle")]
    start = time.perf_counter()
    subprocess.run([*command, "--dataset_dir", str(data), "--output_dir", str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dicom_check.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    by_patient: dict[str, list[dict]] = {}
    for frame in split_frames(args.split):
        by_patient.setdefault(frame["patient"], []).append(frame)
    rows = []
    for patient in sorted(by_patient)[: args.patients]:
        frames = by_patient[patient]
        images = [nib.load(str(ACDC / f["image"])) for f in frames]
        cine = np.stack([np.asarray(i.dataobj) for i in images], axis=-1).astype(np.float32)
        cine = np.rint(cine / cine.max() * 4000.0).astype(np.float32)  # scanner-like integers
        centre = images[0].affine[:3, :3] @ (np.array(cine.shape[:3]) / 2.0) + images[0].affine[:3, 3]
        affine = random_rigid(rng, centre) @ images[0].affine
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            write_dicom_cine(cine, affine, work / "dicom" / patient)
            (work / "nifti").mkdir()
            nib.save(nib.Nifti1Image(cine, affine), str(work / "nifti" / f"{patient}.nii.gz"))
            seconds = {kind: run_inference(work / kind, work / f"out_{kind}") for kind in ("dicom", "nifti")}
            dicom, nifti = (nib.load(str(work / f"out_{k}" / f"{patient}_seg.nii.gz")) for k in ("dicom", "nifti"))
            a, b = np.asarray(dicom.dataobj), np.asarray(nifti.dataobj)
            rows.append(
                {
                    "patient": patient,
                    "shape": list(a.shape),
                    "voxel_agreement": float((a == b).mean()),
                    "foreground_dice": float(2 * ((a > 0) & (b > 0)).sum() / max((a > 0).sum() + (b > 0).sum(), 1)),
                    "affine_max_difference_mm": float(np.abs(dicom.affine - nifti.affine).max()),
                    "affine_vs_written_mm": float(np.abs(dicom.affine - affine).max()),
                    "seconds": seconds,
                }
            )
    header = ("patient", "shape", "agree", "fg Dice", "affine mm", "dicom s", "nifti s")
    print(f"{header[0]:12s} {header[1]:>16s} " + " ".join(f"{h:>9s}" for h in header[2:]))
    for r in rows:
        print(
            f"{r['patient']:12s} {str(r['shape']):>16s} {r['voxel_agreement']:9.4f} {r['foreground_dice']:9.4f} "
            f"{r['affine_max_difference_mm']:9.2e} {r['seconds']['dicom']:9.1f} {r['seconds']['nifti']:9.1f}"
        )
    result = {"split": args.split, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
