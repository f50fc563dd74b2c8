"""Masks of the voxels a latent code may be fitted to: hidden slices, sparse points, a mask from the datalist.

NISF fits a code to whatever voxels it is given and then reads the segmentation anywhere, so inference from a
subset of the data (every other slice, a few per cent of the voxels, a region a user trusts) only needs a
boolean ``mask`` key next to the image; :class:`~nisf_monai.engines.LatentOptimisationEvaluator` hands it to
:meth:`~nisf_monai.inferers.LatentOptimisationInferer.fit`, which copies only kept voxels into the
optimisation. The transforms here build or narrow that mask (each intersects with a mask already present,
e.g. one loaded from a ``mask`` image in the datalist), and :class:`MaskedScaleIntensityRangePercentilesd`
normalises intensities from the kept voxels alone, so hidden voxels influence nothing, not even the scaling.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile

from nisf_monai.errors import InvalidCaseError
from nisf_monai.transforms.validation import source_of

__all__ = [
    "MASK_KEY",
    "MaskedScaleIntensityRangePercentilesd",
    "RandPointMaskd",
    "SliceMaskd",
    "kept_slices",
    "slice_selection",
]

MASK_KEY = "mask"


def slice_selection(num_slices: int, keep: str | float | Sequence[int] = "every_other", offset: int = 0) -> np.ndarray:
    """Sorted indices of the slices to keep out of ``num_slices``.

    Args:
        num_slices: slices in the stack.
        keep: ``"all"``; ``"every_other"`` (slices ``offset, offset + 2, ...``: the others are hidden);
            a fraction in (0, 1] (that share of the slices, at least one, evenly spread: the slice nearest
            the centre of each of that many equal parts of the stack); or a list of slice indices (negative
            ones count from the end).
        offset: first kept slice for ``"every_other"`` (0 or 1).
    """
    if isinstance(keep, str):
        if keep == "all":
            return np.arange(num_slices)
        if keep == "every_other":
            if offset not in (0, 1):
                raise ValueError(f"offset for keep='every_other' must be 0 or 1, got {offset}.")
            return np.arange(offset, num_slices, 2)
        raise ValueError(
            f"keep must be 'all', 'every_other', a fraction in (0, 1] or a list of slice indices, got {keep!r}."
        )
    if isinstance(keep, (bool, int, np.integer)):
        raise ValueError(
            f"keep={keep!r} is ambiguous: give a fraction in (0, 1] (e.g. 1.0) "
            f"or a list of slice indices (e.g. [{keep}])."
        )
    if isinstance(keep, (float, np.floating)):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"the fraction of slices kept must be in (0, 1], got {keep}.")
        count = max(1, int(round(keep * num_slices)))
        centres = (np.arange(count) + 0.5) * num_slices / count - 0.5  # centres of ``count`` equal parts of the stack
        return np.unique(np.floor(centres + 0.5).astype(int))
    indices = np.asarray([int(i) for i in keep], dtype=int)
    if indices.size == 0 or np.any((indices < -num_slices) | (indices >= num_slices)):
        raise ValueError(
            f"slice indices to keep must be a non-empty list within a stack of {num_slices} slices, got {list(keep)}."
        )
    return np.unique(np.where(indices < 0, indices + num_slices, indices))


def kept_slices(mask: torch.Tensor | np.ndarray, axis: int = -1) -> np.ndarray:
    """Boolean per slice along ``axis`` of a ``(1, X, Y, Z)`` mask: whether the slice keeps any voxel."""
    array = np.asarray(torch.as_tensor(mask).detach().cpu()) != 0
    axis = axis % array.ndim
    other = tuple(a for a in range(array.ndim) if a != axis)
    return array.any(axis=other)


def _current_mask(
    data: Mapping[Hashable, Any], image_key: str, mask_key: str, affine_atol: float = 1e-3
) -> torch.Tensor | None:
    """The mask already in ``data`` as a boolean ``(1, X, Y, Z)`` tensor, checked against the image's grid."""
    if mask_key not in data or data[mask_key] is None:
        return None
    img, mask = data[image_key], data[mask_key]
    name = source_of(mask, str(mask_key)) if isinstance(mask, torch.Tensor) else str(mask_key)
    mask_t = (
        mask.as_tensor()
        if isinstance(mask, MetaTensor)
        else torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    )
    spatial = tuple(img.shape[1:])
    if tuple(mask_t.shape[-3:]) != spatial or mask_t.numel() != int(np.prod(spatial)):
        raise InvalidCaseError(
            f"{name}: mask shape {tuple(mask_t.shape)} differs from image shape {tuple(img.shape)}; "
            "the mask must be on the image grid."
        )
    if isinstance(mask, MetaTensor) and isinstance(img, MetaTensor):
        gap = float(
            (torch.as_tensor(mask.affine, dtype=torch.float64) - torch.as_tensor(img.affine, dtype=torch.float64))
            .abs()
            .max()
        )
        if gap > affine_atol:
            raise InvalidCaseError(
                f"{name}: mask affine differs from the image's by up to {gap:.3g} mm; "
                "resample the mask onto the image grid."
            )
    kept = mask_t.reshape(1, *spatial) != 0
    if not bool(kept.any()):
        raise InvalidCaseError(f"{name}: the mask keeps no voxel; there is nothing to fit the code to.")
    return kept


