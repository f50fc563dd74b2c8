"""The slice localiser: coarse labels at a fixed in-plane spacing on the image's own world geometry, the pose their
centroids give, and its use as the start of the heart pose search."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from nisf_monai.inferers import (
    HeartLocator,
    IntensityTerm,
    LocaliserBlend,
    LocaliserGuide,
    SliceLocaliser,
    load_localiser,
    localiser_network,
)
from nisf_monai.networks import NISFNet
from nisf_monai.transforms import heart_pose

SHAPE = (64, 56, 6)


def oblique_affine(theta: float = math.pi / 7) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.4, 1.2, 8.0])
    affine[:3, 3] = [-40.0, 15.0, 30.0]
    return affine


def heart_scan() -> tuple[MetaTensor, np.ndarray]:
    """An image whose LV blood pool is bright (1.0) and whose RV is grey (0.5), and its label map."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[14:32, 16:34, 1:5] = 1
    label[40:54, 20:40, 1:5] = 3
    intensity = np.select([label == 1, label == 3], [1.0, 0.5], 0.0).astype(np.float32)
    return MetaTensor(torch.as_tensor(intensity)[None], affine=torch.as_tensor(oblique_affine())), label


class IntensityClasses(nn.Module):
    """A stand-in localiser: background below 0.25, RV blood pool around 0.5, LV blood pool near 1 (pixel-wise)."""

    def __init__(self, find_nothing: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        with torch.no_grad():  # logits: background 2 - 10x, LV 10x - 7, myocardium never, RV 0
            self.conv.weight.copy_(torch.tensor([-10.0, 10.0, 0.0, 0.0]).reshape(4, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([2.0, -7.0, -100.0, 0.0]))
            if find_nothing:
                self.conv.bias[0] = 100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_labels_keep_world_geometry_at_the_coarse_spacing() -> None:
    image, _ = heart_scan()
    labels = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).labels(image)
    affine = labels.affine.numpy()
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [3.0, 3.0, 8.0], atol=1e-6)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    source = oblique_affine()[:3, :3]
    np.testing.assert_allclose(directions, source / np.linalg.norm(source, axis=0), atol=1e-6)  # same orientation
    assert labels.shape[-1] == SHAPE[-1]  # slices are not resampled
    assert set(torch.unique(labels).tolist()) == {0, 1, 3}


def test_pose_of_coarse_labels_matches_the_pose_of_the_true_labels() -> None:
    image, label = heart_scan()
    found = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).pose(image)
    truth = heart_pose(label, oblique_affine())
    origin = lambda pose: -pose[:3, :3].T @ pose[:3, 3]  # noqa: E731
    assert torch.linalg.norm(origin(found) - origin(truth)) < 2.0  # mm, at 3 mm pixels
    assert float(found[0, :3] @ truth[0, :3]) > math.cos(math.radians(5))  # LV -> RV direction


def test_a_stray_blob_does_not_move_the_pose() -> None:
    """A small false RV far from the heart drags the RV centroid, and with it the pose's x axis, unless each
    class keeps its largest connected component."""
    image, label = heart_scan()
    image[0, 0:12, 42:56, 1:5] = 0.5  # a stray 'RV' blob on the far side of the LV
    truth = heart_pose(label, oblique_affine())
    cleaned = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).pose(image)
    raw = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0, largest_component=False).pose(image)
    angle = lambda pose: math.degrees(math.acos(min(1.0, float(pose[0, :3] @ truth[0, :3]))))  # noqa: E731
    assert angle(cleaned) < 5.0
    assert angle(raw) > 15.0  # the blob does move the uncleaned pose, so the check above means something


def test_masked_voxels_are_not_used() -> None:
    image, _ = heart_scan()
    localiser = SliceLocaliser(IntensityClasses())
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[..., 1:3] = False  # two hidden slices
    labels = localiser.labels(image, mask)
    assert labels[..., 1:3].sum() == 0 and labels[..., 3:5].sum() > 0
    assert localiser.pose(image, torch.zeros(SHAPE, dtype=torch.bool)) is None


