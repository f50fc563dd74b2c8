"""Unit tests of physical coordinates (CoordinateMapping, CoordinateGridd), point sampling (RandPointSampled)
and output grids (target_grid)."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged, Spacing

from nisf_monai.inferers import target_grid
from nisf_monai.transforms import CoordinateFrame, CoordinateGridd, CoordinateMapping, RandPointSampled, coordinates


def make_affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def rot_z(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


OBLIQUE = make_affine(rot_z(math.pi / 6) @ np.diag([2.0, 2.0, 5.0]), [10.0, -20.0, 30.0])
AFFINES = {
    "identity": np.eye(4),
    "anisotropic": make_affine(np.diag([2.0, 3.0, 10.0]), [10.0, -5.0, 7.0]),
    "flipped": make_affine(np.diag([-1.5, 1.0, -4.0]), [100.0, 0.0, 50.0]),
    "oblique": OBLIQUE,
}


def grid_of(mapping: CoordinateMapping, affine, shape) -> np.ndarray:
    """Network coordinates of every voxel as an (X, Y, Z, 3) array."""
    return mapping.grid(affine, shape).numpy().reshape(*shape, 3)


# ---------------------------------------------------------------------------------------------- CoordinateMapping


@pytest.mark.parametrize(
    "name,index,expected",
    [
        ("identity", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
        ("anisotropic", [1.0, 2.0, 3.0], [10.0 + 2.0, -5.0 + 6.0, 7.0 + 30.0]),
        ("flipped", [4.0, 2.0, 1.0], [100.0 - 6.0, 2.0, 50.0 - 4.0]),
        (
            "oblique",  # 30 degrees about z: x = 2 cos30 i - 2 sin30 j + 10, y = 2 sin30 i + 2 cos30 j - 20
            [3.0, 1.0, 2.0],
            [
                2 * math.cos(math.pi / 6) * 3 - 2 * 0.5 * 1 + 10,
                2 * 0.5 * 3 + 2 * math.cos(math.pi / 6) * 1 - 20,
                30 + 10,
            ],
        ),
    ],
)
def test_index_to_world_by_hand(name: str, index, expected) -> None:
    """index_to_world lands where the hand-computed affine product says, for several kinds of affine."""
    mapping = CoordinateMapping(AFFINES[name], (8, 8, 8))
    world = mapping.index_to_world(torch.tensor([index]))
    np.testing.assert_allclose(world.numpy()[0], expected, atol=1e-9)
    np.testing.assert_allclose(mapping.world_to_index(world).numpy()[0], index, atol=1e-9)


@pytest.mark.parametrize("name", list(AFFINES))
def test_world_to_index_inverts_index_to_world(name: str) -> None:
    """world_to_index(index_to_world(i)) == i for random continuous indices, and the other way round."""
    mapping = CoordinateMapping(AFFINES[name], (8, 8, 8))
    index = torch.rand(20, 3, dtype=torch.float64) * 8
    torch.testing.assert_close(mapping.world_to_index(mapping.index_to_world(index)), index)
    world = torch.randn(20, 3, dtype=torch.float64) * 50
    torch.testing.assert_close(mapping.index_to_world(mapping.world_to_index(world)), world)


@pytest.mark.parametrize("name", list(AFFINES))
def test_centre_voxel_is_origin(name: str) -> None:
    """In 'world' mode the central voxel of an odd-sized volume has network coordinate (0, 0, 0)."""
    shape = (5, 7, 3)
    mapping = CoordinateMapping(AFFINES[name], shape)
    coords = grid_of(mapping, AFFINES[name], shape)
    np.testing.assert_allclose(coords[2, 3, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(mapping.from_world(mapping.centre[None]).numpy(), 0.0, atol=1e-7)


def test_centre_of_even_volume_is_between_voxels() -> None:
    """For an even-sized axis the centre is half-way between the two middle voxels: they map to -+ half a
    voxel / extent."""
    mapping = CoordinateMapping(np.diag([2.0, 1.0, 1.0, 1.0]), (4, 3, 3), extent_mm=100.0)
    coords = grid_of(mapping, mapping.affine, (4, 3, 3))
    np.testing.assert_allclose(coords[1, 1, 1], [-1.0 / 100, 0, 0], atol=1e-7)
    np.testing.assert_allclose(coords[2, 1, 1], [1.0 / 100, 0, 0], atol=1e-7)


@pytest.mark.parametrize("extent_mm,expected", [(400.0, 0.5), (250.0, 0.8)])
def test_world_mode_scales_by_extent(extent_mm: float, expected: float) -> None:
    """A voxel 200 mm from the centre along x maps to 200 / extent_mm on x and 0 on y, z."""
    shape = (41, 3, 3)  # 10 mm voxels: index 20 is the centre, index 40 is 200 mm away
    affine = make_affine(np.diag([10.0, 1.0, 1.0]), [-37.0, 12.0, 4.0])
    mapping = CoordinateMapping(affine, shape, extent_mm=extent_mm)
    coords = grid_of(mapping, affine, shape)
    np.testing.assert_allclose(coords[40, 1, 1], [expected, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(coords[0, 1, 1], [-expected, 0.0, 0.0], atol=1e-6)


def test_world_mode_oblique_axis_direction() -> None:
    """Along an oblique axis a step of one voxel moves by the affine's column / extent in all world axes."""
    shape = (5, 5, 3)
    mapping = CoordinateMapping(OBLIQUE, shape, extent_mm=10.0)
    coords = grid_of(mapping, OBLIQUE, shape)
    step = coords[3, 2, 1] - coords[2, 2, 1]
    np.testing.assert_allclose(step, [2 * math.cos(math.pi / 6) / 10, 2 * 0.5 / 10, 0.0], atol=1e-6)