class SliceMaskd(MapTransform):
    """Adds ``mask_key``: True on the kept slices of the image, False on the hidden ones (intersected with
    a mask already present). With ``keep="every_other"`` the optimisation sees slices 0, 2, 4, ... and the
    segmentation of slices 1, 3, ... is pure interpolation by the network (NISF paper, Fig. 5).

    Args:
        image_key: the image ``(1, X, Y, Z)`` whose grid the mask follows.
        keep: which slices to keep, see :func:`slice_selection`.
        offset: first kept slice for ``"every_other"``.
        axis: spatial axis of the slices (-1: the last, the short-axis stack of SAX cine MRI).
        mask_key: where the mask goes.
    """

    def __init__(
        self,
        image_key: str = "image",
        keep: str | float | Sequence[int] = "every_other",
        offset: int = 0,
        axis: int = -1,
        mask_key: str = MASK_KEY,
    ) -> None:
        super().__init__(image_key)
        if isinstance(keep, (str, float, int)):
            slice_selection(3, keep, offset)  # bad names, fractions and offsets fail here rather than per case
        self.image_key, self.keep, self.offset, self.axis, self.mask_key = (
            image_key,
            keep,
            int(offset),
            int(axis),
            mask_key,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.image_key]
        spatial = tuple(img.shape[1:])
        axis = self.axis % len(spatial)
        try:
            keep = slice_selection(spatial[axis], self.keep, self.offset)
        except ValueError as err:
            raise InvalidCaseError(f"{source_of(img, str(d.get('case', self.image_key)))}: {err}") from None
        per_slice = torch.zeros(spatial[axis], dtype=torch.bool)
        per_slice[torch.as_tensor(keep)] = True
        view = [1] * len(spatial)
        view[axis] = spatial[axis]
        mask = per_slice.reshape(1, *view).expand(1, *spatial).clone()
        current = _current_mask(d, self.image_key, self.mask_key)
        d[self.mask_key] = mask if current is None else mask & current
        return d


class RandPointMaskd(Randomizable, MapTransform):
    """Keeps a random ``fraction`` of the voxels (of those a mask already present keeps), drawn without
    replacement; the mask goes to ``mask_key``. ``fraction=1.0`` keeps them all. Seeded with
    ``set_random_state`` (``seed``), so a run over the same cases in the same order is repeatable.

    Args:
        image_key: the image ``(1, X, Y, Z)``.
        fraction: share of the voxels kept, in (0, 1] (at least one voxel is kept).
        mask_key: where the mask goes.
        seed: seeds the draws.
    """

    def __init__(
        self, image_key: str = "image", fraction: float = 1.0, mask_key: str = MASK_KEY, seed: int | None = 0
    ) -> None:
        MapTransform.__init__(self, image_key)
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"the fraction of points kept must be in (0, 1], got {fraction}.")
        self.image_key, self.fraction, self.mask_key = image_key, float(fraction), mask_key
        self.set_random_state(seed)

    def randomize(self, data: int) -> np.ndarray:
        """Indices (into the kept voxels, ``data`` of them) that stay kept."""
        count = max(1, int(round(self.fraction * data)))
        return np.sort(self.R.choice(data, count, replace=False))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spatial = tuple(d[self.image_key].shape[1:])
        current = _current_mask(d, self.image_key, self.mask_key)
        if current is None:
            current = torch.ones((1, *spatial), dtype=torch.bool)
        if self.fraction >= 1.0:
            d[self.mask_key] = current
            return d
        kept = current.reshape(-1).nonzero().squeeze(1)
        chosen = kept[torch.as_tensor(self.randomize(int(kept.numel())))]
        mask = torch.zeros(current.numel(), dtype=torch.bool)
        mask[chosen] = True
        d[self.mask_key] = mask.reshape(1, *spatial)
        return d


class MaskedScaleIntensityRangePercentilesd(MapTransform):
    """``ScaleIntensityRangePercentilesd`` whose percentiles come from the voxels ``mask_key`` keeps, so
    hidden voxels do not move the normalisation of the ones the code is fitted to. Without a mask it
    equals MONAI's transform (all voxels kept). Arguments as MONAI's, plus ``mask_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        lower: float,
        upper: float,
        b_min: float | None,
        b_max: float | None,
        clip: bool = False,
        mask_key: str = MASK_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower <= upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower <= upper <= 100, got {lower}, {upper}.")
        self.lower, self.upper, self.b_min, self.b_max, self.clip, self.mask_key = (
            lower,
            upper,
            b_min,
            b_max,
            clip,
            mask_key,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mask = _current_mask(d, key, self.mask_key)
            values = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
            if mask is not None:
                values = values[mask.reshape(values.shape).to(values.device)]
            a_min, a_max = float(percentile(values, self.lower)), float(percentile(values, self.upper))
            d[key] = ScaleIntensityRange(a_min, a_max, self.b_min, self.b_max, self.clip)(img)
        return d
