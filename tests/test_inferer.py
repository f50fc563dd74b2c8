"""Unit tests of LatentOptimisationInferer: fitting a code to a new image with a frozen network, then
sampling the segmentation on a grid."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from helpers import AFFINE, as_image, oblique_affine, tiny_net
from monai.data import MetaTensor, list_data_collate

from nisf_monai.inferers import LatentOptimisationInferer, target_grid
from nisf_monai.losses import intensity_loss
from nisf_monai.networks import NISFNet
from nisf_monai.transforms import CoordinateMapping

SHAPE = (12, 12, 4)
EXTENT = 24.0  # mm per network unit: the 22 x 22 x 24 mm volume spans about [-0.5, 0.5]
LATENT = 8


pytestmark = pytest.mark.usefixtures("single_thread")


# oblique axes turned 0.4 rad, with a flipped world axis as well
oblique = partial(oblique_affine, (2.0, 1.5, 6.0), (-10.0, 4.0, 20.0), 0.4, flip_world_axis=1)


def inferer(**kwargs) -> LatentOptimisationInferer:
    args = {"num_steps": 5, "learning_rate": 1e-2, "num_points": 64, "extent_mm": EXTENT, "log_every": 0}
    return LatentOptimisationInferer(**{**args, **kwargs})


def volumes() -> tuple[np.ndarray, np.ndarray]:
    """Two synthetic images with intensities in [0.15, 0.85]: a bright disc and a ramp along x."""
    i, j, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    r = np.hypot((i - 5.5) * 2, (j - 5.5) * 2)
    disc = 0.15 + 0.7 / (1 + np.exp((r - 6) / 1.5))
    ramp = 0.15 + 0.7 / (1 + np.exp((i - 3) * 2 / 3.0))
    return disc.astype(np.float32), ramp.astype(np.float32)


def train_on_volumes(seed: int = 1, steps: int = 150) -> dict:
    """A tiny network auto-decoded (network and two codes trained jointly) on the disc and the ramp."""
    disc, ramp = volumes()
    mapping = CoordinateMapping(AFFINE, SHAPE, EXTENT)
    points = mapping.grid(AFFINE, SHAPE).T.expand(2, -1, -1)
    targets = torch.as_tensor(np.stack([disc, ramp])).reshape(2, 1, -1)
    net = tiny_net(seed)
    codes = torch.nn.Parameter(torch.randn(2, LATENT) * 0.01)
    optimizer = torch.optim.Adam([*net.parameters(), codes], lr=5e-3)
    for _ in range(steps):
        _, logit = net.forward_heads(points, codes)
        loss = intensity_loss(logit, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.zero_grad(set_to_none=True)
    return {"net": net.eval(), "codes": codes.detach(), "disc": disc, "ramp": ramp, "mapping": mapping}


@pytest.fixture(scope="module")
def trained() -> dict:
    """See train_on_volumes."""
    return train_on_volumes()


def reconstruction_loss(net: NISFNet, mapping: CoordinateMapping, volume: np.ndarray, code: torch.Tensor) -> float:
    with torch.no_grad():
        _, logit = net.forward_heads(mapping.grid(AFFINE, SHAPE).T[None], code)
        return float(intensity_loss(logit, torch.as_tensor(volume).reshape(1, 1, -1)))


# ---------------------------------------------------------------------------------------------- fit


def test_fit_leaves_network_untouched() -> None:
    """fit() changes no parameter or buffer, sets no .grad and keeps requires_grad flags."""
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    latent = inferer(num_steps=10).fit(as_image(volumes()[0]), net)
    assert latent.shape == (1, LATENT)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == flags


def test_fit_under_no_grad_matches_fit_with_grad() -> None:
    """Called inside torch.no_grad() (as MONAI evaluators do) fit still optimises, with the same result."""
    net = tiny_net()
    image = as_image(volumes()[0])
    with torch.no_grad():
        under_no_grad = inferer(num_steps=10).fit(image, net)
    torch.testing.assert_close(under_no_grad, inferer(num_steps=10).fit(image, net), rtol=0, atol=0)
    initial = inferer(num_steps=0).fit(image, net)
    assert (under_no_grad - initial).abs().max() > 1e-3  # the code did move
    assert not under_no_grad.requires_grad


def test_fit_under_inference_mode_matches_fit_with_grad() -> None:
    """Called inside torch.inference_mode() on an image made there, fit still optimises the code."""
    net = tiny_net()
    with torch.inference_mode():
        image = as_image(volumes()[0])
        under_inference_mode = inferer(num_steps=10).fit(image, net)
    torch.testing.assert_close(
        under_inference_mode, inferer(num_steps=10).fit(as_image(volumes()[0]), net), rtol=0, atol=0
    )


def test_zero_steps_returns_seeded_initial_code() -> None:
    """With num_steps=0 the code is the seeded N(0, init_std^2) draw, reproduced independently here."""
    latent = inferer(num_steps=0, init_std=0.5, seed=11).fit(as_image(volumes()[0]), tiny_net())
    expected = torch.randn(1, LATENT, generator=torch.Generator().manual_seed(11)) * 0.5
    torch.testing.assert_close(latent, expected, rtol=0, atol=0)


def test_same_seed_same_code() -> None:
    """The same seed gives an identical code (init and point sampling); another seed a different one."""
    net = tiny_net()
    image = as_image(volumes()[0])
    a = inferer(num_steps=8, seed=3).fit(image, net)
    b = inferer(num_steps=8, seed=3).fit(image, net)
    c = inferer(num_steps=8, seed=4).fit(image, net)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_latent_dim_override() -> None:
    """latent_dim defaults to network.latent_dim; a mismatching override is caught by the network."""
    with pytest.raises(ValueError, match="latent must be"):
        inferer(num_steps=1, latent_dim=LATENT + 1).fit(as_image(volumes()[0]), tiny_net())


def test_fitting_beats_zero_code_on_trained_network(trained: dict) -> None:
    """With a network that has learnt the disc, a fitted code reconstructs the disc better than the zero
    (population) code, reaching about the loss of the code learnt in training."""
    net, mapping, disc = trained["net"], trained["mapping"], trained["disc"]
    fitted = inferer(num_steps=60, learning_rate=2e-2, num_points=None).fit(as_image(disc), net)
    fitted_loss = reconstruction_loss(net, mapping, disc, fitted)
    zero_loss = reconstruction_loss(net, mapping, disc, torch.zeros(1, LATENT))
    trained_loss = reconstruction_loss(net, mapping, disc, trained["codes"][:1])
    # the BCE floor is the targets' own entropy; compare the excess over it
    floor = float(intensity_loss(torch.logit(torch.as_tensor(disc)), torch.as_tensor(disc)))
    assert fitted_loss - floor < 0.5 * (zero_loss - floor)
    assert fitted_loss - floor < 2.0 * (trained_loss - floor) + 1e-3
    # and the fitted code is nearer the disc's training code than the ramp's
    assert (fitted - trained["codes"][0]).norm() < (fitted - trained["codes"][1]).norm()


def test_reconstruction_resembles_fitted_image(trained: dict) -> None:
    """fit_and_sample's recon of the ramp is close to the ramp and far from the disc."""
    out = inferer(num_steps=60, learning_rate=2e-2, num_points=None).fit_and_sample(
        as_image(trained["ramp"]), trained["net"]
    )
    recon = out["recon"][0, 0].numpy()
    assert np.abs(recon - trained["ramp"]).mean() < 0.5 * np.abs(recon - trained["disc"]).mean()


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("spacing", [None, (3.0, 3.0, 8.0), (1.0, 2.5, 4.0)])
@pytest.mark.parametrize("affine_name", ["diagonal", "oblique"])
def test_fit_and_sample_outputs_on_target_grid(spacing, affine_name: str) -> None:
    """pred and recon are MetaTensors on target_grid(affine, shape, spacing); pred is uint8 labels in
    [0, num_classes), recon in [0, 1], latent (B, L)."""
    affine = AFFINE if affine_name == "diagonal" else oblique()
    image = as_image(volumes()[0], affine)
    out = inferer(num_steps=2, target_spacing=spacing).fit_and_sample(image, tiny_net())
    expected_affine, expected_shape = target_grid(affine, SHAPE, spacing)
    for key in ("pred", "recon"):
        assert isinstance(out[key], MetaTensor)
        assert tuple(out[key].shape) == (1, 1, *expected_shape)
        np.testing.assert_allclose(np.asarray(out[key].affine), expected_affine, atol=1e-9)
        assert list(out[key].meta["spatial_shape"]) == list(expected_shape)
    assert out["pred"].dtype == torch.uint8
    assert int(out["pred"].min()) >= 0 and int(out["pred"].max()) < 3
    assert float(out["recon"].min()) >= 0.0 and float(out["recon"].max()) <= 1.0
    assert out["latent"].shape == (1, LATENT)


