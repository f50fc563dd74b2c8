"""Planes and volumes anywhere in world space: their grids, and resampling of an acquired image onto them.

A grid is an affine (voxel index -> world mm, RAS as MONAI and NIfTI use) and a shape. NISF reads its
segmentation on any such grid (``LatentOptimisationInferer.sample(network, latent, frame, affine, shape)``,
with ``frame`` the ``CoordinateMapping`` of the image the code was fitted to), so a long-axis view of a
short-axis stack is just another grid: taken from a long-axis NIfTI's header, or built from a point, two
in-plane directions, a spacing and a size. The grid's affine is what the written NIfTI carries, so the
result overlays the source images in any viewer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from nisf_monai.errors import InputDataError, InvalidCaseError, MissingFileError

__all__ = ["plane_grid", "reference_grid", "resample_image", "grid_centre"]

logger = logging.getLogger("nisf_monai")


def _vector(value: Any, name: str) -> np.ndarray:
    vector = np.asarray(value, dtype=np.float64).ravel()
    if vector.size != 3 or not np.all(np.isfinite(vector)):
        raise InputDataError(f"{name} must be 3 finite millimetre values (x, y, z), got {value!r}.")
    return vector


def _unit(value: Any, name: str) -> np.ndarray:
    vector = _vector(value, name)
    length = np.linalg.norm(vector)
    if length < 1e-9:
        raise InputDataError(f"direction {name} is the zero vector.")
    return vector / length


def plane_grid(
    u: Sequence[float],
    v: Sequence[float],
    spacing: float | Sequence[float],
    size: Sequence[int],
    origin: Sequence[float] | None = None,
    centre: Sequence[float] | None = None,
    w: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Affine and shape of a plane (``size`` of 2 values) or a box (3 values) in world mm.

    The grid's first axis runs along ``u``, its second along ``v`` (made orthogonal to ``u`` if it is not,
    with a warning) and its third along ``w`` (default ``u x v``; made orthogonal to both). A plane is a grid
    of one voxel along ``w``, as thick as its in-plane spacing unless ``spacing`` gives a third value.

    Args:
        u, v: in-plane directions (any length).
        spacing: voxel size in mm: one value, or one per axis (2 or 3).
        size: voxels per axis: 2 values (a plane) or 3 (a volume).
        origin: world position of the first voxel's centre (index 0, 0, 0), or
        centre: world position of the grid's centre; give exactly one of the two.
        w: third axis direction.
    """
    if (origin is None) == (centre is None):
        raise InputDataError("give exactly one of origin (first voxel) and centre (grid centre) of the plane.")
    dims = [int(s) for s in np.ravel(size)]
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise InputDataError(f"size must be 2 (plane) or 3 (volume) positive voxel counts, got {size!r}.")
    if len(dims) == 2:
        dims.append(1)
    steps = np.asarray(spacing, dtype=np.float64).ravel()
    if steps.size == 1:
        steps = np.repeat(steps, 3)
    elif steps.size == 2:
        steps = np.append(steps, steps.min())
    if steps.size != 3 or not np.all(steps > 0):
        raise InputDataError(f"spacing must be 1-3 positive millimetre values, got {spacing!r}.")
    e1 = _unit(u, "u")
    v_unit = _unit(v, "v")
    e2 = v_unit - (v_unit @ e1) * e1
    if np.linalg.norm(e2) < 1e-6:
        raise InputDataError(f"directions u {list(u)} and v {list(v)} are parallel; they must span a plane.")
    e2 /= np.linalg.norm(e2)
    if abs(v_unit @ e1) > 1e-6:
        logger.warning(
            "plane: v was not orthogonal to u (angle %.2f deg); using its orthogonal part",
            np.degrees(np.arccos(np.clip(v_unit @ e1, -1, 1))),
        )
    normal = np.cross(e1, e2)
    if w is None:
        e3 = normal
    else:
        w_unit = _unit(w, "w")
        if abs(w_unit @ normal) < 1e-6:
            raise InputDataError(f"direction w {list(w)} lies in the plane of u and v.")
        e3 = normal * np.sign(w_unit @ normal)
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([e1, e2, e3]) * steps[None, :]
    if origin is not None:
        affine[:3, 3] = _vector(origin, "origin")
    else:
        affine[:3, 3] = _vector(centre, "centre") - affine[:3, :3] @ ((np.asarray(dims) - 1) / 2.0)
    return affine, dims


def reference_grid(path: str | os.PathLike) -> tuple[np.ndarray, list[int]]:
    """Affine and 3D shape of a reference NIfTI (e.g. a long-axis acquisition) from its header; a 2D image
    is a plane of one voxel, a 4D (cine) image gives its first three axes."""
    path = str(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: reference image does not exist.")
    try:
        image = nib.load(path)
    except Exception as err:
        raise InvalidCaseError(
            f"{path}: cannot read the reference image header ({type(err).__name__}: {err})."
        ) from err
    shape = [int(s) for s in image.shape[:3]]
    shape += [1] * (3 - len(shape))
    affine = np.asarray(image.affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidCaseError(f"{path}: the reference image's affine is singular; it does not place a grid in space.")
    return affine, shape


def grid_centre(affine: Any, spatial_shape: Sequence[int]) -> np.ndarray:
    """World position (mm) of a grid's centre."""
    affine = np.asarray(affine, dtype=np.float64)
    return affine[:3, :3] @ ((np.asarray(spatial_shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]


def resample_image(
    image: Any, image_affine: Any, affine: Any, spatial_shape: Sequence[int], mode: str = "bilinear"
) -> np.ndarray:
    """An acquired image ``(X, Y, Z)`` interpolated (trilinear, or ``mode='nearest'``) at the voxel centres
    of another grid: how a viewer shows a short-axis stack in a long-axis plane, the reference NISF's
    continuous reading is compared with. Within the outer half voxel the edge value holds (a slice stands
    for its slab); 0 outside the image's footprint."""
    volume = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D image (X, Y, Z), got shape {tuple(volume.shape)}.")
    shape = [int(s) for s in spatial_shape]
    affine = np.asarray(affine, dtype=np.float64)
    to_index = np.linalg.inv(np.asarray(image_affine, dtype=np.float64)) @ affine
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    index = grid @ to_index[:3, :3].T + to_index[:3, 3]  # continuous indices into the image
    size = np.asarray(volume.shape, dtype=np.float64)
    inside = np.all((index >= -0.5 - 1e-6) & (index <= size - 0.5 + 1e-6), axis=1)
    norm = 2.0 * np.clip(index, 0, size - 1) / np.maximum(size - 1, 1) - 1.0
    # grid_sample wants (x, y, z) = (last, middle, first) array axes
    coords = torch.as_tensor(norm[:, ::-1].copy(), dtype=torch.float32).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(volume[None, None], coords, mode=mode, padding_mode="border", align_corners=True)
    return np.where(inside, out.reshape(-1).numpy(), 0.0).reshape(shape).astype(np.float32)
