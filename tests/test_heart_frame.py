"""The heart frame: a pose per case from its labels (origin at the LV centroid, x towards the RV in the slice
plane, z along the slice normal), carried in the image metadata to the coordinates and the inferer."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from helpers import oblique_affine
from monai.data import MetaTensor

from nisf_monai.inferers import HeartLocator, HeartWeighting, LatentOptimisationInferer
from nisf_monai.transforms import POSE_KEY, CoordinateGridd, CoordinateMapping, HeartPosed, heart_pose
from nisf_monai.transforms.heart_frame import pose_matrix, split_pose

SHAPE = (24, 20, 6)


turned_affine = partial(oblique_affine, (1.5, 1.25, 8.0), (-30.0, 12.0, 40.0))  # oblique axes turned about z


def two_ventricles() -> np.ndarray:
    """LV blood pool + myocardium block around voxel (8, 10, 1..4), RV block around (17, 6, 1..4)."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[5:12, 7:14, 1:5] = 2
    label[7:10, 9:12, 1:5] = 1
    label[15:20, 4:9, 1:5] = 3
    return label


def to_world(affine: np.ndarray, index) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, dtype=float) + affine[:3, 3]


def test_pose_puts_lv_at_origin_and_rv_on_the_x_axis():
    affine = turned_affine(math.pi / 5)
    label = two_ventricles()
    pose = heart_pose(label, affine).numpy()
    lv = to_world(affine, np.argwhere(np.isin(label, [1, 2])).mean(axis=0))
    rv = to_world(affine, np.argwhere(label == 3).mean(axis=0))
    np.testing.assert_allclose(pose[:3, :3] @ lv + pose[:3, 3], 0.0, atol=1e-9)
    rv_heart = pose[:3, :3] @ rv + pose[:3, 3]
    assert rv_heart[0] > 10.0 and abs(rv_heart[1]) < 1e-9  # in-plane: straight along +x
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)  # rigid
    assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    np.testing.assert_allclose(pose[2, :3], normal, atol=1e-12)  # slices stay planes of constant z


def test_pose_follows_the_heart_not_the_field_of_view():
    """The same heart, shifted in the field of view and seen with other axes, gets the same heart coordinates."""
    label = two_ventricles()
    shifted = np.roll(label, (3, -2), axis=(0, 1))
    a, b = turned_affine(0.3), turned_affine(1.1)
    # a voxel of the LV in each scan, same place relative to the heart
    heart_a = CoordinateMapping(a, SHAPE, 100.0, pose=heart_pose(label, a)).from_world(
        torch.as_tensor(to_world(a, [8, 10, 2]))[None]
    )
    heart_b = CoordinateMapping(b, SHAPE, 100.0, pose=heart_pose(shifted, b)).from_world(
        torch.as_tensor(to_world(b, [11, 8, 2]))[None]
    )
    torch.testing.assert_close(heart_a, heart_b, atol=1e-6, rtol=0)


def test_no_rv_or_no_rotation_keeps_world_axes():
    affine = turned_affine(math.pi / 5)
    label = two_ventricles()
    assert torch.equal(heart_pose(label, affine, rotate=False)[:3, :3], torch.eye(3, dtype=torch.float64))
    label[label == 3] = 0
    assert torch.equal(heart_pose(label, affine)[:3, :3], torch.eye(3, dtype=torch.float64))
    assert heart_pose(np.zeros(SHAPE), affine) is None


def test_transform_carries_the_pose_to_the_coordinates():
    affine = torch.as_tensor(turned_affine(math.pi / 5))
    data = {
        "image": MetaTensor(torch.rand(1, *SHAPE), affine=affine),
        "label": MetaTensor(torch.as_tensor(two_ventricles())[None], affine=affine),
    }
    posed = HeartPosed(["image", "label"])(data)
    pose = posed["image"].meta[POSE_KEY]
    coords = CoordinateGridd("image", extent_mm=100.0)(posed)["coords"]
    expected = CoordinateMapping(affine, SHAPE, 100.0, pose=pose).grid(affine, SHAPE).T.reshape(3, *SHAPE)
    torch.testing.assert_close(coords.as_tensor(), expected)
    plain = CoordinateGridd("image", extent_mm=100.0)(
        data | {"image": MetaTensor(torch.rand(1, *SHAPE), affine=affine)}
    )["coords"]
    assert not torch.allclose(plain.as_tensor(), coords.as_tensor())
    # the inferer reads the same frame from the image's metadata
    mapping = LatentOptimisationInferer(extent_mm=100.0).frame_of(posed["image"][None])
    torch.testing.assert_close(mapping.grid(affine, SHAPE).T.reshape(3, *SHAPE), expected)


