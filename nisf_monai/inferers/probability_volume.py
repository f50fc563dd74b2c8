"""Class probabilities known on one image's grid, read at any world position.

The heart locator's localiser predicts class probabilities on the slices of the input image. Mixed into the
segmentation that NISF samples (``LatentOptimisationInferer(localiser_blend=...)``) they must be read wherever
the output grid puts a voxel: on the input's own slices, between them at a finer spacing, or beyond the stack.
:class:`ProbabilityVolume` reads them trilinearly in world millimetres and says how much each read can be
trusted: 1 on voxels the localiser saw, falling linearly to 0 within one voxel beyond the grid and towards
voxels a mask left out (hidden slices), so those keep NISF's own answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

__all__ = ["ProbabilityVolume"]


class ProbabilityVolume:
    """Class probabilities ``(M, X, Y, Z)`` on a grid with voxel-to-world ``affine`` (millimetres), read at
    world points by :meth:`at`.

    Args:
        probabilities: per-voxel class probabilities ``(M, X, Y, Z)``, summing to 1 over the classes.
        affine: 4 x 4 voxel-to-world matrix of their grid.
        kept: optional boolean ``(X, Y, Z)`` (or any shape with that many voxels): False where the
            probabilities must not be used (voxels hidden from the fit).
    """

    def __init__(self, probabilities: torch.Tensor, affine: Any, kept: torch.Tensor | None = None) -> None:
        probs = _plain(probabilities).float().cpu()
        if probs.dim() != 4:
            raise ValueError(f"probabilities must be (M, X, Y, Z), got shape {tuple(probs.shape)}.")
        weight = torch.ones((1, *probs.shape[1:]))
        if kept is not None:
            weight = _plain(kept).reshape(weight.shape).float().cpu()
        # one voxel of zeros round the grid: reads fade to zero weight within a voxel beyond it, single slices too
        self.volume = F.pad(torch.cat([probs * weight, weight])[None], (1, 1, 1, 1, 1, 1))
        self.world_to_index = torch.linalg.inv(torch.as_tensor(np.asarray(affine, dtype=np.float64)))
        self.padded_shape = torch.as_tensor(self.volume.shape[2:], dtype=torch.float64)

    def at(self, world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities ``(M, N)`` and their weight ``(N,)`` in [0, 1] at world positions ``(N, 3)`` (mm).
        Where the weight is 0 the probabilities are uniform (nothing is known there)."""
        world = torch.as_tensor(world, dtype=torch.float64)
        index = world @ self.world_to_index[:3, :3].T + self.world_to_index[:3, 3] + 1.0  # +1: the padding
        normalised = 2.0 * index / (self.padded_shape - 1.0) - 1.0
        grid = normalised.flip(-1).float().reshape(1, 1, 1, -1, 3)  # grid_sample reads (z, y, x) order
        read = F.grid_sample(self.volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        read = read.reshape(self.volume.shape[1], -1)
        weighted, weight = read[:-1], read[-1].clamp(0.0, 1.0)
        num_classes = weighted.shape[0]
        probs = torch.where(
            weight > 1e-6, weighted / weight.clamp_min(1e-6), torch.full_like(weighted, 1.0 / num_classes)
        )
        return probs, weight


def _plain(data: Any) -> torch.Tensor:
    """A torch tensor without MetaTensor's metadata (none of it is needed here)."""
    return data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)