def tiny_heart_net() -> NISFNet:
    torch.manual_seed(0)
    return NISFNet(coord_dim=3, latent_dim=8, num_classes=4, hidden_dim=16, num_layers=2).eval()


def test_locator_starts_from_the_localiser_pose() -> None:
    image, _ = heart_scan()
    localiser = SliceLocaliser(IntensityClasses())
    pose = HeartLocator(localiser=localiser, refine_steps=0).locate(image, tiny_heart_net(), extent_mm=100.0)
    torch.testing.assert_close(pose, localiser.pose(image))
    refined = HeartLocator(localiser=localiser, refine_steps=3, score_points=256).locate(
        image, tiny_heart_net(), extent_mm=100.0
    )
    origin = lambda p: -p[:3, :3].T @ p[:3, 3]  # noqa: E731
    assert torch.linalg.norm(origin(refined) - origin(pose)) < 15.0  # a correction, not a new search


def test_a_scaled_localiser_pose_keeps_its_scale_through_refinement() -> None:
    """A network trained in frames scaled to a reference LV volume gets the localiser's pose in the same scale."""
    from nisf_monai.transforms import split_pose

    image, _ = heart_scan()
    rigid = SliceLocaliser(IntensityClasses()).pose(image)
    localiser = SliceLocaliser(IntensityClasses(), reference_volume_ml=50.0)
    pose = localiser.pose(image)
    coarse = localiser.labels(image)  # at the localiser's spacing, with its own affine
    lv_ml = float((coarse == 1).sum()) * abs(float(np.linalg.det(coarse.affine[:3, :3]))) / 1000.0
    assert split_pose(pose)[2] == pytest.approx((50.0 / lv_ml) ** (1 / 3), rel=1e-6)
    torch.testing.assert_close(split_pose(pose)[0], split_pose(rigid)[0])
    refined = HeartLocator(localiser=localiser, refine_steps=3, score_points=256).locate(
        image, tiny_heart_net(), extent_mm=100.0
    )
    assert split_pose(refined)[2] == pytest.approx(split_pose(pose)[2])
    assert torch.linalg.norm(split_pose(refined)[0] - split_pose(pose)[0]) < 15.0


def test_locator_falls_back_to_the_search_when_the_localiser_finds_no_heart(caplog: pytest.LogCaptureFixture) -> None:
    image, _ = heart_scan()
    locator = HeartLocator(
        localiser=SliceLocaliser(IntensityClasses(find_nothing=True)), refine_steps=0, score_points=256
    )
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        pose = locator.locate(image, tiny_heart_net(), extent_mm=100.0)
    assert "found no left ventricle" in caplog.text
    grid = HeartLocator(refine_steps=0, score_points=256).locate(image, tiny_heart_net(), extent_mm=100.0)
    torch.testing.assert_close(pose, grid)


def test_missing_weights_warn_and_give_no_localiser(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        assert load_localiser(tmp_path / "localiser.pt") is None
    assert "train_localiser.json" in caplog.text
    torch.save(localiser_network().state_dict(), tmp_path / "localiser.pt")
    assert isinstance(load_localiser(tmp_path / "localiser.pt"), SliceLocaliser)
    assert (
        load_localiser(tmp_path / "localiser.pt", in_plane_mm=3.0).in_plane_mm == 3.0
    )  # the spacing it was trained at
    with pytest.raises(FileNotFoundError, match="train_localiser.json"):
        SliceLocaliser(localiser_network(), tmp_path / "other.pt")


def test_localiser_architecture_comes_from_the_settings(tmp_path) -> None:
    shallow = (8, 16, 32)
    torch.save(localiser_network(4, shallow, 1).state_dict(), tmp_path / "localiser.pt")
    localiser = load_localiser(tmp_path / "localiser.pt", channels=shallow, num_res_units=1)
    assert localiser.divisor == 4  # two stride-2 levels: slices padded to a multiple of 4
    image, _ = heart_scan()
    assert localiser.labels(image).shape[1:3] == localiser.resample(image).shape[1:3]
    with pytest.raises(ValueError, match="localiser_channels and localiser_res_units"):
        load_localiser(tmp_path / "localiser.pt")  # the default (deeper) network cannot take these weights


def test_probabilities_come_back_on_the_image_grid_slice_by_slice() -> None:
    image, label = heart_scan()
    probs = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).probabilities(image)
    assert probs.shape == (4, *SHAPE)
    torch.testing.assert_close(probs.sum(0), torch.ones(SHAPE))
    found = probs.argmax(0).numpy()
    assert (found == label).mean() > 0.95  # only boundary voxels may blur at 3 mm
    assert (found[..., [0, 5]] == 0).all()  # heartless slices stay heartless: slices are never mixed


