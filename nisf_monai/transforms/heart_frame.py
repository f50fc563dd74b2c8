"""A canonical heart frame per case: coordinates relative to the heart instead of the scan's field of view.

Cine fields of view place the heart anywhere: in ACDC the labelled heart's centroid lies 24 mm from the
volume centre at the median and up to 92 mm, and the left-to-right-ventricle direction turns from scan to
scan. Relative to the volume centre, the network and the codes have to spend themselves on where the heart
is. The heart frame is a rigid map of world millimetres per case:

- origin: the centroid of the left ventricle (blood pool and myocardium), in mm;
- z: the slice normal (the image's third voxel axis), so short-axis slices stay planes of constant z;
- x: the direction from the LV centroid to the RV blood pool's centroid, projected into the slice plane;
- y: z cross x (right-handed).

Training takes it from the labels (:class:`HeartPosed`); inference has no labels and estimates it from the
image (see :class:`~nisf_monai.inferers.LatentOptimisationInferer`). The pose travels in the image's
metadata (``POSE_KEY``), where :class:`~nisf_monai.transforms.CoordinateGridd` and the inferer read it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from nisf_monai.transforms.coordinates import POSE_KEY

__all__ = ["HeartPosed", "heart_pose", "pose_matrix"]

logger = logging.getLogger("nisf_monai")


def pose_matrix(origin: torch.Tensor | np.ndarray, rotation: torch.Tensor | np.ndarray) -> torch.Tensor:
    """4 x 4 map of world mm into a frame with the given origin (world mm) and axes (rows of ``rotation``)."""
    rotation = torch.as_tensor(np.asarray(rotation, dtype=np.float64))
    origin = torch.as_tensor(np.asarray(origin, dtype=np.float64))
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = rotation
    pose[:3, 3] = -rotation @ origin
    return pose


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
) -> torch.Tensor | None:
    """The heart frame's pose (4 x 4, world mm -> heart frame mm) of a label map ``(X, Y, Z)`` or ``(1, X, Y, Z)``
    in the bundle's classes, or None when it has no left ventricle. Without an RV (or ``rotate=False``) the
    axes stay the image's world axes and only the origin moves."""
    label = np.asarray(label)
    label = label[0] if label.ndim == 4 else label
    affine = np.asarray(affine, dtype=np.float64)
    lv = _centroid(np.isin(label, list(lv_classes)), affine)
    if lv is None:
        return None
    rotation = np.eye(3)
    rv = _centroid(np.isin(label, list(rv_classes)), affine) if rotate else None
    if rv is not None:
        normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
        towards_rv = rv - lv
        towards_rv = towards_rv - (towards_rv @ normal) * normal
        if np.linalg.norm(towards_rv) > 1e-6:
            x_axis = towards_rv / np.linalg.norm(towards_rv)
            rotation = np.stack([x_axis, np.cross(normal, x_axis), normal])
    return pose_matrix(lv, rotation)


class HeartPosed(MapTransform):
    """Puts each case's heart-frame pose, computed from its label, into the metadata of ``keys`` (``POSE_KEY``).

    Args:
        keys: images that get the pose (the image whose grid ``CoordinateGridd`` reads, and the label).
        label_key: the label map in the bundle's classes.
        lv_classes: classes whose centroid is the origin (LV blood pool and myocardium).
        rv_classes: classes whose centroid sets the x axis (RV blood pool).
        rotate: turn the in-plane axes to the LV -> RV direction; False moves the origin only.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        lv_classes: Sequence[int] = (1, 2),
        rv_classes: Sequence[int] = (3,),
        rotate: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.lv_classes = tuple(lv_classes)
        self.rv_classes = tuple(rv_classes)
        self.rotate = rotate

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        label = d[self.label_key]
        if not isinstance(label, MetaTensor):
            raise TypeError("the heart frame needs the label's affine: load it as a MetaTensor (MONAI LoadImaged).")
        pose = heart_pose(label.as_tensor(), label.affine, self.lv_classes, self.rv_classes, self.rotate)
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