def test_fit_and_sample_pred_is_argmax_of_network() -> None:
    """pred at each voxel is the argmax of the network's logits at that voxel's coordinate with the fitted
    code, computed here directly from CoordinateMapping."""
    net = tiny_net(2)
    image = as_image(volumes()[1], oblique())
    out = inferer(num_steps=3, seed=5).fit_and_sample(image, net)
    mapping = CoordinateMapping(oblique(), SHAPE, EXTENT)
    with torch.no_grad():
        seg, logit = net.forward_heads(mapping.grid(oblique(), SHAPE).T[None], out["latent"])
    torch.testing.assert_close(out["pred"].as_tensor().reshape(-1), seg.argmax(1).reshape(-1).to(torch.uint8))
    torch.testing.assert_close(out["recon"].as_tensor().reshape(-1), torch.sigmoid(logit).reshape(-1))


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 4.0)])
def test_chunking_does_not_change_output(spacing) -> None:
    """A chunk_size much smaller than the grid (and not dividing it) gives the same outputs as one chunk."""
    net = tiny_net()
    image = as_image(volumes()[0], oblique())
    one = inferer(num_steps=3, target_spacing=spacing, chunk_size=10**7).fit_and_sample(image, net)
    many = inferer(num_steps=3, target_spacing=spacing, chunk_size=37).fit_and_sample(image, net)
    torch.testing.assert_close(many["pred"], one["pred"], rtol=0, atol=0)
    torch.testing.assert_close(many["recon"], one["recon"])
    probs_one = inferer(num_steps=3, chunk_size=10**7)(image, net)
    probs_many = inferer(num_steps=3, chunk_size=37)(image, net)
    torch.testing.assert_close(probs_many, probs_one)


