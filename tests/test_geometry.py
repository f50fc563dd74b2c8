"""Planes anywhere and surface meshes: a plane that coincides with a voxel plane of a volume reads the same
values there, grids land where their affine says, and a sphere's mesh has the sphere's area and volume."""

from __future__ import annotations

import json
import math
import struct
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, REPO, oblique_affine
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, ScaleIntensityRangePercentilesd
from torch import nn

from nisf_monai.data import synthetic
from nisf_monai.errors import InputDataError, MissingFileError
from nisf_monai.geometry import (
    NetworkField,
    PlaneRun,
    marching_tetrahedra,
    plane_grid,
    reference_grid,
    resample_image,
    write_mesh,
)
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.io import save_nifti
from nisf_monai.networks import NISFNet
from nisf_monai.transforms import LoadCased

pytestmark = pytest.mark.usefixtures("single_thread")


# an oblique orientation (turned about z, tilted about x) and a left-handed grid as well
left_handed_affine = partial(oblique_affine, (1.5, 1.25, 6.0), (-20.0, 12.0, 5.0), 0.4, 0.25, flip_voxel_axis=1)


def inferer(**kwargs) -> LatentOptimisationInferer:
    return LatentOptimisationInferer(
        **{"num_steps": 2, "num_points": 64, "extent_mm": 100.0, "log_every": 0, "chunk_size": 500, **kwargs}
    )


def image_of(shape, affine) -> MetaTensor:
    return MetaTensor(torch.zeros(1, 1, *shape), affine=torch.as_tensor(affine))


