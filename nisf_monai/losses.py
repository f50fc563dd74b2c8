"""The NISF training objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["NISFLoss", "intensity_loss"]


def intensity_loss(intensity_logit: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """BCE between the sigmoid of the intensity logit and a target intensity in [0, 1] (mean over points)."""
    return F.binary_cross_entropy_with_logits(intensity_logit, intensity.to(intensity_logit.dtype).clamp(0.0, 1.0))


class NISFLoss(nn.Module):
    """``dice + bce(seg) + alpha * bce(intensity) + latent_weight * mean(h^2)``.

    - ``dice``: MONAI ``DiceLoss`` on the softmax, background included, averaged over classes.
    - ``bce(seg)``: per-class binary cross-entropy of the softmax probabilities against the one-hot label.
    - ``bce(intensity)``: binary cross-entropy of the reconstructed intensity (alpha = 10 in the paper).
    - L2 on the batch's latent codes. The L2 on network weights is the optimizer's ``weight_decay``.

    ``dice_weight`` and ``bce_weight`` scale the two segmentation terms (1 in the paper).

    ``labelled`` (optional, ``(B,)`` booleans) marks the samples that have a manual label: the segmentation terms
    are taken over those alone, so the frames of a cine without a label train the intensity head only (and a batch
    with no labelled sample has segmentation terms of 0).

    Shapes (channel-first point sets or volumes): ``seg_logits (B, M, *S)``, ``intensity_logit (B, 1, *S)``,
    ``label (B, 1, *S)`` class indices, ``intensity (B, 1, *S)`` in [0, 1], ``latents (B, L)``.
    ``self.terms`` holds the last call's unweighted terms (floats) for logging: ``dice``, ``bce_seg``,
    ``bce_intensity`` and ``latent_l2``.
    """

    def __init__(
        self, alpha: float = 10.0, latent_weight: float = 1e-4, dice_weight: float = 1.0, bce_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.latent_weight = latent_weight
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.dice = DiceLoss(include_background=True, to_onehot_y=True, softmax=True)
        self.terms: dict[str, float] = {}

    def forward(
        self,
        seg_logits: torch.Tensor,
        intensity_logit: torch.Tensor,
        label: torch.Tensor,
        intensity: torch.Tensor,
        latents: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        label = label.long()
        if label.shape[0] != seg_logits.shape[0] or label.shape[1] != 1 or label.shape[2:] != seg_logits.shape[2:]:
            raise ValueError(
                f"label must be (B, 1, *spatial) matching {tuple(seg_logits.shape)}, got {tuple(label.shape)}."
            )
        if labelled is not None:
            keep = torch.as_tensor(labelled, dtype=torch.bool, device=seg_logits.device).reshape(-1)
            seg_logits, label = seg_logits[keep], label[keep]
        if seg_logits.shape[0]:
            dice, bce_seg = self._segmentation_terms(seg_logits, label)
        else:
            dice = bce_seg = seg_logits.new_zeros((), dtype=torch.float32)
        bce_intensity = intensity_loss(intensity_logit.float(), intensity)
        latent_l2 = latents.float().pow(2).mean()
        total = (
            self.dice_weight * dice
            + self.bce_weight * bce_seg
            + self.alpha * bce_intensity
            + self.latent_weight * latent_l2
        )
        self.terms = {
            "dice": float(dice.detach()),
            "bce_seg": float(bce_seg.detach()),
            "bce_intensity": float(bce_intensity.detach()),
            "latent_l2": float(latent_l2.detach()),
        }
        return total

    def _segmentation_terms(self, seg_logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft Dice and per-class BCE of the softmax against the one-hot label."""
        probs = torch.softmax(seg_logits.float(), dim=1)
        onehot = F.one_hot(label[:, 0], seg_logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        eps = 1e-6
        dice = self.dice(seg_logits.float(), label)
        bce_seg = F.binary_cross_entropy(probs.clamp(eps, 1.0 - eps), onehot)
        return dice, bce_seg