def test_call_returns_probabilities_on_input_grid() -> None:
    """inferer(image, network) gives (B, M, X, Y, Z) probabilities summing to one, on the input affine,
    whose argmax is fit_and_sample's pred."""
    net = tiny_net()
    image = as_image(volumes()[0], oblique())
    probs = inferer(num_steps=4)(image, net)
    assert isinstance(probs, MetaTensor)
    assert probs.shape == (1, 3, *SHAPE) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1).as_tensor(), torch.ones(1, *SHAPE))
    assert float(probs.min()) >= 0.0
    np.testing.assert_allclose(np.asarray(probs.affine), oblique(), atol=1e-9)
    pred = inferer(num_steps=4).fit_and_sample(image, net)["pred"]
    torch.testing.assert_close(probs.argmax(dim=1, keepdim=True).to(torch.uint8).as_tensor(), pred.as_tensor())


def test_collated_batch() -> None:
    """A collated batch of two images on one grid gives per-item affines (B, 4, 4) and (B, M, *S) output."""
    disc, ramp = volumes()
    items = [{"image": MetaTensor(torch.as_tensor(v)[None], affine=torch.as_tensor(AFFINE))} for v in (disc, ramp)]
    batch = list_data_collate(items)["image"]
    assert batch.is_batch and batch.shape == (2, 1, *SHAPE)
    probs = inferer(num_steps=2)(batch, tiny_net())
    assert probs.shape == (2, 3, *SHAPE)
    assert tuple(probs.affine.shape) == (2, 4, 4)
    np.testing.assert_allclose(np.asarray(probs.affine[1]), AFFINE)
    out = inferer(num_steps=2, target_spacing=(4.0, 4.0, 8.0)).fit_and_sample(batch, tiny_net())
    _, shape = target_grid(AFFINE, SHAPE, (4.0, 4.0, 8.0))
    assert out["pred"].shape == (2, 1, *shape) and out["latent"].shape == (2, LATENT)


# ---------------------------------------------------------------------------------------------- errors


def test_batch_on_different_grids_fits_each_on_its_own_grid() -> None:
    """A collated batch whose images have different affines: fit uses each case's own affine (the codes
    equal fitting each case alone); sampling one output grid for the batch is refused."""
    disc, _ = volumes()
    stretched = AFFINE.copy()
    stretched[0, 0] *= 2.0  # a translation alone would not change centred coordinates; a spacing does
    items = [{"image": MetaTensor(torch.as_tensor(disc)[None], affine=torch.as_tensor(a))} for a in (AFFINE, stretched)]
    net = tiny_net()
    batched = inferer(num_steps=5).fit(list_data_collate(items)["image"], net)
    alone = [inferer(num_steps=5).fit(item["image"][None], net) for item in items]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-4, atol=1e-6)
    assert (alone[0] - alone[1]).abs().max() > 1e-6  # other coordinates, other codes
    with pytest.raises(ValueError, match="share one grid"):
        inferer(num_steps=1).fit_and_sample(list_data_collate(items)["image"], net)


def test_plain_tensor_rejected() -> None:
    """A plain tensor has no affine: TypeError naming MetaTensor."""
    with pytest.raises(TypeError, match="MetaTensor"):
        inferer().fit(torch.rand(1, 1, *SHAPE), tiny_net())


