"""Fine sampling grids over an image's slab, and a region of interest within them.

Clinical volumes of a short-axis stack are disc sums: each voxel stands for its whole footprint, a slab
of one slice thickness. A fine grid for measuring therefore covers the voxels' footprints (from index
-0.5 to n - 0.5 on every axis), not just the span between the first and last voxel centres that MONAI's
``Spacing`` keeps: that would cut half a slice (4-5 mm of ventricle) at the base and at the apex. Fine
voxels keep the input's axis directions, with a spacing adjusted so that a whole number of them fills
the slab, so a label map resampled to the fine grid by nearest neighbour has the disc-sum volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nisf_monai.inferers.cases import spacing_triple
from nisf_monai.spatial import voxel_sizes, voxel_volume_ml

__all__ = ["footprint_grid", "roi_slices", "sub_grid", "voxel_sizes", "voxel_volume_ml"]


def footprint_grid(
    affine: Any, spatial_shape: Sequence[int], spacing: float | Sequence[float] | None
) -> tuple[np.ndarray, list[int]]:
    """Affine and shape of a grid nested in the grid ``(affine, spatial_shape)``: every voxel split into
    ``k`` along each axis, with the smallest ``k`` that brings the voxel size ``d`` to ``spacing`` or below
    (``d / k``; e.g. 1.56 mm -> 0.78 mm and 10 mm -> 1 mm for ``spacing=1``). Same axis directions, same
    footprint, and no fine voxel straddles two acquired ones, so a label map read by nearest neighbour
    keeps its disc-sum volume exactly. A ``spacing`` larger than a voxel keeps that axis as it is, unless
    it is at least twice the voxel: then whole voxels are merged where the axis length allows it (a
    coarse pass). ``spacing=None`` returns the input grid."""
    affine = np.asarray(affine, dtype=np.float64)
    shape = np.asarray([int(s) for s in spatial_shape], dtype=np.int64)
    if spacing is None:
        return affine.copy(), shape.tolist()
    sizes = voxel_sizes(affine)
    target = spacing_triple(spacing, name="spacing")
    split = np.maximum(1, np.ceil(sizes / target - 1e-6)).astype(np.int64)
    counts = shape * split
    coarse = target >= 2 * sizes * (1 - 1e-6)  # a coarse grid: tile the footprint with cells of about ``spacing``
    counts = np.where(coarse, np.maximum(1, np.round(shape * sizes / target)).astype(np.int64), counts)
    ratio = shape / counts  # input voxels per fine voxel along each axis
    fine = np.eye(4)
    fine[:3, :3] = affine[:3, :3] * ratio[None, :]
    start = -0.5 + 0.5 * ratio  # input index of the first fine voxel's centre
    fine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return fine, counts.tolist()


def sub_grid(affine: Any, lower: Sequence[int], upper: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Affine and shape of the block ``[lower, upper)`` (voxel indices) of a grid."""
    affine = np.asarray(affine, dtype=np.float64)
    lower_v = np.asarray(lower, dtype=np.float64)
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ lower_v + affine[:3, 3]
    return out, [int(u) - int(lo) for lo, u in zip(lower, upper)]


def roi_slices(
    mask: np.ndarray, mask_affine: Any, grid_affine: Any, grid_shape: Sequence[int], margin_mm: float
) -> tuple[list[int], list[int]] | None:
    """Index bounds ``(lower, upper)`` of the block of a grid that holds every voxel of ``mask`` (a boolean
    array on the grid ``mask_affine``, e.g. a coarse foreground) with ``margin_mm`` to spare, clipped to the
    grid; None when the mask is empty. Both grids must share axis directions (as from :func:`footprint_grid`)."""
    index = np.argwhere(np.asarray(mask, dtype=bool))
    if len(index) == 0:
        return None
    mask_affine = np.asarray(mask_affine, dtype=np.float64)
    grid_affine = np.asarray(grid_affine, dtype=np.float64)
    to_grid = np.linalg.inv(grid_affine) @ mask_affine  # mask index -> grid index (diagonal up to rounding)
    half_cell = 0.5 * np.abs(to_grid[:3, :3]).sum(axis=1)  # half a mask voxel, in grid voxels
    margin = margin_mm / voxel_sizes(grid_affine)
    corners = np.array([index.min(axis=0), index.max(axis=0)], dtype=np.float64)
    mapped = corners @ to_grid[:3, :3].T + to_grid[:3, 3]
    low = mapped.min(axis=0) - half_cell - margin
    high = mapped.max(axis=0) + half_cell + margin
    shape = np.asarray([int(s) for s in grid_shape])
    lower = np.clip(np.floor(low + 0.5), 0, shape).astype(int)  # grid voxel g spans [g - 0.5, g + 0.5]
    upper = np.clip(np.ceil(high + 0.5), 0, shape).astype(int)
    if np.any(upper <= lower):
        return None
    return lower.tolist(), upper.tolist()