def lv_volume_ml(label: np.ndarray, affine: np.ndarray) -> float:
    return float(np.isin(label, [1, 2]).sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000.0


def test_reference_volume_scales_the_frame_and_keeps_origin_and_axes():
    affine = turned_affine(math.pi / 5)
    label = two_ventricles()
    rigid = heart_pose(label, affine)
    scaled = heart_pose(label, affine, reference_volume_ml=8.0 * lv_volume_ml(label, affine))
    (origin, axes, scale), (rigid_origin, rigid_axes, rigid_scale) = split_pose(scaled), split_pose(rigid)
    assert scale == pytest.approx(2.0) and rigid_scale == pytest.approx(1.0)
    torch.testing.assert_close(origin, rigid_origin)
    torch.testing.assert_close(axes, rigid_axes)
    point = to_world(affine, [8, 10, 2])
    np.testing.assert_allclose(
        scaled[:3, :3].numpy() @ point + scaled[:3, 3].numpy(),
        2.0 * (rigid[:3, :3].numpy() @ point + rigid[:3, 3].numpy()),
    )


def test_a_larger_heart_fills_the_scaled_frame_as_a_smaller_one_does():
    """The same heart at 1.5x the size (every voxel 1.5x larger) gets the same coordinates in the scaled frame."""
    label = two_ventricles()
    small = turned_affine(0.3)
    large = small.copy()
    large[:3, :3] *= 1.5
    coords = {}
    for name, affine in (("small", small), ("large", large)):
        pose = heart_pose(label, affine, reference_volume_ml=1.0)
        mapping = CoordinateMapping(affine, SHAPE, 100.0, pose=pose)
        coords[name] = mapping.from_world(torch.as_tensor(to_world(affine, [11, 8, 3]))[None])
    torch.testing.assert_close(coords["small"], coords["large"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reference_volume_ml"):
        HeartPosed(["image"], reference_volume_ml=-1.0)


def test_a_corrected_pose_in_a_scaled_frame_matches_the_moved_coordinates():
    """The refinement moves coordinates (frame units); the pose it returns must give the same coordinates."""
    from nisf_monai.inferers.heart_locator import HeartLocator, _corrected_pose, _moved

    affine = turned_affine(0.7)
    origin, rotation, scale = split_pose(heart_pose(two_ventricles(), affine, reference_volume_ml=1.0))
    assert scale != pytest.approx(1.0)
    world = torch.as_tensor(np.stack([to_world(affine, i) for i in [[3, 4, 1], [12, 9, 2], [20, 15, 5]]]))
    shift_mm, angle, extent = torch.tensor([7.0, -4.0, 2.5], dtype=torch.float64), 0.3, 100.0
    base = HeartLocator._coords(world, origin[None], (rotation * scale)[None], extent)
    moved = _moved(base.double(), (shift_mm / extent)[None], torch.tensor([angle], dtype=torch.float64))
    corrected = _corrected_pose(origin, rotation, shift_mm, angle, scale)
    direct = CoordinateMapping(affine, SHAPE, extent, pose=corrected).from_world(world)
    torch.testing.assert_close(direct.double(), moved[0].T, atol=1e-5, rtol=0)
    assert split_pose(corrected)[2] == pytest.approx(scale)


def test_label_without_lv_warns_and_keeps_volume_centre(caplog):
    affine = torch.as_tensor(turned_affine(math.pi / 5))
    data = {
        "image": MetaTensor(torch.rand(1, *SHAPE), affine=affine),
        "label": MetaTensor(torch.zeros(1, *SHAPE), affine=affine),
    }
    out = HeartPosed(["image", "label"])(data)
    assert POSE_KEY not in out["image"].meta
    assert "no left ventricle" in caplog.text


class TwoBlobField(torch.nn.Module):
    """An analytic 'network' in the heart frame: a bright LV disc at the origin and a dimmer RV disc 40 mm along +x
    (the intensity head only; the code is ignored). Images made from it at a known pose test the pose search."""

    latent_dim = 4
    num_classes = 2

    def __init__(self, extent_mm: float) -> None:
        super().__init__()
        self.extent_mm = extent_mm
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward_heads(self, coords: torch.Tensor, latent: torch.Tensor):
        x, y = coords[:, 0] * self.extent_mm, coords[:, 1] * self.extent_mm
        lv = torch.exp(-(x**2 + y**2) / (2 * 12.0**2))
        rv = torch.exp(-((x - 40.0) ** 2 + y**2) / (2 * 15.0**2))
        logit = self.gain * (6.0 * lv + 3.0 * rv - 3.0)
        return logit.new_zeros(logit.shape[0], 2, *logit.shape[1:]), logit[:, None]


def image_at_pose(field: TwoBlobField, affine: np.ndarray, shape, pose: torch.Tensor) -> MetaTensor:
    mapping = CoordinateMapping(affine, shape, field.extent_mm, pose=pose)
    coords = mapping.grid(affine, shape).T[None]
    with torch.no_grad():
        _, logit = field.forward_heads(coords, torch.zeros(1, 4))
    return MetaTensor(torch.sigmoid(logit[0]).reshape(1, *shape), affine=torch.as_tensor(affine))


@pytest.mark.parametrize("extent", [100.0, 400.0])  # the search moves in millimetres whatever the coordinate scale
def test_locator_recovers_a_known_pose(extent):
    from nisf_monai.transforms import pose_matrix

    field = TwoBlobField(extent)
    affine = turned_affine(0.4)
    affine[:3, :3] = affine[:3, :3] @ np.diag([2.0 / 1.5, 2.0 / 1.25, 1.0])  # 2 mm in-plane, 8 mm slices
    shape = (70, 70, 4)
    centre = CoordinateMapping(affine, shape).centre.numpy()
    e1 = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    e2 = np.cross(normal, e1)
    theta = math.radians(100.0)
    x_axis = math.cos(theta) * e1 + math.sin(theta) * e2
    origin = centre + 22.0 * e1 - 17.0 * e2
    truth = pose_matrix(origin, np.stack([x_axis, np.cross(normal, x_axis), normal]))
    image = image_at_pose(field, affine, shape, truth)

    pose = HeartLocator(score_points=4096, refine_steps=150, learning_rate=2e-2).locate(image, field, extent)
    found_origin = (-pose[:3, :3].T @ pose[:3, 3]).numpy()
    assert np.linalg.norm(found_origin - origin) < 3.0
    cos_angle = float(pose[0, :3].numpy() @ x_axis)
    assert math.degrees(math.acos(min(1.0, cos_angle))) < 5.0


def test_inferer_locates_before_fitting_and_keeps_the_pose():
    """A heart-frame inferer puts the found pose into the case's metadata; outputs stay on the world grid."""
    extent = 400.0
    field = TwoBlobField(extent)
    affine = turned_affine(0.2)
    shape = (40, 40, 3)
    image = image_at_pose(field, affine, shape, torch.eye(4, dtype=torch.float64))  # heart at the world origin
    inferer = LatentOptimisationInferer(
        num_steps=2, num_points=64, extent_mm=extent, heart_locator=HeartLocator(), log_every=0
    )
    out = inferer.fit_and_sample([image], field)[0]
    assert POSE_KEY in image.meta
    np.testing.assert_allclose(np.asarray(out["pred"].affine), affine)
    assert tuple(out["pred"].shape[1:]) == shape
    with pytest.raises(ValueError, match="fit_weighting is measured from the heart frame"):
        LatentOptimisationInferer(fit_weighting=HeartWeighting(40.0))


def test_pose_search_looks_only_at_kept_voxels():
    """With a mask (hidden slices, sparse input), the search draws its voxels among the kept ones only, and the
    inferer hands each case's mask to it."""

    affine = turned_affine(0.3)
    image = MetaTensor(torch.rand(1, *SHAPE), affine=torch.as_tensor(affine))
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[..., 2] = True  # one slice kept
    kept = mask.reshape(-1).nonzero().squeeze(1)
    world, _ = HeartLocator(score_points=500)._voxels(image, torch.Generator().manual_seed(0), kept)
    index = np.linalg.solve(affine[:3, :3], (world.numpy() - affine[:3, 3]).T).T
    np.testing.assert_allclose(index[:, 2], 2.0, atol=1e-6)

    seen = []

    class Recording(HeartLocator):
        def locate(self, image, network, extent_mm, mask=None):
            seen.append(mask)
            return torch.eye(4, dtype=torch.float64)

    field = TwoBlobField(100.0)
    inferer = LatentOptimisationInferer(
        num_steps=1, num_points=16, extent_mm=100.0, heart_locator=Recording(), log_every=0
    )
    inferer.fit([image], field, masks=[mask[None]])
    assert len(seen) == 1 and torch.equal(seen[0].reshape(SHAPE), mask)


def test_points_drawn_near_the_heart_follow_its_gaussian():
    """``HeartWeighting(draw=True)`` draws points from the heart weighting: on a wide field, about 1 - exp(-1/2) =
    39% of them lie within one sigma of the heart's axis in the slice plane, where a uniform draw puts only a few."""
    extent, sigma = 100.0, 20.0
    affine, shape = turned_affine(0.2), (120, 120, 4)
    centre = to_world(affine, (np.asarray(shape) - 1) / 2)  # the heart in the middle of a 180 mm field
    mapping = CoordinateMapping(affine, shape, extent, pose=pose_matrix(centre, np.eye(3)))
    coords = mapping.grid(mapping.affine, shape).T  # (3, P) heart-frame network units
    radius_mm = torch.linalg.norm(coords[:2], dim=0) * extent

    def within_sigma(draw: bool) -> float:
        weighting = HeartWeighting(sigma, draw=draw)
        inferer = LatentOptimisationInferer(
            num_points=4000, extent_mm=extent, heart_locator=HeartLocator(), fit_weighting=weighting
        )
        index = inferer._draw(coords.shape[-1], torch.Generator().manual_seed(0), inferer._draw_cdf(coords))
        return float((radius_mm[index] < sigma).float().mean())

    assert abs(within_sigma(True) - (1 - math.exp(-0.5))) < 0.04
    assert within_sigma(False) < 0.1