def fitted_agreement(localiser_weight: float) -> float:
    """Fraction of voxels where a fitted code's segmentation agrees with the localiser's labels."""
    from nisf_monai.inferers import LatentOptimisationInferer

    image, _ = heart_scan()
    localiser = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0)
    inferer = LatentOptimisationInferer(
        num_steps=40,
        learning_rate=0.05,
        num_points=2048,
        extent_mm=100.0,
        heart_locator=HeartLocator(localiser=localiser, refine_steps=0),
        fit_terms=[IntensityTerm(), LocaliserGuide(localiser_weight)],
        log_every=0,
    )
    net = tiny_heart_net()
    case = image[None]
    seg = inferer.fit_and_sample(case, net)["pred"][0, 0]
    return float((seg == localiser.probabilities(image).argmax(0)).float().mean())


def test_localiser_term_pulls_the_segmentation_toward_the_localiser() -> None:
    assert fitted_agreement(5.0) > fitted_agreement(0.0) + 0.1


def test_localiser_weight_without_a_localiser_warns_and_fits_intensity_alone(caplog: pytest.LogCaptureFixture) -> None:
    from nisf_monai.inferers import LatentOptimisationInferer

    image, _ = heart_scan()
    net = tiny_heart_net()
    codes = []
    for weight in (0.0, 1.0):
        terms = [IntensityTerm(), LocaliserGuide(weight)]
        inferer = LatentOptimisationInferer(num_steps=5, num_points=512, extent_mm=100.0, fit_terms=terms)
        with caplog.at_level(logging.WARNING, logger="nisf_monai"):
            codes.append(inferer.fit(image[None], net))
    assert "no localiser" in caplog.text
    torch.testing.assert_close(codes[0], codes[1])
    with pytest.raises(ValueError, match="localiser_weight"):
        LocaliserGuide(-1.0)


def test_probability_volume_reads_the_grid_in_world_millimetres() -> None:
    from nisf_monai.inferers import ProbabilityVolume
    from nisf_monai.transforms import world_grid

    probs = torch.softmax(torch.randn(4, 5, 6, 3, generator=torch.Generator().manual_seed(0)), dim=0)
    affine = oblique_affine()
    volume = ProbabilityVolume(probs, affine)
    read, weight = volume.at(world_grid(affine, probs.shape[1:]))
    torch.testing.assert_close(read, probs.reshape(4, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(weight, torch.ones(90), atol=1e-5, rtol=0)
    index_to_world = lambda i: torch.as_tensor([i], dtype=torch.float64) @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    between, weight = volume.at(index_to_world([2.0, 3.0, 0.5]))  # midway between two slices: their mean
    torch.testing.assert_close(between[:, 0], (probs[:, 2, 3, 0] + probs[:, 2, 3, 1]) / 2, atol=1e-5, rtol=0)
    assert float(weight) == pytest.approx(1.0)
    assert float(volume.at(index_to_world([2.0, 3.0, -0.5]))[1]) == pytest.approx(0.5)  # half a slice beyond
    assert float(volume.at(index_to_world([2.0, 3.0, 4.0]))[1]) == 0.0  # well beyond the stack: nothing known


def test_probability_volume_leaves_out_masked_voxels() -> None:
    from nisf_monai.inferers import ProbabilityVolume

    probs = torch.softmax(torch.randn(4, 5, 6, 3, generator=torch.Generator().manual_seed(1)), dim=0)
    kept = torch.ones(5, 6, 3, dtype=torch.bool)
    kept[:, :, 1] = False  # a hidden slice
    volume = ProbabilityVolume(probs, np.eye(4), kept)
    _, weight = volume.at(torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.5]))
    read, _ = volume.at(torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64))  # only the kept neighbour counts
    torch.testing.assert_close(read[:, 0], probs[:, 1, 2, 0], atol=1e-5, rtol=0)