@pytest.mark.parametrize("shape", [(1, *SHAPE), (1, 2, *SHAPE)])
def test_wrong_input_layout_rejected(shape) -> None:
    """Inputs that are not (B, 1, X, Y, Z) raise ValueError."""
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        inferer()(MetaTensor(torch.rand(*shape)), tiny_net())


def test_negative_steps_rejected() -> None:
    """num_steps < 0 is rejected at construction."""
    with pytest.raises(ValueError, match="num_steps"):
        LatentOptimisationInferer(num_steps=-1)


def test_fit_runs_in_float32_inside_an_autocast_region() -> None:
    """The bundle turns AMP on when CUDA is present, and its evaluator fits codes inside that autocast region;
    the fit must not run in low precision there (the code's gradient, a mean over many points, would
    underflow in float16). Under a CPU bfloat16 autocast the code equals the float32 one exactly."""
    image, net = as_image(volumes()[0]), tiny_net()
    plain = inferer().fit(image, net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = inferer().fit(image, net)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_batched_fit_in_groups_equals_fitting_each_case_alone(monkeypatch) -> None:
    """On a CPU a batch goes through the network a few cases at a time (cache-sized groups); the per-group
    gradients must add up to the codes each case gets alone, whatever the grouping."""
    from nisf_monai.inferers import latent_optimisation

    disc, ramp = volumes()
    cases = [as_image(v)[0] for v in (disc, ramp, disc[::-1].copy())]
    net = tiny_net()
    alone = torch.cat([inferer(num_steps=4).fit([case], net) for case in cases])
    for group_points in (64, 128, 10**6):  # one case per group, two then one, all three together
        monkeypatch.setattr(latent_optimisation, "CPU_GROUP_POINTS", group_points)
        torch.testing.assert_close(inferer(num_steps=4).fit(cases, net), alone, rtol=1e-4, atol=1e-6)


def test_fit_computes_no_weight_gradients_and_leaves_the_flags_alone(fused_weight_flags: list[bool]) -> None:
    """The code is fitted through weights that do not require grad (so the fused network skips their
    gradients), while the network's own parameters keep requiring grad throughout, also when the fit is
    interrupted, and none gets a gradient."""
    net = tiny_net()
    weight_flags = fused_weight_flags
    own_flags: list[bool] = []

    def watch(step: int, codes: torch.Tensor) -> None:
        own_flags.extend(p.requires_grad for p in net.parameters())

    inferer(num_steps=3).fit(as_image(volumes()[0]), net, monitor=watch, monitor_every=1)
    assert weight_flags and not any(weight_flags)  # the fused backward gets no weight to differentiate
    assert own_flags and all(own_flags)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())

    def interrupt(step: int, codes: torch.Tensor) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        inferer(num_steps=5).fit(as_image(volumes()[0]), net, monitor=interrupt, monitor_every=1)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_output_region_reads_the_network_near_the_heart_only() -> None:
    """Within the HeartRegion the outputs are the network's; beyond it background and intensity 0."""
    from nisf_monai.inferers import HeartLocator, HeartRegion
    from nisf_monai.transforms import POSE_KEY, pose_matrix

    net = tiny_net(3)
    image = as_image(volumes()[0], AFFINE)
    image.meta[POSE_KEY] = pose_matrix([10.0, 12.0, 8.0], torch.eye(3))  # a known heart frame, no search
    settings = {"num_steps": 2, "heart_locator": HeartLocator(), "extent_mm": 100.0}
    everywhere = inferer(**settings).fit_and_sample(image, net)
    region = HeartRegion(radius_mm=8.0)
    near = inferer(**settings, output_region=region).fit_and_sample(image, net)
    mapping = CoordinateMapping(AFFINE, SHAPE, 100.0, pose=image.meta[POSE_KEY])
    inside = region.inside(mapping.grid(AFFINE, SHAPE), 100.0).reshape(SHAPE)
    assert 0 < int(inside.sum()) < inside.numel()
    pred, recon = near["pred"].as_tensor()[0, 0], near["recon"].as_tensor()[0, 0]
    torch.testing.assert_close(pred[inside], everywhere["pred"].as_tensor()[0, 0][inside], rtol=0, atol=0)
    torch.testing.assert_close(recon[inside], everywhere["recon"].as_tensor()[0, 0][inside])
    assert int(pred[~inside].max()) == 0 and float(recon[~inside].max()) < 1e-6
    with pytest.raises(ValueError, match="output_region is measured from the heart frame"):
        LatentOptimisationInferer(output_region=region)
