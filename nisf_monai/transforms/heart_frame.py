"""A canonical heart frame per case: coordinates relative to the heart instead of the scan's field of view.

Cine fields of view place the heart anywhere: in ACDC the labelled heart's centroid lies 24 mm from the
volume centre at the median and up to 92 mm, and the left-to-right-ventricle direction turns from scan to
scan. Relative to the volume centre, the network and the codes have to spend themselves on where the heart
is. The heart frame is a map of world millimetres per case:

- origin: the centroid of the left ventricle (blood pool and myocardium), in mm;
- z: the slice normal (the image's third voxel axis), so short-axis slices stay planes of constant z;
- x: the direction from the LV centroid to the RV blood pool's centroid, projected into the slice plane;
- y: z cross x (right-handed);
- optionally a scale (``reference_volume_ml``): ``(reference / LV volume) ** (1/3)``, the same for every axis,
  so that a dilated or a small heart fills the frame as a heart of the reference volume does (the left
  ventricle's volume being blood pool plus myocardium). The frame's millimetres are then the reference heart's.

Training takes it from the labels (:class:`HeartPosed`); inference has no labels and estimates it from the
image (see :class:`~nisf_monai.inferers.LatentOptimisationInferer`). The cine model has one pose per subject, taken
from its reference frame (the labelled frame earliest in the cycle, end-diastole for an R-wave-triggered cine) and
shared by all its frames (:func:`with_subject_poses`), so the heart's motion over the cycle is the network's to
describe, not the frame's. The pose travels in the image's
metadata (``POSE_KEY``), where :class:`~nisf_monai.transforms.CoordinateGridd` and the inferer read it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from nisf_monai.errors import DatalistError
from nisf_monai.spatial import voxel_volume_ml
from nisf_monai.transforms.coordinates import PHASE_KEY, POSE_KEY

__all__ = ["HeartPosed", "checked_reference_volume", "heart_pose", "pose_matrix", "split_pose", "with_subject_poses"]

logger = logging.getLogger("nisf_monai")


def pose_matrix(
    origin: torch.Tensor | np.ndarray, rotation: torch.Tensor | np.ndarray, scale: float = 1.0
) -> torch.Tensor:
    """4 x 4 map of world mm into a frame with the given origin (world mm), axes (rows of ``rotation``) and
    isotropic ``scale`` (frame mm per world mm)."""
    rotation = torch.as_tensor(np.asarray(rotation, dtype=np.float64)) * float(scale)
    origin = torch.as_tensor(np.asarray(origin, dtype=np.float64))
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = rotation
    pose[:3, 3] = -rotation @ origin
    return pose


def split_pose(pose: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The origin (world mm), axes (rows, orthonormal) and scale of a pose made by :func:`pose_matrix`."""
    pose = torch.as_tensor(np.asarray(pose, dtype=np.float64))
    scale = float(torch.linalg.det(pose[:3, :3]).abs() ** (1.0 / 3.0))
    rotation = pose[:3, :3] / scale
    return -rotation.T @ pose[:3, 3] / scale, rotation, scale


def checked_reference_volume(reference_volume_ml: float | None) -> float | None:
    """``reference_volume_ml`` if it is None or positive; a ValueError otherwise (a frame scaled to no volume)."""
    if reference_volume_ml is not None and reference_volume_ml <= 0:
        raise ValueError(f"reference_volume_ml must be positive (ml) or None, got {reference_volume_ml}.")
    return reference_volume_ml


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    index = np.argwhere(mask)
    if len(index) == 0:
        return None
    return affine[:3, :3] @ index.mean(axis=0) + affine[:3, 3]


def heart_pose(
    label: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    lv_classes: Sequence[int] = (1, 2),
    rv_classes: Sequence[int] = (3,),
    rotate: bool = True,
    reference_volume_ml: float | None = None,
) -> torch.Tensor | None:
    """The heart frame's pose (4 x 4, world mm -> heart frame mm) of a label map ``(X, Y, Z)`` or ``(1, X, Y, Z)``
    in the bundle's classes, or None when it has no left ventricle. Without an RV (or ``rotate=False``) the
    axes stay the image's world axes and only the origin moves. With ``reference_volume_ml`` the frame is
    scaled so that the LV (``lv_classes``) has that volume in it; without, it keeps world millimetres."""
    label = np.asarray(label)
    label = label[0] if label.ndim == 4 else label
    affine = np.asarray(affine, dtype=np.float64)
    lv_mask = np.isin(label, list(lv_classes))
    lv = _centroid(lv_mask, affine)
    if lv is None:
        return None
    scale = 1.0
    if reference_volume_ml is not None:
        volume_ml = float(lv_mask.sum()) * voxel_volume_ml(affine)
        scale = (float(reference_volume_ml) / volume_ml) ** (1.0 / 3.0)
    rotation = np.eye(3)
    rv = _centroid(np.isin(label, list(rv_classes)), affine) if rotate else None
    if rv is not None:
        normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
        towards_rv = rv - lv
        towards_rv = towards_rv - (towards_rv @ normal) * normal
        if np.linalg.norm(towards_rv) > 1e-6:
            x_axis = towards_rv / np.linalg.norm(towards_rv)
            rotation = np.stack([x_axis, np.cross(normal, x_axis), normal])
    return pose_matrix(lv, rotation, scale)