def test_probability_volume_bridges_hidden_slices_from_the_kept_ones_on_either_side() -> None:
    from nisf_monai.inferers import ProbabilityVolume

    probs = torch.softmax(torch.randn(4, 5, 6, 6, generator=torch.Generator().manual_seed(2)), dim=0)
    kept = torch.zeros(5, 6, 6, dtype=torch.bool)
    kept[..., [1, 4]] = True  # slices 2 and 3 hidden between them, 0 and 5 beyond the kept ones
    kept[0, 0, 2] = True  # and one kept voxel inside the gap, which its column bridges to
    hidden = probs.clone()
    hidden[:, ~kept] = torch.rand(4, int((~kept).sum()))  # what hidden voxels hold must not matter
    read, weight = ProbabilityVolume(hidden, np.eye(4), kept, bridge_hidden=True).at(
        torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 3.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0], [1.0, 2.0, 5.0]])
    )
    torch.testing.assert_close(read[:, 0], probs[:, 1, 2, 1] * 2 / 3 + probs[:, 1, 2, 4] / 3, atol=1e-5, rtol=0)
    torch.testing.assert_close(read[:, 1], probs[:, 1, 2, 1] / 3 + probs[:, 1, 2, 4] * 2 / 3, atol=1e-5, rtol=0)
    torch.testing.assert_close(read[:, 2], (probs[:, 0, 0, 2] + probs[:, 0, 0, 4]) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))  # no bridge beyond the ends
    _, unbridged = ProbabilityVolume(hidden, np.eye(4), kept).at(torch.tensor([[1.0, 2.0, 2.0]]))
    assert float(unbridged) == 0.0


def blend_inferer(
    localiser_blend: float,
    localiser: SliceLocaliser | None = None,
    bridge_hidden: bool = False,
    guide_weight: float = 0.0,
    **kwargs,
):
    from nisf_monai.inferers import LatentOptimisationInferer

    return LatentOptimisationInferer(
        num_steps=5,
        num_points=512,
        extent_mm=100.0,
        heart_locator=HeartLocator(localiser=localiser or SliceLocaliser(IntensityClasses(), in_plane_mm=3.0)),
        fit_terms=[IntensityTerm(), LocaliserGuide(guide_weight)],
        output_blend=LocaliserBlend(localiser_blend, bridge_hidden),
        log_every=0,
        **kwargs,
    )


def test_blend_mixes_the_localiser_into_the_segmentation_on_the_input_grid() -> None:
    image, _ = heart_scan()
    net = tiny_heart_net()
    alone = blend_inferer(0.0)(image[None], net)
    localiser = blend_inferer(1.0)(image[None], net)
    half = blend_inferer(0.5)(image[None], net)
    guide = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).probabilities(image)
    torch.testing.assert_close(localiser.as_tensor()[0], guide, atol=1e-5, rtol=0)  # the same code: only the mix
    torch.testing.assert_close(half.as_tensor(), (alone.as_tensor() + localiser.as_tensor()) / 2, atol=1e-5, rtol=0)
    assert not torch.allclose(alone.as_tensor()[0], guide, atol=0.1)  # the untrained network is no localiser


