"""Sparse and partial inputs: masks of the voxels a latent code is fitted to, and proof that hidden voxels
never reach the optimisation (their values cannot change the fitted code; their points never reach the
network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import AFFINE, as_image, tiny_net
from monai.data import DataLoader, MetaTensor
from monai.data.utils import no_collation
from monai.transforms import Compose, ScaleIntensityRangePercentilesd

from nisf_monai.engines import LatentOptimisationEvaluator
from nisf_monai.errors import InvalidCaseError
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.transforms import (
    CoordinateMapping,
    MaskedScaleIntensityRangePercentilesd,
    RandPointMaskd,
    SliceMaskd,
    kept_slices,
    slice_selection,
)

SHAPE = (12, 10, 6)
EXTENT = 48.0
HIDDEN = [1, 3, 5]  # every other slice, offset 0


pytestmark = pytest.mark.usefixtures("single_thread")


def volume(seed: int = 0) -> np.ndarray:
    """Intensities in [0.1, 0.9]: a disc whose radius changes from slice to slice, plus a little noise."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    r = np.hypot(i - 5.5, j - 4.5)
    return (0.1 + 0.8 / (1 + np.exp(r - 2 - 0.4 * k)) + 0.02 * rng.random(SHAPE)).astype(np.float32)


def with_garbage(array: np.ndarray, value: float | None = None, seed: int = 1) -> np.ndarray:
    """The hidden slices replaced by extreme random values (or one given value, e.g. NaN)."""
    out = array.copy()
    fill = np.random.default_rng(seed).uniform(-1e4, 1e4, out[..., HIDDEN].shape) if value is None else value
    out[..., HIDDEN] = fill
    return out


def slice_mask() -> torch.Tensor:
    return SliceMaskd(keep="every_other")({"image": as_image(volume(), batch=False)})["mask"]


def inferer(**kwargs) -> LatentOptimisationInferer:
    return LatentOptimisationInferer(
        **{
            "num_steps": 12,
            "learning_rate": 2e-2,
            "num_points": 64,
            "extent_mm": EXTENT,
            "log_every": 0,
            "seed": 3,
            **kwargs,
        }
    )


# ------------------------------------------------------------------------------------ the inferer


@pytest.mark.parametrize("num_points", [64, None])
@pytest.mark.parametrize("garbage", [None, float("nan")], ids=["extreme", "nan"])
def test_hidden_slice_values_cannot_change_the_fitted_code(num_points, garbage) -> None:
    """Fitting with the hidden slices overwritten by garbage (extreme values, or NaN, which would poison
    any loss that touched it) gives the bit-identical code; without the mask the garbage does change it."""
    net, clean, dirty = tiny_net(), volume(), with_garbage(volume(), garbage)
    fit = inferer(num_points=num_points)
    masked_clean = fit.fit(as_image(clean), net, masks=slice_mask()[None])
    masked_dirty = fit.fit(as_image(dirty), net, masks=slice_mask()[None])
    torch.testing.assert_close(masked_dirty, masked_clean, rtol=0, atol=0)
    assert torch.isfinite(masked_dirty).all()
    unmasked_dirty = fit.fit(as_image(dirty), net)
    assert not torch.equal(unmasked_dirty, masked_clean)  # the garbage is visible when not masked
    assert not torch.equal(fit.fit(as_image(clean), net), masked_clean)  # the mask changes what is fitted