def with_subject_poses(
    items: Sequence[Mapping[Hashable, Any]],
    load: Callable[[dict], Mapping[Hashable, Any]],
    subject_key: str = "subject",
    label_key: str = "label",
    reference_volume_ml: float | None = None,
) -> list[dict[Hashable, Any]]:
    """Copies of datalist entries, each holding its subject's heart pose (``POSE_KEY``, a 4 x 4 nested list), which
    :class:`HeartPosed` then uses instead of the frame's own label. The pose is that of the subject's reference frame:
    its labelled frame with the lowest ``cardiac_phase`` (then the first by case ID), loaded by ``load`` (the bundle's
    loading transforms: the label in the bundle's classes, with its affine).

    Raises:
        DatalistError: a subject with no labelled frame, or whose reference label holds no left ventricle.
    """
    entries = [dict(item) for item in items]
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for entry in entries:
        by_subject[str(entry.get(subject_key, entry.get("case")))].append(entry)
    for subject, frames in by_subject.items():
        labelled = [e for e in frames if e.get(label_key) is not None]
        if not labelled:
            raise DatalistError(f"subject {subject!r} has no labelled frame to place its heart frame by.")
        reference = min(labelled, key=lambda e: (float(e.get(PHASE_KEY) or 0.0), str(e.get("case", ""))))
        label = load(dict(reference))[label_key]
        if not isinstance(label, MetaTensor):
            raise TypeError("the heart frame needs the label's affine: load it as a MetaTensor (MONAI LoadImaged).")
        pose = heart_pose(label.as_tensor(), label.affine, reference_volume_ml=reference_volume_ml)
        if pose is None:
            raise DatalistError(f"{reference[label_key]}: subject {subject!r}'s reference label has no left ventricle.")
        for entry in frames:
            entry[POSE_KEY] = pose.tolist()
    return entries


class HeartPosed(MapTransform):
    """Puts each case's heart-frame pose, computed from its label, into the metadata of ``keys`` (``POSE_KEY``).
    An entry that carries a pose already (``POSE_KEY``, from :func:`with_subject_poses`) keeps that one.

    Args:
        keys: images that get the pose (the image whose grid ``CoordinateGridd`` reads, and the label).
        label_key: the label map in the bundle's classes.
        lv_classes: classes whose centroid is the origin (LV blood pool and myocardium).
        rv_classes: classes whose centroid sets the x axis (RV blood pool).
        rotate: turn the in-plane axes to the LV -> RV direction; False moves the origin only.
        reference_volume_ml: scale each case's frame to an LV of this volume (blood pool + myocardium, ml);
            None keeps world millimetres. Inference must use the same value (``SliceLocaliser``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        lv_classes: Sequence[int] = (1, 2),
        rv_classes: Sequence[int] = (3,),
        rotate: bool = True,
        reference_volume_ml: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_volume_ml = checked_reference_volume(reference_volume_ml)
        self.label_key = label_key
        self.lv_classes = tuple(lv_classes)
        self.rv_classes = tuple(rv_classes)
        self.rotate = rotate

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if d.get(POSE_KEY) is not None:
            pose = torch.as_tensor(d[POSE_KEY], dtype=torch.float64)
            for key in self.key_iterator(d):
                if isinstance(d[key], MetaTensor):
                    d[key].meta[POSE_KEY] = pose.clone()
            return d
        label = d[self.label_key]
        if not isinstance(label, MetaTensor):
            raise TypeError("the heart frame needs the label's affine: load it as a MetaTensor (MONAI LoadImaged).")
        pose = heart_pose(
            label.as_tensor(), label.affine, self.lv_classes, self.rv_classes, self.rotate, self.reference_volume_ml
        )
        if pose is None:
            logger.warning(
                "%s has no left ventricle: its coordinates stay relative to the volume centre.",
                label.meta.get("filename_or_obj", "a case"),
            )
            return d
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta[POSE_KEY] = pose.clone()
        return d