def test_blend_keeps_nisf_alone_on_hidden_slices_and_reads_the_localiser_in_world_space() -> None:
    from nisf_monai.transforms import world_grid

    image, _ = heart_scan()
    net = tiny_heart_net()
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[..., 2] = False
    alone = blend_inferer(0.0).fit_and_sample([image], net, masks=[mask])[0]["pred"]
    blended = blend_inferer(1.0).fit_and_sample([image], net, masks=[mask])[0]["pred"]
    guide = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).probabilities(image).argmax(0)
    assert torch.equal(blended[0, ..., 2], alone[0, ..., 2])  # the hidden slice: NISF's own labels
    assert torch.equal(blended[0, ..., [1, 3]].long(), guide[..., [1, 3]])  # the kept slices: the localiser's
    finer = blend_inferer(1.0, target_spacing=(0.7, 0.6, 4.0)).fit_and_sample([image], net)[0]["pred"]
    # output voxels that lie on an input voxel's centre carry the localiser's label of that voxel
    index = world_grid(finer.affine, finer.shape[1:]) @ torch.linalg.inv(image.affine.double()).T[:3, :3]
    index = index + torch.linalg.inv(image.affine.double())[:3, 3]
    on_input = ((index - index.round()).abs() < 1e-4).all(1) & (index.round() >= 0).all(1)
    on_input &= (index.round() < torch.tensor(SHAPE)).all(1)
    assert int(on_input.sum()) > 100
    i, j, k = index[on_input].round().long().T
    assert torch.equal(finer.reshape(-1)[on_input].long(), guide[i, j, k])


def test_blend_hidden_reads_the_localiser_across_hidden_slices_from_the_kept_ones() -> None:
    image, _ = heart_scan()
    net = tiny_heart_net()
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[..., 2] = False
    garbage = image.clone()
    garbage[..., 2] = torch.rand(SHAPE[:2])  # the hidden slice's intensities are never read
    bridged = blend_inferer(1.0, bridge_hidden=True).fit_and_sample([garbage], net, masks=[mask])[0]
    probs = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).probabilities(image)
    between = ((probs[..., 1] + probs[..., 3]) / 2).argmax(0)
    assert torch.equal(bridged["pred"][0, ..., 2].long(), between)
    alone = blend_inferer(0.0).fit_and_sample([garbage], net, masks=[mask])[0]["pred"]
    assert not torch.equal(alone[0, ..., 2].long(), between)  # without the bridge the slice is NISF's


def test_measuring_with_blend_reads_the_written_segmentation(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """``measure_blend``: the measures read the segmentation inference writes (the localiser mixed in), so on the
    acquired grid the volumes are those of the blended labels; without it they are the code's alone."""
    from nisf_monai.geometry import MeasureRun, measure_frame
    from nisf_monai.geometry.measures import class_volumes

    image, _ = heart_scan()
    net = tiny_heart_net()
    inferer = blend_inferer(1.0)
    guide = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).probabilities(image).argmax(0).numpy()
    voxel_ml = abs(np.linalg.det(oblique_affine()[:3, :3])) / 1000.0
    volumes = {}
    for blend in (True, False):
        run = MeasureRun(net, inferer, lambda item: item, [], tmp_path, blend=blend, mesh_format=None)
        (field,) = run._fields([{"image": image}])
        result = measure_frame(field, oblique_affine(), SHAPE, spacing=None, roi_margin_mm=None)
        labels = result.probabilities.argmax(0)
        volumes[blend] = result.volumes
        assert np.array_equal(labels, guide) == blend
    expected = class_volumes(guide, voxel_ml)
    assert volumes[True] == pytest.approx(expected, abs=1e-6)
    assert volumes[False] != pytest.approx(expected, abs=1e-6)
    run = MeasureRun(net, blend_inferer(0.0), lambda item: item, [], tmp_path, blend=True, mesh_format=None)
    with caplog.at_level(logging.WARNING):
        (field,) = run._fields([{"image": image}])
    assert field.blend is None and "the measures read the code alone" in caplog.text


def test_streamed_labels_mix_the_localiser_as_fit_and_sample_does(tmp_path) -> None:
    from types import SimpleNamespace

    import nibabel as nib

    from nisf_monai.handlers import StreamingSegmentationSaver

    image, _ = heart_scan()
    image.meta["filename_or_obj"] = "heart.nii.gz"
    net = tiny_heart_net()
    inferer = blend_inferer(0.5, target_spacing=(2.8, 2.4, 4.0))
    mask = torch.ones((1, *SHAPE), dtype=torch.bool)
    mask[..., 3] = False
    sampled = inferer.fit_and_sample([image], net, masks=[mask])[0]
    saver = StreamingSegmentationSaver(inferer, net, tmp_path, target_spacing=(2.8, 2.4, 4.0), slab_points=500)
    saver(SimpleNamespace(state=SimpleNamespace(output=[{"image": image, "latent": sampled["latent"], "mask": mask}])))
    written = nib.load(str(tmp_path / "heart_seg.nii.gz")).get_fdata()
    np.testing.assert_array_equal(written, sampled["pred"][0].numpy())


