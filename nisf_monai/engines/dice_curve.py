"""Dice against the latent-optimisation step, on a fixed subset of each case's voxels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from nisf_monai.transforms.coordinates import CoordinateMapping

__all__ = ["DiceCurveRecorder", "dice_per_class"]


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of each foreground class ``1..num_classes-1`` between two label arrays of one shape; NaN where
    the class is absent from both (MONAI's ``ignore_empty`` convention)."""
    scores = torch.full((num_classes - 1,), float("nan"))
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        total = int(p.sum()) + int(g.sum())
        if int(g.sum()) > 0:
            scores[c - 1] = 2.0 * int((p & g).sum()) / total
    return scores


class DiceCurveRecorder:
    """Records each case's Dice every few latent steps, for choosing the number of steps (NISF's early
    stopping). Dice is estimated on ``num_points`` voxels drawn once per case, uniformly, so a record costs
    one forward pass over them rather than a whole volume; a uniform subset gives the whole volume's Dice
    in expectation as a ratio of counts.

    Args:
        network: the frozen network.
        images: the cases' images ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` MetaTensors (for their grids).
        labels: their label arrays, same shapes.
        frames: each case's :class:`CoordinateMapping` (``inferer.frame_of(image)``).
        num_classes: classes including background.
        num_points: voxels per case (all voxels when the case has fewer).
        seed: seeds the subset.
    """

    def __init__(
        self,
        network: nn.Module,
        images: Sequence[MetaTensor],
        labels: Sequence[torch.Tensor],
        frames: Sequence[CoordinateMapping],
        num_classes: int,
        num_points: int = 32768,
        seed: int = 0,
    ) -> None:
        self.network = network
        self.num_classes = num_classes
        generator = torch.Generator().manual_seed(seed)
        self.points, self.truth = [], []
        for image, label, mapping in zip(images, labels, frames):
            shape = image.shape[-3:]
            total = int(np.prod(shape))
            index = torch.randperm(total, generator=generator)[: min(num_points, total)]
            index = torch.sort(index).values
            world_index = torch.stack(torch.unravel_index(index, tuple(shape)), dim=-1).to(torch.float64)
            self.points.append(mapping.from_world(mapping.index_to_world(world_index)).T.to(image.device))
            self.truth.append(torch.as_tensor(label).reshape(-1)[index].long().cpu())
        self.steps: list[int] = []
        self.curves: list[list[torch.Tensor]] = [[] for _ in self.points]

    @torch.no_grad()
    def __call__(self, step: int, latent: torch.Tensor) -> None:
        self.steps.append(int(step))
        for b, (points, truth) in enumerate(zip(self.points, self.truth)):
            seg = self.network.forward_heads(points[None], latent[b : b + 1])[0]
            self.curves[b].append(dice_per_class(seg.argmax(dim=1)[0].cpu(), truth, self.num_classes))

    def curve(self, case: int) -> dict[str, list]:
        """``{"steps": [...], "dice": [[per-class Dice] per step]}`` of one case (plain types)."""
        return {"steps": list(self.steps), "dice": torch.stack(self.curves[case]).tolist()}