@pytest.mark.parametrize("num_points", [64, None])
def test_the_network_only_ever_sees_kept_points(num_points) -> None:
    """Every point handed to the network during fitting is a kept voxel's coordinate; no hidden slice's."""
    net = tiny_net()
    seen: list[torch.Tensor] = []
    forward = net.forward_heads

    def spy(points: torch.Tensor, latent: torch.Tensor):
        seen.append(points.detach().reshape(-1, 3, points.shape[-1]).transpose(1, 2).reshape(-1, 3).clone())
        return forward(points, latent)

    net.forward_heads = spy  # type: ignore[method-assign]
    fit = inferer(num_points=num_points, num_steps=20)
    fit.fit(as_image(volume()), net, masks=slice_mask()[None])
    assert len(seen) == 20
    points = torch.cat(seen)
    mapping = CoordinateMapping(AFFINE, SHAPE, EXTENT)
    grid = mapping.grid(AFFINE, SHAPE).reshape(*SHAPE, 3)
    kept, hidden = grid[..., [0, 2, 4], :].reshape(-1, 3), grid[..., HIDDEN, :].reshape(-1, 3)
    assert (
        torch.cdist(points, kept, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-6
    )  # each seen point is a kept voxel
    assert (
        torch.cdist(points, hidden, compute_mode="donot_use_mm_for_euclid_dist").min() > 0.1
    )  # and none is (near) a hidden one: slices are 8 mm apart
    if num_points is None:
        assert points.shape[0] == 20 * kept.shape[0]  # all kept voxels, every step


def test_full_mask_equals_no_mask_and_mask_layouts_agree() -> None:
    net, image = tiny_net(), as_image(volume())
    fit = inferer()
    plain = fit.fit(image, net)
    torch.testing.assert_close(
        fit.fit(image, net, masks=torch.ones(1, 1, *SHAPE, dtype=torch.bool)), plain, rtol=0, atol=0
    )
    mask = slice_mask()
    a = fit.fit(image, net, masks=mask[None])  # (B, 1, X, Y, Z)
    b = fit.fit(image, net, masks=mask)  # one case's (1, X, Y, Z)
    c = fit.fit([image[0]], net, masks=[mask.float()])  # a list, non-boolean (nonzero = kept)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_batched_masked_fits_equal_single_fits() -> None:
    """Cases with different masks (one without) in one batch get the codes they get alone."""
    net = tiny_net()
    images = [as_image(volume(s), batch=False) for s in (0, 1, 2)]
    masks = [slice_mask(), None, RandPointMaskd(fraction=0.3, seed=5)({"image": images[2]})["mask"]]
    fit = inferer()
    batched = fit.fit(images, net, masks=masks)
    alone = torch.cat([fit.fit([im], net, masks=[m]) for im, m in zip(images, masks)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    outputs = fit.fit_and_sample(images, net, masks=masks)
    assert outputs[0]["pred"].shape == images[0].shape  # the segmentation still covers every slice


def test_bad_masks_are_rejected() -> None:
    net, image = tiny_net(), as_image(volume())
    with pytest.raises(ValueError, match="keeps no voxel"):
        inferer().fit(image, net, masks=torch.zeros(1, 1, *SHAPE, dtype=torch.bool))
    with pytest.raises(ValueError, match="share the grid"):
        inferer().fit(image, net, masks=torch.ones(1, 1, 12, 10, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 masks for 1 images"):
        inferer().fit(image, net, masks=[None, None])


# ----------------------------------------------------------------------------------- the transforms


def test_slice_selection_and_slice_mask() -> None:
    assert slice_selection(7, "every_other").tolist() == [0, 2, 4, 6]
    assert slice_selection(7, "every_other", offset=1).tolist() == [1, 3, 5]
    assert slice_selection(10, 0.5).tolist() == [1, 3, 5, 7, 9] and slice_selection(10, 0.2).tolist() == [2, 7]
    assert slice_selection(10, 0.05).tolist() == [5] and slice_selection(10, 1.0).tolist() == list(range(10))
    assert slice_selection(9, 1 / 3).tolist() == [1, 4, 7]
    assert slice_selection(5, [-1, 0, 0]).tolist() == [0, 4] and slice_selection(4, "all").tolist() == [0, 1, 2, 3]
    for bad in ("odd", 0.0, 1.5, 2, [7], []):
        with pytest.raises(ValueError):
            slice_selection(5, bad)
    mask = slice_mask()
    assert mask.dtype == torch.bool and mask.shape == (1, *SHAPE)
    assert kept_slices(mask).tolist() == [True, False, True, False, True, False]
    assert bool(mask[..., [0, 2, 4]].all())
    # along another axis, intersected with a mask already present
    existing = torch.zeros(1, *SHAPE, dtype=torch.bool)
    existing[:, :6] = True
    out = SliceMaskd(keep=[1, 2], axis=1)({"image": as_image(volume(), batch=False), "mask": existing})["mask"]
    assert kept_slices(out, axis=-3 + 1).tolist() == [False, True, True] + [False] * 7
    assert int(out.sum()) == 6 * 2 * SHAPE[2]


def test_rand_point_mask_keeps_the_fraction_of_kept_voxels_repeatably() -> None:
    image = as_image(volume(), batch=False)
    total = int(np.prod(SHAPE))
    a = RandPointMaskd(fraction=0.25, seed=1)({"image": image})["mask"]
    assert int(a.sum()) == round(0.25 * total)
    torch.testing.assert_close(RandPointMaskd(fraction=0.25, seed=1)({"image": image})["mask"], a)
    assert not torch.equal(RandPointMaskd(fraction=0.25, seed=2)({"image": image})["mask"], a)
    within = RandPointMaskd(fraction=0.5, seed=1)({"image": image, "mask": slice_mask()})["mask"]
    assert int(within.sum()) == round(0.5 * int(slice_mask().sum())) and not bool(within[..., HIDDEN].any())
    assert bool(RandPointMaskd(fraction=1.0)({"image": image})["mask"].all())
    with pytest.raises(ValueError):
        RandPointMaskd(fraction=0.0)


def test_masked_percentile_scaling() -> None:
    """Without a mask it is MONAI's transform; with one, the hidden voxels' values do not move the scaling."""
    args = {"keys": "image", "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True}
    raw = volume() * 300 + 20
    expected = ScaleIntensityRangePercentilesd(**args)({"image": as_image(raw, batch=False)})["image"]
    ours = MaskedScaleIntensityRangePercentilesd(**args)({"image": as_image(raw, batch=False)})["image"]
    torch.testing.assert_close(ours.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
    scale = MaskedScaleIntensityRangePercentilesd(**args)
    clean = scale({"image": as_image(raw, batch=False), "mask": slice_mask()})["image"]
    dirty = scale({"image": as_image(with_garbage(raw), batch=False), "mask": slice_mask()})["image"]
    torch.testing.assert_close(dirty[..., [0, 2, 4]], clean[..., [0, 2, 4]], rtol=0, atol=0)
    assert not torch.equal(
        expected[..., [0, 2, 4]],
        ScaleIntensityRangePercentilesd(**args)({"image": as_image(with_garbage(raw), batch=False)})["image"][
            ..., [0, 2, 4]
        ],
    )


def test_a_mask_from_the_datalist_is_checked_against_the_image() -> None:
    image = as_image(volume(), batch=False)
    with pytest.raises(InvalidCaseError, match="mask shape"):
        SliceMaskd()({"image": image, "mask": torch.ones(1, 12, 10, 5)})
    shifted = MetaTensor(
        torch.ones(1, *SHAPE), affine=torch.as_tensor(AFFINE) + torch.diag(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    )
    shifted.affine[0, 3] = 3.0
    with pytest.raises(InvalidCaseError, match="affine"):
        RandPointMaskd(fraction=0.5)({"image": image, "mask": shifted})
    with pytest.raises(InvalidCaseError, match="keeps no voxel"):
        SliceMaskd(keep="all")({"image": image, "mask": torch.zeros(1, *SHAPE)})


# ------------------------------------------------------------------------------------- the evaluator


def test_evaluator_hides_slices_end_to_end() -> None:
    """Through the bundle's pieces (mask transforms, masked scaling, evaluator, inferer): a case whose hidden
    slices hold garbage gets the code and, on the kept slices' fit, the segmentation of the clean case;
    the mask is handed on with the outputs."""
    raw = volume() * 500 + 40
    data = [{"image": as_image(raw, batch=False)}, {"image": as_image(with_garbage(raw), batch=False)}]
    transform = Compose(
        [
            SliceMaskd(keep="every_other"),
            MaskedScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        ]
    )
    loader = DataLoader([transform(d) for d in data], batch_size=2, collate_fn=no_collation)
    evaluator = LatentOptimisationEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=tiny_net(), inferer=inferer(), decollate=False
    )
    evaluator.run()
    clean, dirty = evaluator.state.output
    torch.testing.assert_close(dirty["latent"], clean["latent"], rtol=0, atol=0)
    torch.testing.assert_close(dirty["pred"], clean["pred"], rtol=0, atol=0)
    assert kept_slices(dirty["mask"]).tolist() == [True, False] * 3


def test_evaluator_passes_masks_of_collated_batches() -> None:
    """Batches collated into one tensor (cases on one grid) carry their masks to the inferer as well."""
    from monai.data import list_data_collate

    transform = SliceMaskd(keep="every_other")
    data = [transform({"image": as_image(volume(s), batch=False)}) for s in (0, 1)]
    outputs = {}
    for name, collate in (("collated", list_data_collate), ("listed", no_collation)):
        loader = DataLoader(data, batch_size=2, collate_fn=collate)
        evaluator = LatentOptimisationEvaluator(
            device=torch.device("cpu"), val_data_loader=loader, network=tiny_net(), inferer=inferer(), decollate=False
        )
        evaluator.run()
        outputs[name] = evaluator.state.output
    collated, listed = outputs["collated"], outputs["listed"]
    torch.testing.assert_close(collated["latent"], torch.stack([o["latent"] for o in listed]), rtol=1e-5, atol=1e-6)
    assert collated["mask"].shape == (2, 1, *SHAPE)
    unmasked = inferer().fit([d["image"] for d in data], tiny_net())
    assert not torch.allclose(collated["latent"], unmasked)