def test_blend_needs_a_share_and_a_localiser(caplog: pytest.LogCaptureFixture) -> None:
    from nisf_monai.inferers import LatentOptimisationInferer

    with pytest.raises(ValueError, match="localiser_blend"):
        LocaliserBlend(1.5)
    image, _ = heart_scan()
    inferer = LatentOptimisationInferer(num_steps=2, num_points=256, extent_mm=100.0, output_blend=LocaliserBlend(0.5))
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        assert inferer.blend_source(image) is None
    assert "no localiser" in caplog.text
    blended = blend_inferer(0.5)
    with pytest.raises(ValueError, match="carries no heart pose"):  # not located yet: no frame to sample in
        blended.frame_of(image[None])
    blended.locate([image], tiny_heart_net())
    mapping = blended.frame_of(image[None])  # a view made after locating carries the pose
    with pytest.raises(ValueError, match="one case"):  # one localiser volume cannot serve two codes
        blended.sample(
            tiny_heart_net(), torch.zeros(2, 8), mapping, mapping.affine, SHAPE, blend=blended.blend_source(image)
        )


class CountedClasses(IntensityClasses):
    """:class:`IntensityClasses` that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_one_inference_predicts_each_slice_once_for_pose_guide_and_blend() -> None:
    image, _ = heart_scan()
    network = CountedClasses()
    localiser = SliceLocaliser(network, in_plane_mm=3.0, rotations=(0.0, 0.2), zooms=(1.0, 0.9))
    first = localiser.probabilities(image)
    assert network.calls == 4  # two rotations at two zooms, all slices in one batch
    blend_inferer(0.5, localiser, guide_weight=1.0).fit_and_sample([image], tiny_heart_net())
    assert network.calls == 4  # the pose, the guide of the fit and the blend read the kept answer
    kept = localiser.coarse_probabilities(image)
    kept[:] = 0.0  # what a caller does to its answer does not reach the kept one
    torch.testing.assert_close(localiser.probabilities(image), first)
    localiser.probabilities(image * 0.5)
    assert network.calls == 8  # another image is predicted anew
    moved = image.clone()
    moved.affine[0, 3] += 1.0
    localiser.probabilities(moved)
    assert network.calls == 12  # and so is the same image elsewhere in space


def test_turning_a_slice_is_rigid_in_pixels() -> None:
    from nisf_monai.inferers.slice_localiser import _turned

    slices = torch.zeros(1, 1, 40, 60)
    slices[0, 0, 20, 40] = 1.0  # 10.5 pixels right of the centre (19.5, 29.5) of a slice wider than tall
    turned = _turned(slices, math.pi / 2)
    row, col = (turned[0, 0] == turned[0, 0].max()).nonzero()[0].tolist()
    assert math.hypot(row - 19.5, col - 29.5) == pytest.approx(10.5, abs=0.8)  # same distance from the centre
    assert abs(col - 29.5) < 1.0  # a quarter turn: from the row axis onto the column axis
    torch.testing.assert_close(_turned(slices, 0.0), slices)


class LeftHalfIsLV(nn.Module):
    """A stand-in localiser that ignores the image: LV blood pool on the left half of every slice, background right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 1, :, : x.shape[-1] // 2] = 20.0
        logits[:, 0, :, x.shape[-1] // 2 :] = 20.0
        return logits


def test_rotations_average_the_slices_predicted_turned_and_turned_back() -> None:
    image = MetaTensor(torch.rand(1, 64, 64, 3), affine=torch.eye(4) * torch.tensor([2.0, 2.0, 8.0, 1.0]))
    once = SliceLocaliser(LeftHalfIsLV(), in_plane_mm=2.0, divisor=1).coarse_probabilities(image)  # the image's grid
    both_ways = SliceLocaliser(
        LeftHalfIsLV(), in_plane_mm=2.0, divisor=1, rotations=(0.0, math.pi)
    ).coarse_probabilities(image)
    assert float(once[1, 20:44, 8:24].min()) > 0.99 and float(once[1, 20:44, 40:56].max()) < 0.01
    # half turned: the stand-in's left half lands on the right once turned back, so LV and background average out
    torch.testing.assert_close(both_ways[1, 20:44, 8:56], torch.full((24, 48, 3), 0.5), atol=0.02, rtol=0)
    torch.testing.assert_close(both_ways.sum(0), torch.ones(64, 64, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rotations"):
        SliceLocaliser(LeftHalfIsLV(), rotations=())


def test_rotations_keep_an_equivariant_localisers_labels(tmp_path) -> None:
    image, label = heart_scan()
    turned = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0, rotations=(0.0, 0.15, -0.15))
    assert (turned.probabilities(image).argmax(0).numpy() == label).mean() > 0.95  # a pixel-wise network: same labels
    torch.save(localiser_network().state_dict(), tmp_path / "localiser.pt")
    assert load_localiser(tmp_path / "localiser.pt", rotations=[0.0, 0.1]).rotations == (0.0, 0.1)


def test_zooms_average_on_the_localisers_own_grid() -> None:
    image, label = heart_scan()
    once = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0).coarse_probabilities(image)
    for zooms in ((1.0, 0.9, 1.1), (1.5,)):
        zoomed = SliceLocaliser(IntensityClasses(), in_plane_mm=3.0, zooms=zooms).coarse_probabilities(image)
        assert zoomed.shape == once.shape  # brought back to the 3 mm grid, whatever the zooms
        torch.testing.assert_close(zoomed.affine, once.affine)
        torch.testing.assert_close(zoomed.sum(0), torch.ones(zoomed.shape[1:]), atol=1e-5, rtol=0)
        assert (zoomed.argmax(0) == once.argmax(0)).float().mean() > 0.9  # a pixel-wise network: nearly the same labels
    assert not torch.allclose(zoomed, once, atol=1e-3)  # a 4.5 mm prediction is another prediction
    with pytest.raises(ValueError, match="zooms"):
        SliceLocaliser(IntensityClasses(), zooms=(0.0,))


ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"


@pytest.mark.skipif(not ACDC.is_dir(), reason=f"ACDC data not found at {ACDC} (see ../shared/data/README.md)")
def test_the_shipped_localiser_is_at_home_at_the_configured_spacing(tmp_path) -> None:
    """The weights do not record the spacing they were trained at; inference.json's must be theirs. On the first
    validation frames the configured spacing segments well and better than half a millimetre either side."""
    from monai.bundle import ConfigParser
    from monai.metrics import DiceMetric

    from nisf_monai.data import build_datalist, load_datalist

    bundle = Path(__file__).resolve().parents[1] / "bundle"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    spacing = float(parser.get_parsed_content("localiser_in_plane_mm"))
    training = ConfigParser()
    training.read_config(str(bundle / "configs" / "train.json"))
    datalist = build_datalist(str(ACDC), str(tmp_path / "datalist.json"))
    training.update({"datalist": datalist})
    preprocessing = training.get_parsed_content("validate#preprocessing")
    frames = [preprocessing(dict(case)) for case in load_datalist(datalist, "validation")[:4]]

    def mean_dice(in_plane_mm: float) -> float:
        localiser = load_localiser(bundle / "models" / "localiser.pt", in_plane_mm=in_plane_mm)
        metric = DiceMetric(include_background=False)
        for frame in frames:
            predicted = localiser.probabilities(frame["image"]).argmax(0)
            onehot = [
                torch.nn.functional.one_hot(x.long(), 4).movedim(-1, 0)[None] for x in (predicted, frame["label"][0])
            ]
            metric(*onehot)
        return float(metric.aggregate())

    at_home = mean_dice(spacing)
    assert at_home > 0.85
    assert at_home > mean_dice(spacing - 0.5) and at_home > mean_dice(spacing + 0.5)