class SyntheticHeartNet(nn.Module):
    """A 'network' whose segmentation is the synthetic generator's own continuous heart: network coordinates
    are mapped back to world mm through the coordinate mapping, labelled analytically, and returned as large logits."""

    num_classes = 4
    latent_dim = 1

    def __init__(self, seed: int, phase: str) -> None:
        super().__init__()
        self.heart = synthetic._heart(synthetic._draw_parameters(seed), phase)
        self.mapping = None

    def forward_heads(self, points: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        world = points[0].T.double() * self.mapping.extent_mm + self.mapping.centre
        labels = torch.as_tensor(synthetic._label_points(world.numpy(), self.heart)).long()
        logits = 20.0 * torch.nn.functional.one_hot(labels, 4).T.float()[None]
        return logits, torch.zeros(1, 1, labels.numel())


# ---- planes -------------------------------------------------------------------------------------------


def test_plane_grid_places_voxels_in_world() -> None:
    affine, shape = plane_grid(u=[2, 0, 0], v=[0, 0, 3], spacing=[0.5, 2.0], size=[5, 4], centre=[10, 20, 30])
    assert shape == [5, 4, 1]
    np.testing.assert_allclose(affine[:3, 0], [0.5, 0, 0])
    np.testing.assert_allclose(affine[:3, 1], [0, 0, 2.0])
    np.testing.assert_allclose(np.linalg.norm(affine[:3, 2]), 0.5)  # one voxel as thick as the finer spacing
    centre = affine @ np.array([2.0, 1.5, 0.0, 1.0])
    np.testing.assert_allclose(centre[:3], [10, 20, 30])
    origin_affine, _ = plane_grid(u=[2, 0, 0], v=[0, 0, 3], spacing=1.0, size=[5, 4], origin=[1, 2, 3])
    np.testing.assert_allclose(origin_affine[:3, 3], [1, 2, 3])
    # a volume, with w on the other side of the plane: the third axis flips
    box, box_shape = plane_grid(
        u=[1, 0, 0], v=[0, 1, 0], w=[0, 0, -5], spacing=[1, 1, 2], size=[3, 3, 4], origin=[0, 0, 0]
    )
    assert box_shape == [3, 3, 4]
    np.testing.assert_allclose(box[:3, 2], [0, 0, -2])


def test_plane_grid_orthogonalises_and_rejects_bad_planes() -> None:
    affine, _ = plane_grid(u=[1, 0, 0], v=[1, 1, 0], spacing=1.0, size=[3, 3], origin=[0, 0, 0])
    np.testing.assert_allclose(affine[:3, 1], [0, 1, 0], atol=1e-12)
    with pytest.raises(InputDataError, match="parallel"):
        plane_grid(u=[1, 0, 0], v=[-2, 0, 0], spacing=1.0, size=[3, 3], origin=[0, 0, 0])
    with pytest.raises(InputDataError, match="exactly one"):
        plane_grid(u=[1, 0, 0], v=[0, 1, 0], spacing=1.0, size=[3, 3])
    with pytest.raises(InputDataError, match="lies in the plane"):
        plane_grid(u=[1, 0, 0], v=[0, 1, 0], w=[1, 1, 0], spacing=1.0, size=[3, 3, 3], origin=[0, 0, 0])
    with pytest.raises(InputDataError, match="size"):
        plane_grid(u=[1, 0, 0], v=[0, 1, 0], spacing=1.0, size=[3], origin=[0, 0, 0])


def test_reference_grid_reads_the_header(tmp_path: Path) -> None:
    affine = left_handed_affine()
    for shape in [(7, 5), (7, 5, 1), (7, 5, 1, 3)]:
        path = save_nifti(np.zeros(shape, dtype=np.float32), affine, tmp_path / f"lax{len(shape)}.nii.gz")
        got_affine, got_shape = reference_grid(path)
        np.testing.assert_allclose(got_affine, affine, atol=1e-5)
        assert got_shape == [7, 5, 1]
    with pytest.raises(MissingFileError):
        reference_grid(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("axis", [2, 0])  # a short-axis slice, and a plane across the slices
def test_plane_through_a_volume_matches_it_where_they_coincide(axis: int) -> None:
    shape, affine = (9, 8, 6), left_handed_affine()
    torch.manual_seed(0)
    net = NISFNet(latent_dim=8, hidden_dim=16, num_layers=2, num_classes=4).eval()
    latent = torch.randn(1, 8)
    inf = inferer()
    mapping = inf.frame_of(image_of(shape, affine))
    volume, volume_intensity = inf.sample(net, latent, mapping, affine, shape, probabilities=True)
    k = 3
    index = np.zeros(3)
    index[axis] = k
    in_plane = [a for a in range(3) if a != axis]
    origin = affine[:3, :3] @ index + affine[:3, 3]
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    grid, grid_shape = plane_grid(
        u=affine[:3, in_plane[0]],
        v=affine[:3, in_plane[1]],
        spacing=sizes[in_plane],
        size=[shape[a] for a in in_plane],
        origin=origin,
    )
    plane, plane_intensity = inf.sample(net, latent, mapping, grid, grid_shape, probabilities=True)
    expected = volume[0].select(axis + 1, k)
    np.testing.assert_allclose(plane[0, :, :, :, 0], expected, atol=1e-5)
    np.testing.assert_allclose(plane_intensity[0, 0, :, :, 0], volume_intensity[0, 0].select(axis, k), atol=1e-5)
    assert expected.std() > 1e-3  # the network's output varies over the plane, so the match means something
    # a plane half a voxel away reads different values
    shifted, _ = plane_grid(
        u=affine[:3, in_plane[0]],
        v=affine[:3, in_plane[1]],
        spacing=sizes[in_plane],
        size=[shape[a] for a in in_plane],
        origin=origin + 0.5 * affine[:3, axis],
    )
    other, _ = inf.sample(net, latent, mapping, shifted, grid_shape, probabilities=True)
    assert (other[0, :, :, :, 0] - expected).abs().max() > 1e-4


def test_plane_through_a_generated_heart_matches_its_label_map() -> None:
    """The generator's oblique volume sliced by planes (short-axis and across the slices) that coincide
    with its voxel planes: the continuous heart read there equals the generated labels."""
    seed = 3
    _, label, affine, _ = synthetic.generate_subject(seed, "ED", shape=(64, 64, 10), oblique=True)
    net = SyntheticHeartNet(seed, "ED")
    inf = inferer(extent_mm=400.0, chunk_size=4096)
    field = NetworkField(net, inf, torch.zeros(1), inf.frame_of(image_of(label.shape, affine)))
    net.mapping = field.frame
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    for axis, k in ((2, 5), (0, 30), (1, 33)):
        in_plane = [a for a in range(3) if a != axis]
        index = np.zeros(3)
        index[axis] = k
        grid, grid_shape = plane_grid(
            u=affine[:3, in_plane[0]],
            v=affine[:3, in_plane[1]],
            spacing=sizes[in_plane],
            size=[label.shape[a] for a in in_plane],
            origin=affine[:3, :3] @ index + affine[:3, 3],
        )
        probs, _ = field.sample(grid, grid_shape)
        expected = np.take(label, k, axis=axis)
        assert len(np.unique(expected)) == 4, "the plane should cut every structure"
        assert (probs.argmax(axis=0)[:, :, 0] == expected).mean() > 0.999


def test_resample_image_is_exact_for_a_linear_image() -> None:
    shape, affine = (10, 9, 7), left_handed_affine()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    gradient = np.array([0.3, -0.2, 0.1])
    image = world @ gradient + 5.0
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    grid, grid_shape = plane_grid(u=[1, 1, 0], v=[0, 0.3, 1], spacing=0.7, size=[9, 9], centre=centre)
    out = resample_image(image, affine, grid, grid_shape)
    expected = (
        np.stack(np.meshgrid(*[np.arange(n) for n in grid_shape], indexing="ij"), -1) @ grid[:3, :3].T + grid[:3, 3]
    ) @ gradient + 5.0
    np.testing.assert_allclose(out, expected, atol=2e-4)
    far, _ = plane_grid(u=[1, 0, 0], v=[0, 1, 0], spacing=1.0, size=[3, 3], centre=centre + 200.0)
    assert np.all(resample_image(image, affine, far, [3, 3, 1]) == 0)


def test_plane_run_writes_nifti_on_the_plane_and_a_figure(tmp_path: Path) -> None:
    image, _, affine, _ = synthetic.generate_subject(2, "ED", shape=(32, 32, 6), spacing=(3.0, 3.0, 10.0))
    path = save_nifti(image, affine, tmp_path / "case.nii.gz")
    lax = save_nifti(
        np.arange(20 * 16, dtype=np.float32).reshape(20, 16, 1),
        np.array([[2.0, 0, 0, -20], [0, 0, 2.5, 5], [0, 2.0, 0, -15], [0, 0, 0, 1]]),
        tmp_path / "lax.nii.gz",
    )
    preprocessing = Compose(
        [
            LoadCased("image", image_only=True, ensure_channel_first=True),
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        ]
    )
    torch.manual_seed(0)
    net = NISFNet(latent_dim=8, hidden_dim=16, num_layers=2, num_classes=4)
    datalist = [{"image": path, "case": "case"}]
    info = PlaneRun(net, inferer(), preprocessing, datalist, tmp_path / "out", reference=lax, name="lax").run()[0]
    seg = nib.load(tmp_path / "out" / "case_lax_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, nib.load(lax).affine, atol=1e-5)  # the written plane overlays the reference
    assert seg.shape == (20, 16, 1) and seg.get_data_dtype() == np.uint8
    assert (tmp_path / "out" / "case_lax.png").stat().st_size > 0
    assert nib.load(tmp_path / "out" / "case_lax_input.nii.gz").shape == (20, 16, 1)
    assert json.loads((tmp_path / "out" / "case_lax.json").read_text())["shape"] == [20, 16, 1] == info["shape"]
    # the default plane: across the slices, through the image, 1 mm
    default = PlaneRun(net, inferer(), preprocessing, datalist, tmp_path / "out2", spacing=2.0).run()[0]
    assert default["shape"][2] == 1 and np.allclose(default["spacing_mm"], 2.0)
    written = nib.load(tmp_path / "out2" / "case_plane_recon.nii.gz").affine
    np.testing.assert_allclose(np.abs(written[:3, 1] @ affine[:3, 2]) / 10.0, 2.0, atol=1e-5)  # v runs along the slices


# ---- meshes -------------------------------------------------------------------------------------------


def sphere_field(radius: float, centre: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """A probability-like field: 0.5 on the sphere, rising inwards (a scaled signed distance)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    r = np.linalg.norm(idx @ affine[:3, :3].T + affine[:3, 3] - centre, axis=1)
    return (0.5 + (radius - r) / 20.0).reshape(shape)


def edge_counts(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    _, undirected_counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    return directed_counts, undirected_counts


@pytest.mark.parametrize("flip", [False, True])
def test_sphere_mesh_has_the_sphere_area_and_volume(flip: bool) -> None:
    radius, centre = 15.0, np.array([4.0, -9.0, 21.0])
    spacing = np.array([0.9, 1.0, 1.2])
    shape = [int(np.ceil(2.6 * radius / s)) for s in spacing]
    affine = oblique_affine(spacing, (0, 0, 0), 0.4, 0.25, flip_voxel_axis=1 if flip else None)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    mesh = marching_tetrahedra(sphere_field(radius, centre, affine, shape), affine)
    assert abs(mesh.area / (4 * math.pi * radius**2) - 1) < 0.02
    assert abs(mesh.volume / (4 / 3 * math.pi * radius**3) - 1) < 0.02  # positive: normals point outwards
    distance = np.linalg.norm(mesh.vertices - centre, axis=1)
    assert np.abs(distance - radius).max() < 0.1  # vertices on the sphere, in world mm
    directed, undirected = edge_counts(mesh.faces)
    assert np.all(undirected == 2) and np.all(directed == 1)  # closed, consistently oriented 2-manifold


def test_mesh_is_closed_where_the_grid_cuts_the_shape() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    field = sphere_field(10.0, np.array([0.0, 0.0, 0.0]), affine, (12, 12, 12))  # an eighth of a ball at the corner
    mesh = marching_tetrahedra(field, affine)
    v0, v1, v2 = (mesh.vertices[mesh.faces[:, k]] for k in range(3))
    assert (np.linalg.norm(np.cross(v1 - v0, v2 - v0), axis=1) == 0).any()  # grid points with r == 10 exactly
    directed, undirected = edge_counts(mesh.faces)
    assert np.all(undirected == 2) and np.all(directed == 1)  # still closed and oriented, degenerate triangles too
    assert 0 < mesh.volume < 4 / 3 * math.pi * 10.0**3 / 8 * 1.2  # at most an eighth of the ball, give or take the cut
    assert len(marching_tetrahedra(np.zeros((4, 4, 4)), affine)) == 0


def test_mesh_files(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mesh = marching_tetrahedra(sphere_field(6.3, np.array([8.0, 8.0, 8.0]), affine, (9, 9, 9)), affine)
    vtk = Path(write_mesh(tmp_path / "s.vtk", mesh, "lv")).read_text().splitlines()
    assert vtk[0].startswith("# vtk DataFile") and "SPACE=RAS" in vtk[1] and vtk[3] == "DATASET POLYDATA"
    assert vtk[4] == f"POINTS {len(mesh.vertices)} double"
    points = np.loadtxt(vtk[5 : 5 + len(mesh.vertices)])
    np.testing.assert_allclose(points, mesh.vertices, atol=1e-4)
    assert vtk[5 + len(mesh.vertices)] == f"POLYGONS {len(mesh)} {4 * len(mesh)}"
    np.testing.assert_array_equal(np.loadtxt(vtk[6 + len(mesh.vertices) :], dtype=int)[:, 1:], mesh.faces)

    data = (tmp_path / "s.stl").read_bytes() if write_mesh(tmp_path / "s.stl", mesh) else b""
    assert b"SPACE=RAS" in data[:80] and not data.startswith(b"solid")
    (count,) = struct.unpack("<I", data[80:84])
    assert count == len(mesh) and len(data) == 84 + 50 * count
    record = np.frombuffer(data[84:], dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]))
    outward = np.einsum("ij,ij->i", record["n"], record["v"].mean(axis=1) - 8.0)
    assert np.all(outward > 0)

    obj = Path(write_mesh(tmp_path / "s.obj", mesh)).read_text().splitlines()
    assert "SPACE=RAS" in obj[0]
    assert sum(line.startswith("v ") for line in obj) == len(mesh.vertices) and sum(
        line.startswith("f ") for line in obj
    ) == len(mesh)
    with pytest.raises(ValueError, match="format"):
        write_mesh(tmp_path / "s.ply", mesh)


def test_bundle_plane_config_runs(tmp_path: Path) -> None:
    """``inference.json`` + ``plane.json`` with the shipped network: a plane given by centre, directions,
    spacing and size is written with exactly that grid."""
    image, _, affine, _ = synthetic.generate_subject(7, "ES", shape=(32, 32, 6), spacing=(3.0, 3.0, 10.0))
    save_nifti(image, affine, tmp_path / "images" / "s.nii.gz")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "plane.json")])
    centre = [float(c) for c in affine[:3, :3] @ [15.5, 15.5, 2.5] + affine[:3, 3]]
    parser.update(
        {
            "bundle_root": str(REPO / "bundle"),
            "dataset_dir": str(tmp_path / "images"),
            "output_dir": str(tmp_path / "out"),
            "inference_steps": 1,
            "num_points": 256,
            "device": "cpu",
            "plane_centre": centre,
            "plane_u": [1, 1, 0],
            "plane_v": [0, 0, 1],
            "plane_spacing": 2.0,
            "plane_size": [30, 25],
        }
    )
    parser.get_parsed_content("sampling_plane")
    expected, shape = plane_grid(u=[1, 1, 0], v=[0, 0, 1], spacing=2.0, size=[30, 25], centre=centre)
    seg = nib.load(tmp_path / "out" / "s_plane_seg.nii.gz")
    assert seg.shape == tuple(shape) == (30, 25, 1)
    np.testing.assert_allclose(seg.affine, expected, atol=1e-5)
    assert (tmp_path / "out" / "s_plane.png").stat().st_size > 0
