"""Coordinates in physical space for coordinate networks, and point sampling from them.

A voxel's position is ``affine @ [i, j, k, 1]`` in millimetres (the MetaTensor's affine, RAS as MONAI
loads it), never its array index alone: anisotropic spacing, flipped or oblique axes and other views of
the same subject then all land in one consistent space.

A cine network (``coord_dim=5``) also sees time: the frame's cardiac phase ``t`` in [0, 1) (``PHASE_KEY`` in the
image's metadata, set by :class:`~nisf_monai.transforms.CardiacPhased`) is appended to every point, so that one code
describes a subject's whole cycle. The cycle is periodic, so ``t`` enters as a point on a circle,
``(cos 2 pi t, sin 2 pi t) / (2 pi)``: the last frame lies next to the first, and a cycle of circumference 1 keeps a
small step in phase a step of the same size in the network's input. Trained on end-diastole and end-systole alone,
the network then joins systole to the next diastole around the circle instead of extrapolating past the last phase
it saw.

The network sees normalised coordinates, the same mapping for every scan (``mode='world'``)::

    c = (x_world - centre) / extent_mm

where ``centre`` is the world position of the volume's central voxel and ``extent_mm`` a fixed length
from the config (default 400 mm, a cardiac field of view), so a millimetre means the same to the network
in every scan. ``mode='voxel'`` gives the published NISF code's per-axis ``index / axis_length`` in
[0, 1) for comparison; it ignores spacing and orientation.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from nisf_monai.deprecation import renamed_class
from nisf_monai.spatial import voxel_sizes

__all__ = [
    "CoordinateFrame",
    "CoordinateGridd",
    "CoordinateMapping",
    "RandPointSampled",
    "CINE_COORD_DIM",
    "COORDINATE_MODES",
    "PHASE_KEY",
    "POSE_KEY",
    "phase_channels",
    "phase_of",
    "pose_of",
    "world_grid",
]

COORDINATE_MODES = ("world", "voxel")
POSE_KEY = "heart_pose"  # MetaTensor meta key of a case's world -> heart frame similarity (4 x 4)
PHASE_KEY = "cardiac_phase"  # MetaTensor meta (and datalist) key of a frame's phase in the cycle, in [0, 1)
CINE_COORD_DIM = 5  # x, y, z and the phase on a circle (two channels)


def phase_channels(phase: float) -> torch.Tensor:
    """The two network inputs of a cardiac phase ``t``: ``(cos 2 pi t, sin 2 pi t) / (2 pi)`` (float64), the cycle as a
    circle of circumference 1."""
    angle = 2.0 * np.pi * float(phase)
    return torch.tensor([np.cos(angle), np.sin(angle)], dtype=torch.float64) / (2.0 * np.pi)


def pose_of(image: torch.Tensor) -> torch.Tensor | None:
    """The heart-frame pose carried in an image's metadata (``POSE_KEY``), or None. A batch of one case
    may carry it with a leading batch dimension."""
    if not isinstance(image, MetaTensor) or POSE_KEY not in image.meta:
        return None
    pose = torch.as_tensor(image.meta[POSE_KEY], dtype=torch.float64)
    return pose[0] if pose.ndim == 3 else pose


def phase_of(image: torch.Tensor) -> float | None:
    """The cardiac phase carried in an image's metadata (``PHASE_KEY``), or None. A batch of one case may carry it
    as a one-element list or tensor."""
    if not isinstance(image, MetaTensor) or image.meta.get(PHASE_KEY) is None:
        return None
    value = image.meta[PHASE_KEY]
    return float(np.asarray(torch.as_tensor(value)).reshape(-1)[0])


class CoordinateMapping:
    """Maps positions of one reference scan to the network's input coordinates.

    Formerly ``CoordinateFrame`` (still importable, with a ``FutureWarning``): "frame" now names the time points
    of a cine series, not this mapping.

    Args:
        affine: 4 x 4 voxel-to-world matrix of the reference scan (millimetres).
        spatial_shape: the reference scan's array shape (3 values).
        extent_mm: world length that maps to a unit of network coordinate (``mode='world'``).
        mode: 'world' (default) or 'voxel' (the published code's index / length).
        pose: optional 4 x 4 similarity from world millimetres to a case's heart frame (millimetres, see
            :mod:`nisf_monai.transforms.heart_frame`); in 'world' mode the network then sees
            ``(pose @ x_world) / extent_mm`` instead of coordinates relative to the volume centre.
        phase: the frame's cardiac phase in [0, 1) for a cine network: appended to every point as two more
            coordinates (:func:`phase_channels`). None (a per-frame network) gives three coordinates.
    """

    def __init__(
        self,
        affine: torch.Tensor | np.ndarray,
        spatial_shape: Sequence[int],
        extent_mm: float = 400.0,
        mode: str = "world",
        pose: torch.Tensor | np.ndarray | None = None,
        phase: float | None = None,
    ) -> None:
        if mode not in COORDINATE_MODES:
            raise ValueError(f"coordinate mode must be one of {COORDINATE_MODES}, got {mode!r}.")
        if extent_mm <= 0:
            raise ValueError(f"extent_mm must be positive, got {extent_mm}.")
        self.affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        if self.affine.shape != (4, 4):
            raise ValueError(f"expected a 4 x 4 affine, got shape {tuple(self.affine.shape)}.")
        self.spatial_shape = torch.as_tensor([int(s) for s in spatial_shape], dtype=torch.float64)
        self.extent_mm = float(extent_mm)
        self.mode = mode
        half = (self.spatial_shape - 1) / 2
        self.centre = self.index_to_world(half[None])[0]
        self.pose = None
        if pose is not None:
            self.pose = torch.as_tensor(np.asarray(pose, dtype=np.float64))
            if self.pose.shape != (4, 4):
                raise ValueError(
                    f"expected a 4 x 4 pose (world mm -> heart frame mm), got shape {tuple(self.pose.shape)}."
                )
        self.phase = None if phase is None else float(phase)

    @property
    def coord_dim(self) -> int:
        """Coordinates per point the network sees: 3, or 5 with the cardiac phase."""
        return 3 if self.phase is None else CINE_COORD_DIM

    def with_phase(self, phase: float | None) -> CoordinateMapping:
        """The same mapping at another cardiac phase (a cine code read at any point of its cycle)."""
        mapping = copy.copy(self)
        mapping.phase = None if phase is None else float(phase)
        return mapping

    def index_to_world(self, index: torch.Tensor) -> torch.Tensor:
        """World millimetres ``(N, 3)`` of continuous voxel indices ``(N, 3)`` of the reference scan."""
        index = torch.as_tensor(index, dtype=torch.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, world: torch.Tensor) -> torch.Tensor:
        """Continuous voxel indices ``(N, 3)`` of the reference scan at world positions ``(N, 3)``."""
        inverse = torch.linalg.inv(self.affine)
        world = torch.as_tensor(world, dtype=torch.float64)
        return world @ inverse[:3, :3].T + inverse[:3, 3]

    def from_world(self, world: torch.Tensor) -> torch.Tensor:
        """Network coordinates ``(N, coord_dim)`` (float32) of world positions ``(N, 3)``."""
        world = torch.as_tensor(world, dtype=torch.float64)
        if self.mode == "voxel":
            space = self.world_to_index(world) / self.spatial_shape
        elif self.pose is not None:
            space = (world @ self.pose[:3, :3].T + self.pose[:3, 3]) / self.extent_mm
        else:
            space = (world - self.centre) / self.extent_mm
        if self.phase is not None:
            space = torch.cat([space, phase_channels(self.phase).to(space).expand(space.shape[0], 2)], dim=1)
        return space.float()

    def grid(
        self, affine: torch.Tensor | np.ndarray, spatial_shape: Sequence[int], start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Network coordinates ``(N, coord_dim)`` of the voxel centres of a grid (any affine, any shape), for the
        flat voxel range ``[start, stop)`` in C order, so large grids can be visited in chunks."""
        return self.from_world(world_grid(affine, spatial_shape, start, stop))


