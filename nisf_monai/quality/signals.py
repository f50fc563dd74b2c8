"""Signals of a segmentation's quality that need no ground truth: how two independent answers agree, and whether
the shape is a heart's.

NISF's code and the heart localiser reach their labels by different routes (a fitted code decoded by an MLP; a
2D UNet slice by slice), so where they disagree at least one of them is wrong. A correct short-axis segmentation
also has a known shape: the LV blood pool ringed by myocardium, one piece per structure, no slice in the middle
of the ventricle where it vanishes. Every signal here is computed on the voxel grid of the image as given, so
describing the same voxels with another affine (a rotated or shifted scanner frame) leaves them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.measure import label as connected_components

__all__ = ["class_agreement", "lv_enclosure", "lv_gap_slices", "shape_signals", "structure_pieces"]


def class_agreement(first: np.ndarray, second: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice overlap of two label maps, per class in ``classes``; a class absent from both agrees fully (1.0)."""
    found = {}
    for c in classes:
        a, b = first == c, second == c
        total = int(a.sum()) + int(b.sum())
        found[int(c)] = 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total
    return found


def _in_plane_border(mask: np.ndarray) -> np.ndarray:
    """Voxels next to ``mask`` (4-neighbours within each slice, the last axis being the slice axis) but not in it."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def lv_enclosure(labels: np.ndarray, lv: int, myocardium: int) -> float:
    """Fraction of the voxels bordering the LV blood pool in its slices that are myocardium: near 1 when the wall
    rings the cavity as it should, low when the cavity touches background or the RV. 0.0 without an LV."""
    border = _in_plane_border(labels == lv)
    count = int(border.sum())
    return float((labels[border] == myocardium).sum()) / count if count else 0.0


def structure_pieces(labels: np.ndarray, classes: Sequence[int]) -> dict[int, int]:
    """Number of 3D connected pieces (26-connectivity) of each class: one for a heart's structure."""
    return {int(c): int(connected_components(labels == c, connectivity=3).max()) for c in classes}


def lv_gap_slices(labels: np.ndarray, lv: int) -> int:
    """Slices between the first and last slice holding LV blood pool that hold none: a ventricle vanishing
    mid-stack, which a heart does not do."""
    present = (labels == lv).reshape(-1, labels.shape[-1]).any(axis=0)
    where = np.flatnonzero(present)
    return 0 if len(where) == 0 else int((~present[where[0] : where[-1] + 1]).sum())


def shape_signals(labels: np.ndarray, lv: int = 1, myocardium: int = 2, rv: int = 3) -> dict[str, float]:
    """The shape checks of one label map ``(X, Y, Z)`` (slices along the last axis), as one flat dict."""
    pieces = structure_pieces(labels, (lv, myocardium, rv))
    return {
        "lv_enclosure": lv_enclosure(labels, lv, myocardium),
        "lv_gap_slices": float(lv_gap_slices(labels, lv)),
        "extra_pieces": float(sum(max(n - 1, 0) for n in pieces.values())),
        "missing_structures": float(sum(n == 0 for n in pieces.values())),
    }
