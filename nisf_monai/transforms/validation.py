"""Checks that a loaded case is something the network can learn from, with errors that name the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from nisf_monai.errors import InvalidCaseError

__all__ = ["InvalidCaseError", "ValidateCased", "source_of"]


def source_of(img: torch.Tensor, fallback: str = "<in-memory image>") -> str:
    """The file an image was loaded from, for messages."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return fallback


class ValidateCased(MapTransform):
    """Rejects cases that would train or infer on garbage, before any tensor reaches the network.

    Checks, for channel-first arrays loaded by ``LoadImaged``: the image is one 3D volume
    ``(1, X, Y, Z)``; its intensities are finite and not constant; the label (when present) has the image's
    shape and affine and only whole values in ``[0, num_classes)``.

    Args:
        image_key: the image.
        label_key: the label, or None (inference). A missing label key is allowed for inference.
        num_classes: label values must be below this (background included).
        affine_atol: tolerance in millimetres between the image's and the label's affines.
    """

    def __init__(
        self, image_key: str = "image", label_key: str | None = "label", num_classes: int = 4, affine_atol: float = 1e-3
    ) -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key
        self.num_classes = num_classes
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Mapping[Hashable, torch.Tensor]:
        img = data[self.image_key]
        name = source_of(img, str(data.get("case", self.image_key)))
        spatial = tuple(img.shape[1:])
        if img.shape[0] > 1 and len(spatial) == 3:
            raise InvalidCaseError(
                f"{name}: expected one 3D volume (loaded as (1, X, Y, Z)), got array shape {tuple(img.shape)}: "
                f"a 4D cine series of {img.shape[0]} frames? Split it into 3D frames with "
                "nisf_monai.data.datalist.expand_cine_datalist and nisf_monai.transforms.SelectFramed."
            )
        if img.shape[0] != 1 or len(spatial) != 3:
            raise InvalidCaseError(
                f"{name}: expected one 3D volume (loaded as (1, X, Y, Z)), got array shape {tuple(img.shape)}; "
                "2D images are not supported (NISF needs a 3D stack of slices with its slice spacing)."
            )
        values = torch.as_tensor(img)
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise InvalidCaseError(f"{name}: {bad} voxels are NaN or infinite; fix or mask them before use.")
        if float(values.max()) == float(values.min()):
            raise InvalidCaseError(f"{name}: the image is constant ({float(values.max())}); it holds no anatomy.")
        if self.label_key and self.label_key in data:
            self._check_label(data[self.label_key], img, name)
        return data

    def _check_label(self, label: torch.Tensor, img: torch.Tensor, image_name: str) -> None:
        name = source_of(label, f"label of {image_name}")
        if tuple(label.shape) != tuple(img.shape):
            raise InvalidCaseError(
                f"{name}: label shape {tuple(label.shape[1:])} differs from image shape {tuple(img.shape[1:])} "
                f"of {image_name}."
            )
        if isinstance(label, MetaTensor) and isinstance(img, MetaTensor):
            gap = float(np.abs(np.asarray(label.affine, dtype=float) - np.asarray(img.affine, dtype=float)).max())
            if gap > self.affine_atol:
                raise InvalidCaseError(
                    f"{name}: label affine differs from the image's ({image_name}) by up to {gap:.3g} mm; "
                    "resample the label onto the image grid."
                )
        values = torch.unique(torch.as_tensor(label))
        whole = torch.equal(values, torch.round(values))
        outside = values[(values < 0) | (values >= self.num_classes)]
        if not whole or outside.numel():
            shown = [float(v) for v in (outside if outside.numel() else values)[:8]]
            raise InvalidCaseError(
                f"{name}: label values {shown} are not classes 0..{self.num_classes - 1}; "
                "map them to the bundle's classes (label_names) first."
            )
