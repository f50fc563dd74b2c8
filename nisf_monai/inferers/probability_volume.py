"""Class probabilities known on one image's grid, read at any world position.

The heart locator's localiser predicts class probabilities on the slices of the input image. Mixed into the
segmentation that NISF samples (:class:`~nisf_monai.inferers.output_blend.LocaliserBlend`) they must be read
wherever the output grid puts a voxel: on the input's own slices, between them at a finer spacing, or beyond the
stack.
:class:`ProbabilityVolume` reads them trilinearly in world millimetres and says how much each read can be
trusted: 1 on voxels the localiser saw, falling linearly to 0 within one voxel beyond the grid and towards
voxels a mask left out (hidden slices), so those keep NISF's own answer. With ``bridge_hidden`` the hidden voxels
that lie between kept ones along the slice axis read instead the kept neighbours' probabilities, interpolated
linearly across the gap, at full weight.
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
        bridge_hidden: fill each hidden voxel that has kept voxels on both sides along the last grid axis (the
            slice axis of a short-axis stack) with their probabilities, interpolated linearly by index (slices
            are equally spaced), and trust it fully; hidden voxels beyond the first or last kept one still fade
            to NISF alone. Only ``kept`` voxels are ever read, so nothing hidden leaks in.
    """

    def __init__(
        self,
        probabilities: torch.Tensor,
        affine: Any,
        kept: torch.Tensor | None = None,
        bridge_hidden: bool = False,
    ) -> None:
        probs = _plain(probabilities).float().cpu()
        if probs.dim() != 4:
            raise ValueError(f"probabilities must be (M, X, Y, Z), got shape {tuple(probs.shape)}.")
        weight = torch.ones((1, *probs.shape[1:]))
        if kept is not None:
            weight = _plain(kept).reshape(weight.shape).float().cpu()
            if bridge_hidden:
                probs, weight = _bridged(probs, weight[0] > 0.5)
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


def _bridged(probs: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` ``(M, X, Y, Z)`` with every hidden voxel between two kept ones along the last axis replaced by
    the linear interpolation of those two, and the weight ``(1, X, Y, Z)``: 1 on kept and bridged voxels, 0
    elsewhere."""
    depth = kept.shape[-1]
    index = torch.arange(depth).expand_as(kept)
    below = torch.where(kept, index, -1).cummax(-1).values  # nearest kept index at or below, -1 if none
    above = torch.where(kept, index, depth).flip(-1).cummin(-1).values.flip(-1)  # at or above, depth if none
    bridged = ~kept & (below >= 0) & (above < depth)
    low, high = below.clamp(0, depth - 1), above.clamp(0, depth - 1)
    share = ((index - low) / (high - low).clamp_min(1)).to(probs.dtype)  # 0 at the kept voxel below, 1 above
    filled = probs.gather(-1, low.expand_as(probs)) * (1.0 - share) + probs.gather(-1, high.expand_as(probs)) * share
    probs = torch.where(bridged[None], filled, probs)
    return probs, (kept | bridged).to(probs.dtype)[None]


def _plain(data: Any) -> torch.Tensor:
    """A torch tensor without MetaTensor's metadata (none of it is needed here)."""
    return data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)
