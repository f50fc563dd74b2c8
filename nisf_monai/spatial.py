"""What a 4 x 4 voxel-to-world affine says about a grid: the one home of these small helpers.

A voxel ``(i, j, k)`` lies at ``affine @ [i, j, k, 1]`` in world millimetres (RAS, as MONAI loads it); the
columns of ``affine[:3, :3]`` are the voxel axes, their lengths the voxel sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["affine_array", "index_to_world", "voxel_sizes", "voxel_volume_ml"]


def affine_array(image: Any) -> np.ndarray:
    """The 4 x 4 affine of a MetaTensor (or an affine given as a tensor or array) as float64 numpy, wherever
    the tensor lives; of a batch's affines ``(B, 4, 4)``, the first."""
    affine = torch.as_tensor(getattr(image, "affine", image)).detach().cpu().numpy().astype(np.float64)
    return affine[0] if affine.ndim == 3 else affine


def voxel_sizes(affine: Any) -> np.ndarray:
    """Lengths (mm) of the three voxel axes of an affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def voxel_volume_ml(affine: Any) -> float:
    """Volume of one voxel in millilitres (mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0)


def index_to_world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World coordinates ``(N, 3)`` of (continuous) voxel indices ``(N, 3)``. Written as explicit sums: numpy's
    matmul is slow for 3 columns."""
    i, j, k = index[:, 0], index[:, 1], index[:, 2]
    return np.stack([i * affine[c, 0] + j * affine[c, 1] + k * affine[c, 2] + affine[c, 3] for c in range(3)], axis=-1)
