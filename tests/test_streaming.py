"""Slab-by-slab NIfTI writing: same file content as sampling the whole grid at once, nothing left behind on failure."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nisf_monai.inferers import LatentOptimisationInferer, target_grid
from nisf_monai.inferers.streaming import NiftiSlabWriter, slab_bounds, stream_sampled_grid
from nisf_monai.networks import NISFNet


def _image() -> MetaTensor:
    affine = torch.tensor(
        [[0.0, -1.4, 0.0, 30.0], [1.4, 0.0, 0.0, -12.0], [0.0, 0.0, 8.0, 5.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    return MetaTensor(torch.rand(1, 1, 11, 9, 5, generator=torch.Generator().manual_seed(3)), affine=affine)


@pytest.fixture(scope="module")
def network() -> NISFNet:
    torch.manual_seed(0)
    return NISFNet(latent_dim=8, hidden_dim=16, num_layers=2).eval()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("slab_points", [1, 200, 10**6])
def test_streamed_files_equal_whole_grid_sampling(tmp_path, network, suffix, slab_points):
    image = _image()
    inferer = LatentOptimisationInferer(num_steps=0, chunk_size=64)
    latent = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    affine, shape = target_grid(image.affine, image.shape[2:], (0.9, 1.1, 2.5))
    mapping = inferer.frame_of(image)
    labels, recon = inferer.sample(network, latent, mapping, affine, shape)
    seg_path, recon_path = tmp_path / f"case_seg{suffix}", tmp_path / f"case_recon{suffix}"

    stream_sampled_grid(inferer, network, latent, mapping, affine, shape, seg_path, recon_path, slab_points=slab_points)

    seg_file, recon_file = nib.load(seg_path), nib.load(recon_path)
    assert seg_file.shape == tuple(shape) and seg_file.get_data_dtype() == np.uint8
    assert np.allclose(seg_file.affine, affine, atol=1e-5)
    assert np.array_equal(np.asarray(seg_file.dataobj), labels[0, 0].numpy())
    assert recon_file.get_data_dtype() == np.float32
    assert np.allclose(np.asarray(recon_file.dataobj), recon[0, 0].numpy(), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([seg_path.name, recon_path.name])


def test_slab_bounds_cover_the_volume_once_within_budget():
    bounds = slab_bounds((10, 7, 23), max_points=150)
    assert bounds[0][0] == 0 and bounds[-1][1] == 23
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    assert all((stop - start) * 70 <= 150 for start, stop in bounds)
    assert slab_bounds((100, 100, 4), max_points=10) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # never less than a plane


def test_interrupted_writer_leaves_no_file(tmp_path):
    path = tmp_path / "out.nii.gz"
    with pytest.raises(KeyboardInterrupt):
        with NiftiSlabWriter(path, np.eye(4), (4, 3, 6), np.uint8) as writer:
            writer.write(np.zeros((4, 3, 2), np.uint8))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_misshapen_slabs_are_refused(tmp_path):
    path = tmp_path / "out.nii"
    with pytest.raises(RuntimeError, match="only 2 of 6 planes"):
        with NiftiSlabWriter(path, np.eye(4), (4, 3, 6), np.uint8) as writer:
            writer.write(np.zeros((4, 3, 2), np.uint8))
    with pytest.raises(ValueError, match="does not continue"):
        with NiftiSlabWriter(path, np.eye(4), (4, 3, 6), np.uint8) as writer:
            writer.write(np.zeros((3, 4, 2), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_saver_rejects_a_bad_spacing_before_any_fitting(network) -> None:
    from nisf_monai.handlers import StreamingSegmentationSaver

    with pytest.raises(ValueError, match="target_spacing must be 3 positive"):
        StreamingSegmentationSaver(
            LatentOptimisationInferer(num_steps=0), network, "out", target_spacing=[1.0, -2.0, 1.0]
        )


class _Stripes(torch.nn.Module):
    """Labels in stripes along the first coordinate: every label in several separate components."""

    num_classes, latent_dim = 4, 8

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # where the saver looks for the device

    def forward_heads(self, points: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label = (points[:, 0] * 1000).floor().long() % self.num_classes
        logits = torch.nn.functional.one_hot(label, self.num_classes).movedim(-1, 1).float() * 10
        return logits, torch.zeros_like(points[:, :1])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_saver_keeps_the_largest_component_of_each_label_in_the_written_file(tmp_path, suffix) -> None:
    from types import SimpleNamespace

    from monai.transforms import KeepLargestConnectedComponent

    from nisf_monai.handlers import StreamingSegmentationSaver

    image = _image()[0]
    image.meta["filename_or_obj"] = str(tmp_path / "case.nii.gz")
    engine = SimpleNamespace(state=SimpleNamespace(output=[{"image": image, "latent": torch.zeros(1, 8)}]))
    written = {}
    for kept in (None, [1, 2, 3]):
        folder = tmp_path / ("cleaned" if kept else "as_sampled")
        saver = StreamingSegmentationSaver(
            LatentOptimisationInferer(num_steps=0, chunk_size=64),
            _Stripes(),
            folder,
            target_spacing=0.7,
            output_postfixes=("seg", None),
            output_ext=suffix,
            largest_component=kept,
        )
        saver(engine)
        (path,) = folder.iterdir()  # the file alone: no temporary left beside it
        assert path.name == f"case_seg{suffix}"
        written[kept is not None] = nib.load(path)
    sampled = np.asarray(written[False].dataobj)
    cleaned = np.asarray(written[True].dataobj)
    # (a copy: the transform edits its input in place)
    expected = KeepLargestConnectedComponent(applied_labels=[1, 2, 3])(torch.tensor(sampled)[None])[0].numpy()
    assert not np.array_equal(sampled, expected)  # the stripes do leave components to remove
    assert np.array_equal(cleaned, expected)
    assert cleaned.dtype == np.uint8 and np.allclose(written[True].affine, written[False].affine)
