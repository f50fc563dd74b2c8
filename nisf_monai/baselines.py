"""Label-interpolation baselines for slices hidden from the latent fit, and their scoring.

NISF's latent code is fitted to some slices of a stack (``SliceMaskd``) and the network then segments the
hidden slices between them (the paper's Fig. 5). Two classical baselines see the *ground-truth labels* of the
kept slices, which is more than NISF gets (it sees only their intensities):

- :func:`nearest_slice_labels`: each hidden slice copies the labels of the nearest kept slice (ties: the
  lower slice);
- :func:`shape_based_labels`: shape-based interpolation (Raya & Udupa 1990; Herman et al. 1992): per class,
  the signed distance maps of the two kept slices around a hidden slice are blended linearly by the slice's
  position between them, and each voxel takes the class that it lies deepest inside.

:func:`hidden_slice_dice` scores a segmentation on the hidden slices (:func:`scored_slices`);
:class:`~nisf_monai.handlers.HiddenSliceReport` scores NISF and both baselines in a bundle run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric

__all__ = [
    "hidden_slice_dice",
    "nearest_slice_labels",
    "scored_slices",
    "shape_based_labels",
    "signed_distance",
]

_FAR = 1e6  # mm; stands for "no boundary in this slice"


def _kept_indices(kept: Sequence[int] | np.ndarray, num_slices: int) -> np.ndarray:
    kept = np.asarray(kept)
    index = np.flatnonzero(kept) if kept.dtype == bool else np.unique(kept.astype(int))
    if index.size == 0 or index.min() < 0 or index.max() >= num_slices:
        raise ValueError(f"kept slices must be a non-empty selection of {num_slices} slices, got {kept.tolist()}.")
    return index


def scored_slices(kept: Sequence[int] | np.ndarray, num_slices: int, include_extrapolated: bool = False) -> np.ndarray:
    """Hidden slices to score: those not kept, by default only those with kept slices on both sides
    (interpolation; beyond the last kept slice the baselines can only copy it)."""
    index = _kept_indices(kept, num_slices)
    hidden = np.setdiff1d(np.arange(num_slices), index)
    if include_extrapolated:
        return hidden
    return hidden[(hidden > index.min()) & (hidden < index.max())]


def nearest_slice_labels(label: np.ndarray, kept: Sequence[int] | np.ndarray, axis: int = -1) -> np.ndarray:
    """``label`` with every slice not in ``kept`` (indices or a boolean per slice) replaced by the labels of
    the nearest kept slice along ``axis``; on a tie (midway) the lower slice wins."""
    label = np.asarray(label)
    moved = np.moveaxis(label, axis, -1)
    index = _kept_indices(kept, moved.shape[-1])
    nearest = index[
        np.argmin(np.abs(np.arange(moved.shape[-1])[:, None] - index[None, :]), axis=1)
    ]  # first minimum: lower
    return np.moveaxis(moved[..., nearest], -1, axis)


def signed_distance(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Signed Euclidean distance (mm) of a 2D mask's pixels to its boundary: negative inside (minus the
    distance to the nearest outside pixel), positive outside (the distance to the nearest inside pixel),
    so the zero level lies midway between inside and outside pixel centres. ``spacing`` is per array
    axis. An empty mask is ``+1e6`` everywhere, a full one ``-1e6``. Exact (separable, see :func:`_distance_to`)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"signed_distance expects a 2D mask, got shape {mask.shape}.")
    if not mask.any():
        return np.full(mask.shape, _FAR, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -_FAR, dtype=np.float32)
    return (_distance_to(mask, spacing) - _distance_to(~mask, spacing)).astype(np.float32)


def _distance_to(mask: np.ndarray, spacing: Sequence[float], chunk: int = 16) -> np.ndarray:
    """Exact Euclidean distance (mm) from each pixel to the nearest pixel of a non-empty 2D ``mask`` (0 on
    it), separably: the distance along axis 1 to the mask within each row, then, per pixel, the minimum
    over rows ``x'`` of ``((x - x') s0)^2 + (that distance in row x')^2`` (a min-plus product, in chunks)."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    index = torch.arange(m.shape[1], dtype=torch.float64).expand_as(m)
    inf = torch.full_like(index, float("inf"))
    before = torch.cummax(torch.where(m, index, -inf), dim=1).values  # last mask pixel at or before y
    after = torch.cummin(torch.where(m, index, inf).flip(1), dim=1).values.flip(1)  # first at or after y
    along = torch.minimum(index - before, after - index) * float(spacing[1])  # (X, Y), inf in empty rows
    rows = torch.arange(m.shape[0], dtype=torch.float64) * float(spacing[0])
    squared = along.square()
    out = torch.empty_like(squared)
    for start in range(0, m.shape[0], chunk):
        across = (rows[start : start + chunk, None] - rows[None, :]).square()  # (c, X')
        out[start : start + chunk] = (across[:, :, None] + squared[None]).min(dim=1).values
    return out.sqrt().numpy()


def shape_based_labels(
    label: np.ndarray,
    kept: Sequence[int] | np.ndarray,
    num_classes: int,
    axis: int = -1,
    spacing: Sequence[float] = (1.0, 1.0),
) -> np.ndarray:
    """Shape-based interpolation of the slices not in ``kept`` from the kept slices' labels.

    For a hidden slice at ``z`` between kept slices ``z0 < z < z1`` (weight ``w = (z - z0) / (z1 - z0)``, the
    slices of a grid being evenly spaced): per foreground class, ``d = (1 - w) d0 + w d1`` with ``d0, d1``
    the in-plane signed distance maps (:func:`signed_distance`, ``spacing`` in mm of the two in-plane
    axes in array order); the voxel takes the class with the lowest ``d`` if that is negative (inside),
    else background. A class present in only one of the two slices tapers to nothing at the other: its
    missing map is the present one shifted by its deepest inside distance, i.e. the shape erodes linearly.
    Slices outside the kept range copy the nearest kept slice. Kept slices are returned unchanged.
    """
    label = np.asarray(label)
    moved = np.moveaxis(label, axis, -1)
    num_slices = moved.shape[-1]
    index = _kept_indices(kept, num_slices)
    out = nearest_slice_labels(moved, index, axis=-1).copy()
    maps: dict[int, list[np.ndarray | None]] = {}  # kept slice -> per-class distance map (None: class absent)
    for z in scored_slices(index, num_slices):
        z0, z1 = index[index < z].max(), index[index > z].min()
        for k in (z0, z1):
            if k not in maps:
                maps[k] = [
                    signed_distance(moved[..., k] == c, spacing) if (moved[..., k] == c).any() else None
                    for c in range(1, num_classes)
                ]
        w = (z - z0) / (z1 - z0)
        blended = np.full((num_classes - 1, *moved.shape[:-1]), _FAR, dtype=np.float64)
        for c in range(num_classes - 1):
            d0, d1 = maps[z0][c], maps[z1][c]
            if d0 is None and d1 is None:
                continue
            if d0 is None:
                d0 = d1 - d1.min()  # vanishes at z0: min over the slice is 0, nothing strictly inside
            if d1 is None:
                d1 = d0 - d0.min()
            blended[c] = (1.0 - w) * d0 + w * d1
        best = np.argmin(blended, axis=0)  # first minimum: the lower class on a tie
        inside = np.take_along_axis(blended, best[None], axis=0)[0] < 0
        out[..., z] = np.where(inside, best + 1, 0).astype(out.dtype)
    return np.moveaxis(out, -1, axis)


def hidden_slice_dice(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    slices: Sequence[int],
    num_classes: int,
    axis: int = -1,
) -> np.ndarray:
    """Dice per foreground class over the given slices together (one 3D stack of them), by MONAI's
    ``DiceMetric`` on one-hot ``[1, C, ...]`` (background excluded; NaN where the class is absent from the
    ground truth of those slices)."""
    slices = torch.as_tensor(np.asarray(slices, dtype=np.int64))
    p = torch.as_tensor(np.asarray(pred)).long().movedim(axis, -1)[..., slices]
    g = torch.as_tensor(np.asarray(label)).long().movedim(axis, -1)[..., slices]
    onehot = lambda x: F.one_hot(x, num_classes).movedim(-1, 0)[None].float()  # noqa: E731
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    return metric(onehot(p), onehot(g))[0].numpy().astype(np.float64)
