"""Unit tests of the NISF training objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nisf_monai.losses import NISFLoss, intensity_loss

TERM_KEYS = {"dice", "bce_seg", "bce_intensity", "latent_l2"}


def reference_dice(logits: torch.Tensor, label: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss as MONAI's DiceLoss(include_background=True, to_onehot_y=True, softmax=True) defines it:
    per sample and class 1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s), then the mean over samples and classes."""
    probs = torch.softmax(logits.double(), dim=1)
    onehot = F.one_hot(label[:, 0].long(), logits.shape[1]).movedim(-1, 1).double()
    dims = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def reference_bce(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy, written out."""
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def random_inputs(seed: int = 0, batch: int = 2, classes: int = 4, spatial=(3, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(batch, classes, *spatial, generator=g)
    intensity_logit = torch.randn(batch, 1, *spatial, generator=g)
    label = torch.randint(0, classes, (batch, 1, *spatial), generator=g)
    intensity = torch.rand(batch, 1, *spatial, generator=g)
    latents = torch.randn(batch, 8, generator=g)
    return seg, intensity_logit, label, intensity, latents


def test_perfect_prediction_has_zero_segmentation_loss() -> None:
    """Confident logits on the right class give dice ~ 0 and bce_seg ~ 0 (up to the 1e-6 clamp)."""
    label = torch.tensor([[[0, 1, 2, 3, 1, 1, 0, 2]]])
    seg = 50.0 * F.one_hot(label[:, 0], 4).movedim(-1, 1).float()
    loss = NISFLoss(alpha=0.0, latent_weight=0.0)
    total = loss(seg, torch.zeros(1, 1, 8), label, torch.zeros(1, 1, 8), torch.zeros(1, 4))
    assert loss.terms["dice"] == pytest.approx(0.0, abs=1e-5)
    assert loss.terms["bce_seg"] == pytest.approx(0.0, abs=1e-5)
    assert float(total) == pytest.approx(0.0, abs=1e-4)


def test_wrong_confident_prediction_has_large_loss() -> None:
    """Confident logits on the wrong class give dice ~ 1 and a large bce_seg."""
    label = torch.tensor([[[0, 1, 2, 3]]])
    wrong = (label + 1) % 4
    seg = 50.0 * F.one_hot(wrong[:, 0], 4).movedim(-1, 1).float()
    loss = NISFLoss()
    loss(seg, torch.zeros(1, 1, 4), label, torch.zeros(1, 1, 4), torch.zeros(1, 4))
    assert loss.terms["dice"] == pytest.approx(1.0, abs=1e-5)
    # two of four classes per point are wrong at probability 1 - 1e-6 (the clamp): bce = 2/4 * -log(1e-6)
    assert loss.terms["bce_seg"] == pytest.approx(0.5 * -math.log(1e-6), rel=1e-3)


def test_terms_have_documented_keys_and_values() -> None:
    """terms holds exactly dice, bce_seg, bce_intensity and latent_l2, each equal to an independent computation."""
    seg, intensity_logit, label, intensity, latents = random_inputs()
    loss = NISFLoss()
    loss(seg, intensity_logit, label, intensity, latents)
    assert set(loss.terms) == TERM_KEYS
    assert all(isinstance(v, float) for v in loss.terms.values())
    probs = torch.softmax(seg.double(), dim=1)
    onehot = F.one_hot(label[:, 0], 4).movedim(-1, 1).double()
    assert loss.terms["dice"] == pytest.approx(float(reference_dice(seg, label)), rel=1e-5)
    assert loss.terms["bce_seg"] == pytest.approx(float(reference_bce(probs, onehot)), rel=1e-5)
    expected_int = reference_bce(torch.sigmoid(intensity_logit.double()), intensity.double())
    assert loss.terms["bce_intensity"] == pytest.approx(float(expected_int), rel=1e-5)
    assert loss.terms["latent_l2"] == pytest.approx(float((latents.double() ** 2).mean()), rel=1e-6)


@pytest.mark.parametrize("alpha,latent_weight", [(10.0, 1e-4), (0.0, 0.0), (2.5, 3.0)])
def test_total_is_weighted_sum(alpha: float, latent_weight: float) -> None:
    """total = dice + bce_seg + alpha * bce_intensity + latent_weight * mean(h^2), recomputed independently."""
    seg, intensity_logit, label, intensity, latents = random_inputs(seed=1)
    total = NISFLoss(alpha=alpha, latent_weight=latent_weight)(seg, intensity_logit, label, intensity, latents)
    probs = torch.softmax(seg.double(), dim=1)
    onehot = F.one_hot(label[:, 0], 4).movedim(-1, 1).double()
    expected = (
        reference_dice(seg, label)
        + reference_bce(probs, onehot)
        + alpha * reference_bce(torch.sigmoid(intensity_logit.double()), intensity.double())
        + latent_weight * (latents.double() ** 2).mean()
    )
    assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_alpha_scales_only_intensity_term() -> None:
    """Changing alpha changes the total by exactly (delta alpha) * bce_intensity; the other terms are unchanged."""
    inputs = random_inputs(seed=2)
    low, high = NISFLoss(alpha=1.0), NISFLoss(alpha=4.0)
    t_low, t_high = float(low(*inputs)), float(high(*inputs))
    assert low.terms == pytest.approx(high.terms)
    assert t_high - t_low == pytest.approx(3.0 * low.terms["bce_intensity"], rel=1e-5)


def test_dice_and_bce_weights() -> None:
    """dice_weight and bce_weight scale their own terms."""
    inputs = random_inputs(seed=3)
    base = NISFLoss(alpha=0.0, latent_weight=0.0)
    t_base = float(base(*inputs))
    weighted = float(NISFLoss(alpha=0.0, latent_weight=0.0, dice_weight=2.0, bce_weight=0.0)(*inputs))
    assert t_base == pytest.approx(base.terms["dice"] + base.terms["bce_seg"], rel=1e-6)
    assert weighted == pytest.approx(2.0 * base.terms["dice"], rel=1e-6)


def test_gradients_flow_to_all_inputs() -> None:
    """The total is differentiable with respect to both heads and the codes."""
    seg, intensity_logit, label, intensity, latents = random_inputs(seed=4)
    for t in (seg, intensity_logit, latents):
        t.requires_grad_(True)
    NISFLoss()(seg, intensity_logit, label, intensity, latents).backward()
    for t in (seg, intensity_logit, latents):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # latent gradient of latent_weight * mean(h^2) is 2 * w * h / numel
    torch.testing.assert_close(latents.grad, 2 * 1e-4 * latents.detach() / latents.numel())


def test_point_set_and_volume_layouts_agree() -> None:
    """A volume (B, M, X, Y, Z) and the same voxels as a point set (B, M, N) give the same loss."""
    seg, intensity_logit, label, intensity, latents = random_inputs(seed=5)
    flat = [t.reshape(t.shape[0], t.shape[1], -1) for t in (seg, intensity_logit, label, intensity)]
    loss = NISFLoss()
    assert float(loss(seg, intensity_logit, label, intensity, latents)) == pytest.approx(
        float(loss(*flat, latents)), rel=1e-6
    )


def test_intensity_loss_clamps_targets() -> None:
    """Targets outside [0, 1] are clamped: 1.7 counts as 1 and -0.3 as 0."""
    logit = torch.tensor([0.3, -1.2])
    torch.testing.assert_close(
        intensity_loss(logit, torch.tensor([1.7, -0.3])), intensity_loss(logit, torch.tensor([1.0, 0.0]))
    )
    expected = -(math.log(1 / (1 + math.exp(-0.3))) + math.log(1 - 1 / (1 + math.exp(1.2)))) / 2
    assert float(intensity_loss(logit, torch.tensor([1.0, 0.0]))) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("label_shape", [(2, 2, 3, 4, 2), (2, 1, 3, 4, 3), (2, 1, 24)])
def test_label_shape_mismatch_raises(label_shape) -> None:
    """A label that is not (B, 1, *spatial of the logits) raises ValueError."""
    seg, intensity_logit, _, intensity, latents = random_inputs()
    with pytest.raises(ValueError, match="label must be"):
        NISFLoss()(seg, intensity_logit, torch.zeros(label_shape), intensity, latents)


def test_label_batch_mismatch_raises_value_error() -> None:
    """A label whose batch size differs from the logits' is also a shape mismatch: ValueError."""
    seg, intensity_logit, label, intensity, latents = random_inputs()
    with pytest.raises(ValueError, match="label must be"):
        NISFLoss()(seg, intensity_logit, label[:1], intensity, latents)
