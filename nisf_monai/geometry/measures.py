"""Clinical measures of the heart from segmentations: volumes, ejection fractions, myocardial mass, and
their agreement with a reference.

Volumes are voxel counts of a label map (or sums of class probabilities) times the voxel volume; on a
fine grid over the stack's slab (:func:`nisf_monai.geometry.grids.footprint_grid`) this is the continuous
segmentation's volume, on the acquired grid the clinical disc sum. Ejection fraction is
``(EDV - ESV) / EDV`` in percent; the LV myocardial mass is the end-diastolic myocardial volume times
1.05 g/ml (the density used in cardiac MRI reporting).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nisf_monai.classes import STRUCTURES
from nisf_monai.io import atomic_open

__all__ = [
    "MYOCARDIAL_DENSITY",
    "STRUCTURES",
    "MEASURES",
    "class_volumes",
    "ejection_fraction",
    "cardiac_measures",
    "agreement",
    "agreement_table",
    "write_csv",
]

MYOCARDIAL_DENSITY = 1.05  # g/ml
MEASURES = (
    "lv_edv_ml",
    "lv_esv_ml",
    "lv_sv_ml",
    "lv_ef_pct",
    "rv_edv_ml",
    "rv_esv_ml",
    "rv_sv_ml",
    "rv_ef_pct",
    "lv_mass_g",
)


def class_volumes(
    segmentation: Any, voxel_ml: float, structures: Mapping[str, int] = STRUCTURES, mode: str = "label"
) -> dict[str, float]:
    """Volume in ml of each structure.

    Args:
        segmentation: a label map ``(X, Y, Z)`` (integers), or class probabilities ``(M, X, Y, Z)``.
        voxel_ml: volume of one voxel in ml.
        structures: ``{name: class}``.
        mode: for probabilities, ``"label"`` counts the voxels where the class wins (argmax) and
            ``"probability"`` sums the class probability (a soft volume, partial voxels included).
    """
    if mode not in ("label", "probability"):
        raise ValueError(f"mode must be 'label' or 'probability', got {mode!r}.")
    seg = np.asarray(segmentation)
    if seg.ndim == 4:
        if mode == "probability":
            return {name: float(seg[c].sum(dtype=np.float64) * voxel_ml) for name, c in structures.items()}
        seg = seg.argmax(axis=0)
    elif seg.ndim != 3:
        raise ValueError(f"expected labels (X, Y, Z) or probabilities (M, X, Y, Z), got shape {seg.shape}.")
    counts = np.bincount(seg.astype(np.int64).ravel(), minlength=max(structures.values()) + 1)
    return {name: float(counts[c] * voxel_ml) for name, c in structures.items()}


def ejection_fraction(edv: float, esv: float) -> float:
    """``100 (EDV - ESV) / EDV``; NaN when the end-diastolic volume is not positive."""
    return 100.0 * (edv - esv) / edv if edv > 0 else math.nan


def cardiac_measures(ed: Mapping[str, float], es: Mapping[str, float] | None) -> dict[str, float]:
    """LV and RV end-diastolic / end-systolic / stroke volumes (ml), ejection fractions (%) and the LV
    myocardial mass at end-diastole (g) from per-frame :func:`class_volumes`. Without an ES frame the
    systolic measures are NaN."""
    nan = math.nan
    out = {
        "lv_edv_ml": ed["lv_blood_pool"],
        "rv_edv_ml": ed["rv_blood_pool"],
        "lv_mass_g": ed["lv_myocardium"] * MYOCARDIAL_DENSITY,
    }
    for side in ("lv", "rv"):
        esv = es[f"{side}_blood_pool"] if es is not None else nan
        edv = out[f"{side}_edv_ml"]
        out[f"{side}_esv_ml"] = esv
        out[f"{side}_sv_ml"] = edv - esv
        out[f"{side}_ef_pct"] = ejection_fraction(edv, esv) if es is not None else nan
    return {name: float(out[name]) for name in MEASURES}


def agreement(predicted: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Agreement of paired measurements (NaN pairs dropped): mean absolute error, bias (mean of
    predicted - reference), standard deviation of the differences, Bland-Altman 95 % limits of agreement,
    Pearson correlation (NaN for fewer than 2 pairs or no spread) and the means."""
    p = np.asarray(predicted, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"predicted and reference must pair up, got {p.shape} and {r.shape}.")
    keep = np.isfinite(p) & np.isfinite(r)
    p, r = p[keep], r[keep]
    n = int(p.size)
    nan = math.nan
    if n == 0:
        return {
            "n": 0,
            "mae": nan,
            "bias": nan,
            "sd_diff": nan,
            "loa_lower": nan,
            "loa_upper": nan,
            "pearson_r": nan,
            "mean_predicted": nan,
            "mean_reference": nan,
        }
    diff = p - r
    sd = float(diff.std(ddof=1)) if n > 1 else nan
    bias = float(diff.mean())
    if n > 1 and p.std() > 0 and r.std() > 0:
        pc, rc = p - p.mean(), r - r.mean()
        pearson = float((pc * rc).sum() / math.sqrt((pc**2).sum() * (rc**2).sum()))
    else:
        pearson = nan
    return {
        "n": n,
        "mae": float(np.abs(diff).mean()),
        "bias": bias,
        "sd_diff": sd,
        "loa_lower": bias - 1.96 * sd,
        "loa_upper": bias + 1.96 * sd,
        "pearson_r": pearson,
        "mean_predicted": float(p.mean()),
        "mean_reference": float(r.mean()),
    }


def agreement_table(
    predicted: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    measures: Iterable[str] = MEASURES,
) -> dict[str, dict[str, float]]:
    """:func:`agreement` of each measure over the subjects present in both ``{subject: {measure: value}}``."""
    subjects = sorted(set(predicted) & set(reference))
    return {m: agreement([predicted[s][m] for s in subjects], [reference[s][m] for s in subjects]) for m in measures}


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of dicts as CSV (columns in first-seen order; floats with 4 decimals)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return str(path)