@pytest.mark.parametrize("name", list(AFFINES))
def test_voxel_mode_is_index_over_shape(name: str) -> None:
    """'voxel' mode gives index / axis length, ignoring spacing and orientation."""
    shape = (4, 5, 2)
    mapping = CoordinateMapping(AFFINES[name], shape, mode="voxel")
    coords = grid_of(mapping, AFFINES[name], shape)
    i, j, k = np.meshgrid(np.arange(4), np.arange(5), np.arange(2), indexing="ij")
    expected = np.stack([i / 4, j / 5, k / 2], axis=-1)
    np.testing.assert_allclose(coords, expected, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flipped_copy_gets_same_coordinates(axis: int) -> None:
    """A volume flipped along an axis (np.flip + the matching affine) is the same physical volume: each
    voxel gets the coordinates of its counterpart in the original."""
    shape = (6, 5, 4)
    affine = OBLIQUE
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = shape[axis] - 1  # new index i' = n - 1 - i
    flipped_affine = affine @ flip
    original = grid_of(CoordinateMapping(affine, shape), affine, shape)
    flipped = grid_of(CoordinateMapping(flipped_affine, shape), flipped_affine, shape)
    np.testing.assert_allclose(flipped, np.flip(original, axis=axis), atol=1e-6)
    # sanity: the flip does move voxels, so the comparison is not trivially true
    assert np.abs(flipped - original).max() > 1e-3


def test_finer_grid_in_reference_coordinates() -> None:
    """mapping.grid(other_affine) places another grid in the reference scan's coordinates: voxel 2i of a grid at
    half the spacing (same origin) has the coordinates of voxel i of the reference grid."""
    shape = (4, 4, 3)
    mapping = CoordinateMapping(OBLIQUE, shape)
    fine_affine = OBLIQUE.copy()
    fine_affine[:3, :3] /= 2.0
    fine_shape = (7, 7, 5)
    coarse = grid_of(mapping, OBLIQUE, shape)
    fine = grid_of(mapping, fine_affine, fine_shape)
    np.testing.assert_allclose(fine[::2, ::2, ::2], coarse, atol=1e-6)


def test_grid_chunks_concatenate_to_full_grid() -> None:
    """Chunks [start, stop) in C order concatenate to the full grid; stop beyond the end is clipped."""
    shape = (3, 4, 5)
    mapping = CoordinateMapping(OBLIQUE, shape)
    full = mapping.grid(OBLIQUE, shape)
    parts = [mapping.grid(OBLIQUE, shape, s, s + 7) for s in range(0, 60, 7)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)
    assert full.shape == (60, 3) and full.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match", [({"mode": "index"}, "mode"), ({"extent_mm": 0.0}, "extent_mm"), ({"affine": np.eye(3)}, "4 x 4")]
)
def test_mapping_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    """Unknown mode, non-positive extent or a non 4 x 4 affine raise ValueError."""
    args = {"affine": np.eye(4), "spatial_shape": (2, 2, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        CoordinateMapping(**args)


def test_former_name_is_removed_with_a_pointer_to_the_new_one() -> None:
    """``CoordinateFrame``, the name before issue 12, warned through 0.5 and is removed in 0.6.0: using it raises
    an error that names ``CoordinateMapping``; the new name warns about nothing."""
    from monai.utils.deprecate_utils import DeprecatedError

    shape = (4, 3, 5)
    with pytest.raises(DeprecatedError, match="CoordinateMapping"):
        CoordinateFrame(OBLIQUE, shape, extent_mm=50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoordinateMapping(OBLIQUE, shape, extent_mm=50.0)
    assert coordinates.CoordinateFrame is CoordinateFrame  # the pointer is importable from the module as well


# ---------------------------------------------------------------------------------------------- CoordinateGridd


@pytest.mark.parametrize("mode", ["world", "voxel"])
def test_coordinate_gridd_on_metatensor(mode: str) -> None:
    """CoordinateGridd adds channel-first (3, X, Y, Z) coordinates equal to the mapping's, carrying the affine."""
    shape = (4, 3, 5)
    image = MetaTensor(torch.rand(1, *shape), affine=torch.as_tensor(OBLIQUE))
    out = CoordinateGridd("image", extent_mm=50.0, mode=mode)({"image": image})
    coords = out["coords"]
    assert coords.shape == (3, *shape) and coords.dtype == torch.float32
    mapping = CoordinateMapping(OBLIQUE, shape, extent_mm=50.0, mode=mode)
    np.testing.assert_allclose(np.moveaxis(coords.numpy(), 0, -1), grid_of(mapping, OBLIQUE, shape), atol=1e-7)
    np.testing.assert_allclose(np.asarray(coords.affine), OBLIQUE)
    assert out["image"] is image


def test_coordinate_gridd_matches_hand_formula() -> None:
    """Each voxel's coordinate is (A [i, j, k, 1] - A [centre, 1]) / extent, computed independently."""
    shape = (3, 4, 2)
    affine = AFFINES["flipped"]
    image = MetaTensor(torch.rand(1, *shape), affine=torch.as_tensor(affine))
    coords = CoordinateGridd("image", coords_key="c", extent_mm=20.0)({"image": image})["c"].numpy()
    centre = affine @ np.array([1.0, 1.5, 0.5, 1.0])
    for i, j, k in [(0, 0, 0), (2, 3, 1), (1, 2, 0)]:
        expected = (affine @ np.array([i, j, k, 1.0]) - centre)[:3] / 20.0
        np.testing.assert_allclose(coords[:, i, j, k], expected, atol=1e-6)


def test_coordinate_gridd_from_nifti(tmp_path) -> None:
    """Coordinates of a NIfTI loaded by LoadImaged follow the file's (oblique) affine."""
    shape = (5, 4, 3)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), OBLIQUE), path)
    data = LoadImaged("image", ensure_channel_first=True, image_only=True)({"image": str(path)})
    coords = CoordinateGridd("image", extent_mm=100.0)(data)["coords"].numpy()
    centre = OBLIQUE @ np.array([2.0, 1.5, 1.0, 1.0])
    expected = (OBLIQUE @ np.array([4.0, 0.0, 2.0, 1.0]) - centre)[:3] / 100.0
    np.testing.assert_allclose(coords[:, 4, 0, 2], expected, atol=1e-5)


