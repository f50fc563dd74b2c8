"""Property tests of the coordinate system over random grids: rotations from random quaternions, spacings
of 0.3-10 mm, flipped axes, translations and shapes.

The claims: a voxel's position is a function of the physical point alone (not of how the array is
stored), index and world maps invert each other, the target grid at the input's own spacing is the input
grid, and the flat grid enumeration used for sampling lines up with the voxels in C order.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from nisf_monai.inferers import target_grid
from nisf_monai.transforms import CoordinateGridd, CoordinateMapping

SETTINGS = settings(max_examples=50, deadline=None, database=None)  # no example database written into the repository
EXTENT = 400.0


def quaternion_rotation(q: tuple[float, float, float, float]) -> np.ndarray:
    """Rotation matrix of a (not necessarily unit) quaternion w, x, y, z; identity for a ~zero one."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / max(np.linalg.norm(q), 1e-12)
    if np.linalg.norm(q) < 1e-6:
        return np.eye(3)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


unit = st.floats(-1.0, 1.0, allow_nan=False)
spacings = st.tuples(*[st.floats(0.3, 10.0, allow_nan=False)] * 3)
flips = st.tuples(*[st.booleans()] * 3)
translations = st.tuples(*[st.floats(-300.0, 300.0, allow_nan=False)] * 3)
shapes = st.tuples(*[st.integers(1, 9)] * 3)


@st.composite
def affines(draw: st.DrawFn) -> np.ndarray:
    """Voxel-to-world matrices: rotation x (possibly flipped) spacing, plus a translation."""
    rotation = quaternion_rotation(draw(st.tuples(unit, unit, unit, unit)))
    signs = np.where(draw(flips), -1.0, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(signs * np.asarray(draw(spacings)))
    affine[:3, 3] = draw(translations)
    return affine


def c_order_indices(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel indices (N, 3) in C (row-major) order, built without the code under test."""
    return np.array(
        [(i, j, k) for i in range(shape[0]) for j in range(shape[1]) for k in range(shape[2])], dtype=np.float64
    )


def network_coords(array: np.ndarray, affine: np.ndarray, extent: float = EXTENT) -> np.ndarray:
    """The coordinates CoordinateGridd gives every voxel of a channel-first (1, X, Y, Z) MetaTensor."""
    img = MetaTensor(torch.as_tensor(array[None].copy()), affine=torch.as_tensor(affine))
    return CoordinateGridd("image", extent_mm=extent)({"image": img})["coords"].as_tensor().numpy()


@SETTINGS
@given(
    affine=affines(), shape=shapes, points=st.lists(st.tuples(*[st.floats(-3.0, 12.0)] * 3), min_size=1, max_size=16)
)
def test_index_world_round_trip(affine: np.ndarray, shape: tuple[int, ...], points: list) -> None:
    """index -> world -> index and world -> index -> world return their input (continuous indices, also
    outside the volume), and index_to_world is the affine."""
    mapping = CoordinateMapping(affine, shape)
    index = torch.as_tensor(points, dtype=torch.float64)
    world = mapping.index_to_world(index)
    np.testing.assert_allclose(world.numpy(), index.numpy() @ affine[:3, :3].T + affine[:3, 3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(mapping.world_to_index(world).numpy(), index.numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        mapping.index_to_world(mapping.world_to_index(world)).numpy(), world.numpy(), rtol=0, atol=1e-8
    )


@SETTINGS
@given(affine=affines(), shape=shapes, flip=flips, perm=st.permutations([0, 1, 2]))
def test_coordinates_do_not_depend_on_storage(
    affine: np.ndarray, shape: tuple[int, ...], flip: tuple, perm: list
) -> None:
    """Storing the same volume with axes reversed and permuted (array and affine changed together, as
    another scanner or a reorientation would) gives every physical voxel the same network coordinates."""
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    axes = [a for a in range(3) if flip[a]]
    to_flipped = np.eye(4)  # old index i = n - 1 - i' on flipped axes
    for a in axes:
        to_flipped[a, a], to_flipped[a, 3] = -1.0, shape[a] - 1
    to_permuted = np.eye(4)  # new axis k is old axis perm[k]
    to_permuted[:3, :3] = np.eye(3)[:, perm]
    stored = np.transpose(np.flip(array, axes), perm)
    stored_affine = affine @ to_flipped @ to_permuted

    coords = network_coords(array, affine)
    stored_coords = network_coords(stored, stored_affine)
    # undo the storage change on the coordinate volumes (spatial axes follow the channel axis)
    undone = np.flip(np.transpose(stored_coords, [0, *[1 + perm.index(a) for a in range(3)]]), [1 + a for a in axes])
    np.testing.assert_array_equal(
        np.flip(np.transpose(stored[None], [0, *[1 + perm.index(a) for a in range(3)]]), [1 + a for a in axes])[0],
        array,
    )  # the undo is right
    np.testing.assert_allclose(undone, coords, rtol=0, atol=1e-6)


@SETTINGS
@given(affine=affines(), shape=shapes)
def test_target_grid_at_own_spacing_is_input_grid(affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """Resampling to the input's own spacing keeps the input grid: same shape and affine."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    new_affine, new_shape = target_grid(affine, shape, spacing.tolist())
    assert list(new_shape) == list(shape)
    np.testing.assert_allclose(new_affine, affine, rtol=0, atol=1e-6)


@SETTINGS
@given(affine=affines(), shape=shapes, extent=st.floats(50.0, 1000.0))
def test_grid_points_are_voxel_centres_in_c_order(affine: np.ndarray, shape: tuple[int, ...], extent: float) -> None:
    """The i-th point of CoordinateMapping.grid is the world position affine @ index of the i-th voxel in
    C order (mapped to network units), so an analytic field sampled at the grid points reshapes onto
    the voxel array: what a flattened label or intensity volume is compared with."""
    mapping = CoordinateMapping(affine, shape, extent_mm=extent)
    coords = mapping.grid(affine, shape).double()
    world = coords.numpy() * extent + mapping.centre.numpy()  # back from network units
    index = c_order_indices(shape)
    expected = index @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(world, expected, rtol=0, atol=1e-3)

    def field(points: np.ndarray) -> np.ndarray:  # smooth and not symmetric under any axis flip
        return np.sin(points @ np.array([0.05, -0.03, 0.02])) + points @ np.array([0.001, 0.002, -0.003])

    volume = np.zeros(shape)
    for i, j, k in np.ndindex(*shape):
        volume[i, j, k] = field((affine @ np.array([i, j, k, 1.0]))[:3])
    np.testing.assert_allclose(field(world).reshape(shape), volume, rtol=0, atol=1e-4)
    # CoordinateGridd lays the same points out channel-first, (3, X, Y, Z) flattening in C order
    gridded = network_coords(np.zeros(shape, np.float32), affine, extent)
    np.testing.assert_allclose(gridded.reshape(3, -1).T, coords.numpy(), rtol=0, atol=1e-6)
