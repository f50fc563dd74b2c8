"""Where the written outputs are read from the network: near the heart, not over the whole field of view.

Sampling the segmentation is one network pass per output voxel, and a short-axis field of view is mostly
chest wall, liver and air: on ACDC frames the heart's structures lie within about 70 mm of the LV's long axis,
while the grid reaches 150-200 mm from it. With the heart frame known, voxels beyond ``radius_mm`` of its axis
(in the heart frame's plane) are written as background with intensity 0 without a network pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HeartRegion"]


@dataclass(frozen=True)
class HeartRegion:
    """The voxels read from the network: within ``radius_mm`` of the heart frame's long axis."""

    radius_mm: float = 100.0

    def __post_init__(self) -> None:
        if self.radius_mm <= 0:
            raise ValueError(f"radius_mm must be positive, got {self.radius_mm}.")

    def inside(self, points: torch.Tensor, extent_mm: float) -> torch.Tensor:
        """Which network coordinates ``(N, coord_dim)`` (heart frame, in units of ``extent_mm``) to read."""
        radius = self.radius_mm / float(extent_mm)
        return points[:, 0].square() + points[:, 1].square() <= radius * radius
