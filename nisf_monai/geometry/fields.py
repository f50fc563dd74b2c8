"""Segmentations that can be read on any grid, and the measurement of one frame at a fine spacing.

A field answers ``sample(affine, shape) -> (probabilities (M, *shape), intensity (*shape) or None)``
in world space: :class:`NetworkField` is a NISF network with a fitted code (the continuous
segmentation), :class:`LabelField` a label map read by nearest neighbour (the manual segmentation as
the same kind of object, so both go through one measuring path and can be compared, or a label map
checked against itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from nisf_monai.geometry.grids import footprint_grid, roi_slices, sub_grid
from nisf_monai.geometry.measures import STRUCTURES, class_volumes
from nisf_monai.geometry.meshes import Mesh, marching_tetrahedra
from nisf_monai.spatial import voxel_sizes, voxel_volume_ml
from nisf_monai.transforms.coordinates import CoordinateMapping

__all__ = ["Field", "NetworkField", "LabelField", "FrameMeasurement", "measure_frame", "structure_meshes"]


class Field(Protocol):
    num_classes: int

    def sample(self, affine: np.ndarray, spatial_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]: ...


class NetworkField:
    """A NISF network with one fitted code, read through ``inferer.sample`` (chunked).

    Args:
        network: the trained network (frozen).
        inferer: the :class:`~nisf_monai.inferers.LatentOptimisationInferer` that fitted the code.
        latent: the code, ``(latent_dim,)`` or ``(1, latent_dim)``.
        frame: the :class:`~nisf_monai.transforms.CoordinateMapping` of the image the code was fitted to
            (``inferer.frame_of(image)``).
        blend: the localiser's probabilities of that image (``inferer.blend_source(image)``), mixed into the
            network's by the inferer's ``output_blend`` wherever they are read; None reads the code alone.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: Any,
        latent: torch.Tensor,
        frame: CoordinateMapping,
        blend: Any | None = None,
    ) -> None:
        self.network = network
        self.inferer = inferer
        self.latent = latent.reshape(1, -1)
        self.frame = frame
        self.blend = blend
        self.num_classes = int(network.num_classes)

    def sample(self, affine: np.ndarray, spatial_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        probs, intensity = self.inferer.sample(
            self.network, self.latent, self.frame, affine, spatial_shape, probabilities=True, blend=self.blend
        )
        return probs[0].numpy(), intensity[0, 0].numpy()


class LabelField:
    """A label map ``(X, Y, Z)`` on the grid ``affine`` as one-hot probabilities anywhere (nearest
    neighbour; background outside the map's voxel footprints)."""

    def __init__(self, label: Any, affine: Any, num_classes: int = 4) -> None:
        self.label = np.asarray(label).astype(np.int64)
        if self.label.ndim != 3:
            raise ValueError(f"expected a label map (X, Y, Z), got shape {self.label.shape}.")
        self.affine = np.asarray(affine, dtype=np.float64)
        self.num_classes = int(num_classes)

    def sample(self, affine: np.ndarray, spatial_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        shape = [int(s) for s in spatial_shape]
        to_index = np.linalg.inv(self.affine) @ np.asarray(affine, dtype=np.float64)
        axes = [np.arange(n, dtype=np.float64) for n in shape]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        index = np.floor(grid @ to_index[:3, :3].T + to_index[:3, 3] + 0.5).astype(np.int64)
        size = np.asarray(self.label.shape)
        inside = np.all((index >= 0) & (index < size), axis=1)
        values = np.zeros(len(index), dtype=np.int64)
        i = index[inside]
        values[inside] = self.label[i[:, 0], i[:, 1], i[:, 2]]
        one_hot = np.zeros((self.num_classes, len(index)), dtype=np.float32)
        one_hot[np.clip(values, 0, self.num_classes - 1), np.arange(len(index))] = 1.0
        return one_hot.reshape(self.num_classes, *shape), None


@dataclass
class FrameMeasurement:
    """One frame read at a fine spacing: structure volumes (ml), the class probabilities ``(M, *shape)``
    on the fine grid ``affine`` (the region of interest, or the whole slab), and that grid's spacing."""

    volumes: dict[str, float]
    probabilities: np.ndarray | None
    affine: np.ndarray
    spacing: list[float]
    roi_shape: list[int] = field(default_factory=list)


def measure_frame(
    source: Field,
    image_affine: Any,
    image_shape: Sequence[int],
    spacing: float | Sequence[float] | None = 1.0,
    roi_margin_mm: float | None = 10.0,
    roi_spacing: float = 4.0,
    mode: str = "label",
    structures: Mapping[str, int] = STRUCTURES,
) -> FrameMeasurement:
    """Structure volumes of one frame from ``source`` read at ``spacing`` mm over the image's slab.

    With ``roi_margin_mm`` set, a coarse pass at ``roi_spacing`` mm finds the foreground first and only the
    box around it (plus the margin) is read finely; the rest counts as background. ``spacing=None`` reads
    the image's own grid (the disc sum)."""
    fine_affine, fine_shape = footprint_grid(image_affine, image_shape, spacing)
    lower, upper = [0, 0, 0], list(fine_shape)
    if roi_margin_mm is not None:
        coarse_affine, coarse_shape = footprint_grid(image_affine, image_shape, roi_spacing)
        coarse, _ = source.sample(coarse_affine, coarse_shape)
        bounds = roi_slices(coarse.argmax(axis=0) > 0, coarse_affine, fine_affine, fine_shape, roi_margin_mm)
        if bounds is None:
            return FrameMeasurement(
                {name: 0.0 for name in structures}, None, fine_affine, _sizes(fine_affine), [0, 0, 0]
            )
        lower, upper = bounds
    roi_affine, roi_shape = sub_grid(fine_affine, lower, upper)
    probs, _ = source.sample(roi_affine, roi_shape)
    volumes = class_volumes(probs, voxel_volume_ml(roi_affine), structures, mode)
    return FrameMeasurement(volumes, probs, roi_affine, _sizes(roi_affine), roi_shape)


def _sizes(affine: np.ndarray) -> list[float]:
    return voxel_sizes(affine).round(6).tolist()


def structure_meshes(
    probabilities: np.ndarray, affine: Any, structures: Mapping[str, int] = STRUCTURES, level: float = 0.5
) -> dict[str, Mesh]:
    """A closed surface per structure: its class probability at ``level``, in world mm."""
    return {name: marching_tetrahedra(probabilities[c], affine, level) for name, c in structures.items()}
