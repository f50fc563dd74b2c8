"""Postprocessing shared by the bundle's evaluator and MONAI Label: class probabilities become label maps."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ProbabilitiesToLabelsd"]


class ProbabilitiesToLabelsd(MapTransform):
    """Class probabilities ``(M, *S)`` (M > 1) become uint8 labels ``(1, *S)`` by argmax; a tensor with one
    channel is already a label map and passes unchanged. The metadata (affine) is kept.

    ``LatentOptimisationInferer.__call__`` (used by MONAI Label) returns probabilities; the bundle's
    evaluator (``fit_and_sample``) returns labels. With this transform first, one ``postprocessing``
    serves both. A batched MetaTensor ``(B, C, *S)`` (``is_batch``) is reduced over its dim 1, anything
    else over dim 0.

    Args:
        keys: prediction keys.
    """

    def __init__(self, keys: KeysCollection = "pred", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if not isinstance(pred, torch.Tensor):
                pred = torch.as_tensor(pred)
            channel_dim = 1 if getattr(pred, "is_batch", False) else 0
            if pred.shape[channel_dim] > 1:
                pred = pred.argmax(dim=channel_dim, keepdim=True).to(torch.uint8)
            d[key] = pred
        return d