def test_coordinate_gridd_needs_metatensor() -> None:
    """A plain tensor has no affine: TypeError telling the user to load a MetaTensor."""
    with pytest.raises(TypeError, match="MetaTensor"):
        CoordinateGridd("image")({"image": torch.rand(1, 3, 3, 3)})


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 2, 3, 4, 5)])
def test_coordinate_gridd_rejects_non_3d(shape) -> None:
    """A 2D (or 4D) image raises ValueError asking for (C, X, Y, Z)."""
    image = MetaTensor(torch.rand(*shape))
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        CoordinateGridd("image")({"image": image})


def test_coordinate_gridd_missing_key_allowed() -> None:
    """With allow_missing_keys the transform is a no-op when the image is absent."""
    data = {"label": torch.zeros(1)}
    assert CoordinateGridd("image", allow_missing_keys=True)(data) == data


# ---------------------------------------------------------------------------------------------- RandPointSampled


def sample_case(shape=(6, 5, 4)):
    """Image and label that are known functions of the voxel-mode coordinates, so sampled points can be
    checked for correspondence."""
    affine = torch.as_tensor(AFFINES["anisotropic"])
    image = MetaTensor(torch.zeros(1, *shape), affine=affine)
    coords = CoordinateGridd("image", mode="voxel")({"image": image})["coords"]
    index = coords.as_tensor() * torch.tensor(shape, dtype=torch.float32)[:, None, None, None]  # voxel indices
    image = MetaTensor((index[0] * 100 + index[1] * 10 + index[2])[None], affine=affine)
    label = MetaTensor(((index[0] + index[1]) % 3)[None], affine=affine)
    return {"image": image, "label": label, "coords": coords}, shape