def world_grid(
    affine: torch.Tensor | np.ndarray, spatial_shape: Sequence[int], start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """World millimetres ``(N, 3)`` (float64) of the voxel centres of a grid, for the flat voxel range
    ``[start, stop)`` in C order."""
    shape = [int(s) for s in spatial_shape]
    total = int(np.prod(shape))
    stop = total if stop is None else min(stop, total)
    flat = torch.arange(start, stop, dtype=torch.int64)
    index = torch.stack(torch.unravel_index(flat, shape), dim=-1).to(torch.float64)
    affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    return index @ affine[:3, :3].T + affine[:3, 3]


# the former name (issue 12), kept for one release; warns when instantiated
CoordinateFrame = renamed_class(CoordinateMapping, "CoordinateFrame")


def _affine_of(img: torch.Tensor) -> torch.Tensor:
    if isinstance(img, MetaTensor):
        return img.affine
    raise TypeError("coordinates need the image's affine: load it as a MetaTensor (MONAI LoadImaged).")


class CoordinateGridd(MapTransform):
    """Adds ``coords_key``: the network coordinates of every voxel of ``keys[0]``, channel-first
    ``(3, X, Y, Z)`` float32, computed from its MetaTensor affine (see module docstring) and, when its
    metadata holds one (``POSE_KEY``, from :class:`~nisf_monai.transforms.HeartPosed`), the case's heart-frame
    pose; ``(5, X, Y, Z)`` with the frame's cardiac phase when its metadata holds one (``PHASE_KEY``, from
    :class:`~nisf_monai.transforms.CardiacPhased`). Deterministic, so a ``CacheDataset`` keeps it.

    Args:
        keys: the image whose grid and affine define the coordinates.
        coords_key: where to store them.
        extent_mm: see :class:`CoordinateMapping`.
        mode: 'world' or 'voxel'.
    """

    def __init__(
        self,
        keys: KeysCollection,
        coords_key: str = "coords",
        extent_mm: float = 400.0,
        mode: str = "world",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.coords_key = coords_key
        self.extent_mm = extent_mm
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        key = self.first_key(d)
        if key == ():
            return d
        img = d[key]
        spatial_shape = img.shape[1:]
        if len(spatial_shape) != 3:
            raise ValueError(f"expected a channel-first 3D image (C, X, Y, Z), got shape {tuple(img.shape)}.")
        affine = _affine_of(img)
        mapping = CoordinateMapping(
            affine, spatial_shape, self.extent_mm, self.mode, pose=pose_of(img), phase=phase_of(img)
        )
        coords = mapping.grid(affine, spatial_shape).T.reshape(mapping.coord_dim, *spatial_shape)
        d[self.coords_key] = MetaTensor(coords, affine=affine, meta={"coordinate_mode": self.mode})
        return d


class RandPointSampled(Randomizable, MapTransform):
    """Draws the same random voxels from every key, turning channel-first volumes ``(C, X, Y, Z)`` into
    point sets ``(C, num_points)`` (plain tensors: a point set has no affine).

    One training sample of NISF is a set of points of one frame; sampling a subset per step instead of
    every voxel trades gradient noise for speed. ``num_points=None`` keeps every voxel, in C order.

    Args:
        keys: volumes to sample, all of one spatial shape (image, label, coords).
        num_points: points per sample, drawn without replacement (with replacement if the volume is
            smaller), or None for all voxels.
        coords_key: the coordinate key, which gets ``jitter`` (standard deviation, network units) of
            Gaussian noise so the network sees positions between voxel centres.
        jitter: see ``coords_key``.
        label_key: the label map that locates the heart for ``foreground_fraction``.
        foreground_fraction: share of the points drawn from the box around the labelled structures
            (dilated by ``foreground_margin_mm``), the rest from the whole volume. In a cine field of view
            about 98% of voxels are background, so uniform points leave the structures a few dozen points per
            frame and the segmentation head learns slowly; 0 keeps uniform sampling (the paper's choice,
            which used every voxel of a frame per step).
        foreground_margin_mm: margin of that box in millimetres (from the label's affine), so the boundary
            between heart and surroundings is sampled densely too.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_points: int | None = 8192,
        coords_key: str = "coords",
        jitter: float = 0.0,
        label_key: str = "label",
        foreground_fraction: float = 0.0,
        foreground_margin_mm: float = 20.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be positive or None, got {num_points}.")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}.")
        self.num_points = num_points
        self.coords_key = coords_key
        self.jitter = jitter
        self.label_key = label_key
        self.foreground_fraction = foreground_fraction
        self.foreground_margin_mm = foreground_margin_mm
        self._index: np.ndarray | None = None

    def randomize(self, num_voxels: int, box: np.ndarray | None = None) -> None:
        """Draw the voxel indices; ``box`` holds the flat indices of the foreground box (or None)."""
        if self.num_points is None:
            self._index = None
            return
        num_box = 0 if box is None or box.size == 0 else int(round(self.foreground_fraction * self.num_points))
        num_uniform = self.num_points - num_box
        index = [self.R.choice(num_voxels, num_uniform, replace=num_uniform > num_voxels)]
        if num_box:
            index.append(box[self.R.choice(box.size, num_box, replace=num_box > box.size)])
        self._index = np.concatenate(index)

    def _foreground_box(self, label: torch.Tensor) -> np.ndarray | None:
        """Flat indices (C order) of the voxels in the bounding box of ``label > 0`` dilated by the margin."""
        foreground = (torch.as_tensor(label) > 0).any(dim=0)
        if not bool(foreground.any()):
            return None
        spacing = np.ones(3)
        if isinstance(label, MetaTensor):
            spacing = voxel_sizes(label.affine)
        ranges = []
        for axis, size in enumerate(foreground.shape):
            present = foreground.any(dim=[a for a in range(3) if a != axis]).nonzero().flatten()
            margin = int(np.ceil(self.foreground_margin_mm / spacing[axis]))
            ranges.append(np.arange(max(int(present[0]) - margin, 0), min(int(present[-1]) + margin + 1, size)))
        grid = np.ix_(*ranges)
        return np.ravel_multi_index(grid, foreground.shape).ravel()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shapes = {tuple(d[k].shape[1:]) for k in keys}
        if len(shapes) != 1:
            raise ValueError(f"keys {keys} must share one spatial shape to sample the same points, got {shapes}.")
        num_voxels = int(np.prod(next(iter(shapes))))
        box = None
        if self.foreground_fraction > 0 and self.num_points is not None:
            if self.label_key not in d:
                raise KeyError(f"foreground_fraction needs the label '{self.label_key}' to locate the structures.")
            box = self._foreground_box(d[self.label_key])
        self.randomize(num_voxels, box)
        index = None if self._index is None else torch.as_tensor(self._index, dtype=torch.long)
        for k in keys:
            flat = torch.as_tensor(d[k]).reshape(d[k].shape[0], -1)
            points = flat if index is None else flat[:, index]
            if k == self.coords_key and self.jitter > 0:
                points = points + torch.as_tensor(self.R.normal(0.0, self.jitter, points.shape), dtype=points.dtype)
            d[k] = points.as_tensor() if isinstance(points, MetaTensor) else points
        return d
