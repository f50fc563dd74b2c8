"""The cases a latent fit is given: checked, split one per code, masked, grouped into cines, and the grids their
outputs are written on. Kept apart from the fit so the inferer's parts and handlers read cases the same way."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, to_affine_nd, zoom_affine
from torch import nn

from nisf_monai.transforms.coordinates import CINE_COORD_DIM, PHASE_KEY, phase_of

__all__ = [
    "CaseMasks",
    "as_meta",
    "case_masks",
    "check_phases",
    "checked_batch",
    "code_groups",
    "grid_affine",
    "reference_case",
    "spacing_triple",
    "split_cases",
    "target_grid",
]

logger = logging.getLogger("nisf_monai")

CaseMasks = torch.Tensor | Sequence[torch.Tensor | None] | None


def target_grid(
    affine: Any, spatial_shape: Sequence[int], spacing: Sequence[float] | None
) -> tuple[np.ndarray, list[int]]:
    """Affine and shape of the grid at ``spacing`` (mm) over the same physical extent as the input, computed
    as MONAI's ``Spacing`` computes its output grid (same axes directions, ``diagonal=False``,
    ``scale_extent=False``). ``spacing=None`` keeps the input grid."""
    affine = to_affine_nd(3, np.asarray(affine, dtype=np.float64))
    shape = [int(s) for s in spatial_shape]
    if spacing is None:
        return affine, shape
    pixdim = spacing_triple(spacing)
    new_affine = zoom_affine(affine, pixdim, diagonal=False)
    out_shape, offset = compute_shape_offset(shape, affine, new_affine, False)
    new_affine[:3, -1] = offset[:3]
    return new_affine, [int(s) for s in out_shape]


def spacing_triple(spacing: Sequence[float] | float, name: str = "target_spacing") -> np.ndarray:
    """Three positive spacings in mm from one value or three; ``name`` is the setting an error names."""
    pixdim = np.asarray(spacing, dtype=np.float64).ravel()
    if pixdim.size == 1:
        pixdim = np.repeat(pixdim, 3)
    if pixdim.size != 3 or not np.all(pixdim > 0):
        raise ValueError(f"{name} must be 3 positive millimetre values (or one), got {np.ravel(spacing).tolist()}.")
    return pixdim


def code_groups(groups: Sequence[Any] | None, num_cases: int) -> list[list[int]]:
    """The cases that share one code: indices grouped by equal ``groups`` values, in order of first appearance
    (``None``: every case alone)."""
    if groups is None:
        return [[b] for b in range(num_cases)]
    if len(groups) != num_cases:
        raise ValueError(f"got {len(groups)} group labels for {num_cases} images.")
    units: dict[Any, list[int]] = {}
    for b, group in enumerate(groups):
        units.setdefault(group, []).append(b)
    return list(units.values())


def reference_case(images: Sequence[torch.Tensor], unit: Sequence[int]) -> int:
    """The case of a group its heart pose is found on: the one earliest in the cycle (end-diastole, where the heart
    is largest and a cine network's heart frame was placed in training), the first of them on a tie."""
    return min(unit, key=lambda b: (phase_of(images[b]) or 0.0, b))


def checked_batch(inputs: torch.Tensor) -> MetaTensor:
    """``inputs`` if it is a batch of single-channel 3D images ``(B, 1, X, Y, Z)`` that carries its affine."""
    if not isinstance(inputs, MetaTensor):
        raise TypeError("LatentOptimisationInferer needs a MetaTensor (its affine places the voxels in space).")
    if inputs.dim() != 5 or inputs.shape[1] != 1:
        raise ValueError(f"expected a batch of 3D single-channel images (B, 1, X, Y, Z), got {tuple(inputs.shape)}.")
    return inputs


def split_cases(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[MetaTensor]:
    """Single cases ``(1, 1, X, Y, Z)`` of a batch, or of a list of images ``(1, X, Y, Z)`` that may mix grids."""
    if isinstance(inputs, torch.Tensor):
        image = checked_batch(inputs)
        return [image[b : b + 1] for b in range(image.shape[0])]
    cases = []
    for item in inputs:
        case = item[None] if isinstance(item, torch.Tensor) and item.dim() == 4 else item
        cases.append(checked_batch(case))
    if not cases:
        raise ValueError("no images to fit.")
    return cases


def case_masks(masks: CaseMasks, cases: list[MetaTensor]) -> list[torch.Tensor | None]:
    """One boolean mask ``(X, Y, Z)`` (or None: every voxel) per case, checked against the case's grid."""
    if masks is None:
        return [None] * len(cases)
    if isinstance(masks, torch.Tensor):
        masks = [masks] if masks.dim() <= 4 and len(cases) == 1 else list(masks)
    if len(masks) != len(cases):
        raise ValueError(f"got {len(masks)} masks for {len(cases)} images.")
    checked: list[torch.Tensor | None] = []
    for b, (mask, case) in enumerate(zip(masks, cases)):
        if mask is None:
            checked.append(None)
            continue
        mask = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
        if tuple(mask.shape[-3:]) != tuple(case.shape[2:]) or mask.numel() != case.shape[2:].numel():
            raise ValueError(
                f"mask {b} has shape {tuple(mask.shape)}, its image {tuple(case.shape[1:])}; they must share the grid."
            )
        mask = mask.reshape(case.shape[2:]) != 0
        if not bool(mask.any()):
            raise ValueError(f"mask {b} keeps no voxel: nothing to fit the code to.")
        checked.append(mask)
    return checked


def check_phases(images: Sequence[torch.Tensor], network: nn.Module) -> None:
    """Frames and network must agree on time: a cine network (``coord_dim=5``) reads each frame at its phase, so a
    frame without one is read at phase 0 (end-diastole) with a warning; a per-frame network cannot read a phase."""
    coord_dim = int(getattr(network, "coord_dim", 3))
    for image in images:
        phase = phase_of(image)
        if coord_dim == CINE_COORD_DIM and phase is None:
            logger.warning(
                "%s has no cardiac phase (cardiac_phase): the cine network reads it as end-diastole (phase 0).",
                image.meta.get("filename_or_obj", "an image") if isinstance(image, MetaTensor) else "an image",
            )
            if isinstance(image, MetaTensor):
                image.meta[PHASE_KEY] = 0.0
        elif coord_dim == 3 and phase is not None:
            raise ValueError(
                "this network reads 3 coordinates (a per-frame model) but the image carries a cardiac phase: set "
                "cine_model to false, or use a network trained with cine_model true."
            )


def grid_affine(image: MetaTensor) -> torch.Tensor:
    """The one affine of a (possibly collated) batch of images on a shared grid."""
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    if affine.ndim == 3:
        if not torch.allclose(affine, affine[:1].expand_as(affine), atol=1e-4):
            raise ValueError("all images of a batch must share one grid (affine); use batch_size 1.")
        affine = affine[0]
    return affine


def as_meta(data: torch.Tensor, image: MetaTensor, affine: Any) -> MetaTensor:
    """``data`` ``(B, C, *shape)`` as a MetaTensor with ``image``'s metadata on the grid ``affine``, batched as
    ``image`` is, so ``SaveImage`` writes it in place."""
    out = MetaTensor(data, meta=dict(image.meta))
    affine = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    shape = torch.as_tensor(data.shape[2:])
    if image.is_batch:
        out.is_batch = True
        out.affine = affine.expand(data.shape[0], 4, 4).clone()
        out.meta["spatial_shape"] = shape.expand(data.shape[0], -1).clone()
    else:
        out.affine = affine
        out.meta["spatial_shape"] = shape
    return out