def test_point_sampling_keeps_correspondence() -> None:
    """Image, label and coords are sampled at the same voxels: values match the functions they came from."""
    data, shape = sample_case()
    sampler = RandPointSampled(["image", "label", "coords"], num_points=50)
    sampler.set_random_state(0)
    out = sampler(data)
    idx = (out["coords"] * torch.tensor(shape, dtype=torch.float32)[:, None]).round()
    assert out["image"].shape == (1, 50) and out["label"].shape == (1, 50) and out["coords"].shape == (3, 50)
    torch.testing.assert_close(out["image"][0], idx[0] * 100 + idx[1] * 10 + idx[2])
    torch.testing.assert_close(out["label"][0], (idx[0] + idx[1]) % 3)
    for k in ("image", "label", "coords"):
        assert not isinstance(out[k], MetaTensor)


def test_point_sampling_without_replacement() -> None:
    """When num_points <= voxels, points are distinct voxels; more points than voxels still gives num_points."""
    data, shape = sample_case()
    n_vox = int(np.prod(shape))
    sampler = RandPointSampled(["image", "coords"], num_points=n_vox)
    sampler.set_random_state(1)
    out = sampler(data)
    assert torch.unique(out["image"]).numel() == n_vox  # image values are unique per voxel
    big = RandPointSampled(["image", "coords"], num_points=n_vox + 17)
    big.set_random_state(1)
    assert big(data)["image"].shape == (1, n_vox + 17)


def test_point_sampling_none_keeps_all_in_c_order() -> None:
    """num_points=None returns every voxel in C order (a plain reshape)."""
    data, shape = sample_case()
    out = RandPointSampled(["image", "label", "coords"], num_points=None)(data)
    for k in ("image", "label", "coords"):
        torch.testing.assert_close(out[k], data[k].as_tensor().reshape(data[k].shape[0], -1), rtol=0, atol=0)


def test_point_sampling_reproducible_with_seed() -> None:
    """Same random state -> same points; another seed -> other points."""
    data, _ = sample_case()

    def draw(seed):
        sampler = RandPointSampled(["image", "coords"], num_points=30)
        sampler.set_random_state(seed)
        return sampler(data)["image"]

    torch.testing.assert_close(draw(7), draw(7), rtol=0, atol=0)
    assert not torch.equal(draw(7), draw(8))


def test_point_sampling_jitter_only_on_coords() -> None:
    """jitter adds Gaussian noise of about that std to coords only; image values stay exact."""
    data, shape = sample_case((10, 10, 10))
    sampler = RandPointSampled(["image", "coords"], num_points=2000, jitter=0.01)
    sampler.set_random_state(3)
    out = sampler(data)
    clean_sampler = RandPointSampled(["image", "coords"], num_points=2000)
    clean_sampler.set_random_state(3)
    clean = clean_sampler(data)
    torch.testing.assert_close(out["image"], clean["image"], rtol=0, atol=0)
    noise = out["coords"] - clean["coords"]
    assert abs(float(noise.std()) - 0.01) < 1e-3
    assert abs(float(noise.mean())) < 1e-3


def test_point_sampling_shape_mismatch_raises() -> None:
    """Keys of different spatial shapes cannot share points: ValueError."""
    data = {"image": torch.rand(1, 4, 4, 4), "label": torch.rand(1, 4, 4, 3)}
    with pytest.raises(ValueError, match="spatial shape"):
        RandPointSampled(["image", "label"], num_points=5)(data)


def test_point_sampling_rejects_non_positive_num_points() -> None:
    """num_points 0 is rejected at construction."""
    with pytest.raises(ValueError, match="num_points"):
        RandPointSampled(["image"], num_points=0)


# ---------------------------------------------------------------------------------------------- target_grid


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.0, 1.5, 3.0), (0.7,)])
def test_target_grid_matches_monai_spacing(name: str, spacing) -> None:
    """target_grid gives the affine and shape MONAI's Spacing produces on a MetaTensor."""
    shape = (10, 9, 5)
    image = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(AFFINES[name]))
    expected = Spacing(pixdim=spacing)(image)
    affine, out_shape = target_grid(AFFINES[name], shape, spacing)
    assert list(out_shape) == list(expected.shape[1:])
    np.testing.assert_allclose(affine, np.asarray(expected.affine), atol=1e-6)
    # and the new grid has the requested spacing along the input's axis directions
    sp = spacing * 3 if len(spacing) == 1 else spacing
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), sp, atol=1e-9)


def test_target_grid_none_keeps_input() -> None:
    """spacing=None returns the input affine and shape unchanged."""
    affine, shape = target_grid(torch.as_tensor(OBLIQUE), (4, 5, 6), None)
    np.testing.assert_allclose(affine, OBLIQUE)
    assert list(shape) == [4, 5, 6]


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 1.0), (1.0, 1.0, 1.0, 1.0)])
def test_target_grid_invalid_spacing_raises(spacing) -> None:
    """Zero, negative or wrongly sized spacings raise ValueError."""
    with pytest.raises(ValueError, match="target_spacing"):
        target_grid(np.eye(4), (4, 4, 4), spacing)


def test_target_grid_scalar_spacing() -> None:
    """A single spacing value applies to all three axes."""
    affine, shape = target_grid(np.eye(4), (10, 10, 10), 2.0)
    expected_affine, expected_shape = target_grid(np.eye(4), (10, 10, 10), (2.0, 2.0, 2.0))
    np.testing.assert_allclose(affine, expected_affine)
    assert list(shape) == list(expected_shape)


@pytest.mark.parametrize("spacing", [0.0, -1.5])
def test_target_grid_invalid_scalar_spacing_raises_value_error(spacing: float) -> None:
    """An invalid single spacing value raises ValueError, like an invalid sequence does."""
    with pytest.raises(ValueError, match="target_spacing"):
        target_grid(np.eye(4), (4, 4, 4), spacing)


def _heart_case(shape=(40, 30, 8), spacing=(2.0, 2.0, 10.0)):
    """A small labelled block in a large background, on an anisotropic grid."""
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    label = torch.zeros(1, *shape)
    label[0, 18:22, 10:14, 3:5] = 2
    image = MetaTensor(torch.arange(float(np.prod(shape))).reshape(1, *shape), affine=affine)
    return {"image": image, "label": MetaTensor(label, affine=affine)}


def test_foreground_sampling_draws_its_share_inside_the_margin_box() -> None:
    """With foreground_fraction f, at least f of the points fall in the label's box dilated by the margin
    (in mm, so 10 mm is 5 voxels in-plane and 1 slice through-plane), and the rest cover the whole volume."""
    data = _heart_case()
    sampler = RandPointSampled(["image", "label"], num_points=4000, foreground_fraction=0.5, foreground_margin_mm=10.0)
    sampler.set_random_state(0)
    out = sampler(data)
    index = np.stack(np.unravel_index(out["image"][0].long().numpy(), (40, 30, 8)), axis=-1)
    lower, upper = np.array([18 - 5, 10 - 5, 3 - 1]), np.array([21 + 5, 13 + 5, 4 + 1])
    inside = np.all((index >= lower) & (index <= upper), axis=1)
    box_share = np.prod(upper - lower + 1) / (40 * 30 * 8)
    assert inside[2000:].all()  # the foreground draws
    assert abs(inside[:2000].mean() - box_share) < 0.05  # the uniform draws
    assert (out["label"] > 0).float().mean() > 5 * (data["label"] > 0).float().mean()  # ~0.5 x 32/784 vs 32/9600


def test_foreground_sampling_falls_back_to_uniform_without_foreground() -> None:
    data = _heart_case()
    data["label"] = data["label"] * 0
    sampler = RandPointSampled(["image", "label"], num_points=500, foreground_fraction=0.7)
    sampler.set_random_state(0)
    reference = RandPointSampled(["image", "label"], num_points=500)
    reference.set_random_state(0)
    torch.testing.assert_close(sampler(data)["image"], reference(data)["image"], rtol=0, atol=0)


def test_foreground_sampling_needs_a_label() -> None:
    data = _heart_case()
    del data["label"]
    with pytest.raises(KeyError, match="foreground_fraction needs the label"):
        RandPointSampled(["image"], num_points=10, foreground_fraction=0.5)(data)
    with pytest.raises(ValueError, match="foreground_fraction"):
        RandPointSampled(["image"], foreground_fraction=1.5)
