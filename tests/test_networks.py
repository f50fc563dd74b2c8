"""Unit tests of the coordinate network (NISFNet) and its activation layers."""

from __future__ import annotations

import math
from functools import partial

import helpers
import pytest
import torch
from torch import nn

from nisf_monai.networks import GaborLayer, NISFNet, ReLULayer, SineLayer

TINY = {"latent_dim": 16, "hidden_dim": 16, "num_layers": 2, "num_classes": 4}


tiny_net = partial(helpers.tiny_net, **TINY)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("batch,num_points", [(1, 1), (2, 37)])
def test_point_set_shapes(batch: int, num_points: int) -> None:
    """A point set (B, 3, N) gives (B, M, N) segmentation logits and (B, 1, N) intensity logits."""
    net = tiny_net()
    coords = torch.rand(batch, 3, num_points) - 0.5
    seg, intensity = net.forward_heads(coords, torch.randn(batch, 16))
    assert seg.shape == (batch, 4, num_points)
    assert intensity.shape == (batch, 1, num_points)


def test_grid_shapes_and_equivalence_to_points() -> None:
    """A grid (B, 3, X, Y, Z) gives (B, M, X, Y, Z); each voxel equals the same coordinate fed as a point set
    (C-order flattening)."""
    net = tiny_net()
    grid = torch.rand(2, 3, 4, 5, 3) - 0.5
    latent = torch.randn(2, 16)
    seg, intensity = net.forward_heads(grid, latent)
    assert seg.shape == (2, 4, 4, 5, 3)
    assert intensity.shape == (2, 1, 4, 5, 3)
    seg_pts, int_pts = net.forward_heads(grid.reshape(2, 3, -1), latent)
    torch.testing.assert_close(seg.reshape(2, 4, -1), seg_pts)
    torch.testing.assert_close(intensity.reshape(2, 1, -1), int_pts)
    # spot check one voxel against a single-point evaluation
    seg_one, _ = net.forward_heads(grid[:, :, 3, 1, 2, None], latent)
    torch.testing.assert_close(seg[:, :, 3, 1, 2], seg_one[:, :, 0])


def test_points_are_evaluated_independently() -> None:
    """Permuting the points of a set permutes the outputs the same way (no mixing between points)."""
    net = tiny_net()
    coords = torch.rand(1, 3, 20) - 0.5
    latent = torch.randn(1, 16)
    perm = torch.randperm(20)
    out = net(coords, latent)
    out_perm = net(coords[:, :, perm], latent)
    torch.testing.assert_close(out[:, :, perm], out_perm)


def test_forward_is_first_head_and_softmax_sums_to_one() -> None:
    """forward() returns exactly forward_heads()[0]; softmax over classes sums to one at every point."""
    net = tiny_net()
    coords = torch.rand(2, 3, 30) - 0.5
    latent = torch.randn(2, 16)
    seg = net(coords, latent)
    torch.testing.assert_close(seg, net.forward_heads(coords, latent)[0], rtol=0, atol=0)
    probs = torch.softmax(seg, dim=1)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 30))


def test_missing_latent_is_zero_code() -> None:
    """latent=None gives the same output as an explicit all-zero code."""
    net = tiny_net()
    coords = torch.rand(3, 3, 11) - 0.5
    seg_none, int_none = net.forward_heads(coords)
    seg_zero, int_zero = net.forward_heads(coords, torch.zeros(3, 16))
    torch.testing.assert_close(seg_none, seg_zero, rtol=0, atol=0)
    torch.testing.assert_close(int_none, int_zero, rtol=0, atol=0)


@pytest.mark.parametrize("hidden_dim", [16, 24])  # 16: code also seeds the residual stream; 24: input only
def test_latent_changes_output(hidden_dim: int) -> None:
    """Different codes give different predictions at the same coordinates; the same code the same."""
    net = tiny_net(hidden_dim=hidden_dim)
    coords = torch.rand(1, 3, 50) - 0.5
    h1, h2 = torch.randn(1, 16), torch.randn(1, 16)
    out1, out2 = net(coords, h1), net(coords, h2)
    assert (out1 - out2).abs().max() > 1e-3
    torch.testing.assert_close(net(coords, h1.clone()), out1, rtol=0, atol=0)


def test_batch_items_use_their_own_code() -> None:
    """Item b of a batch only depends on code b: evaluating it alone gives the same result."""
    net = tiny_net()
    coords = torch.rand(2, 3, 9) - 0.5
    latent = torch.randn(2, 16)
    out = net(coords, latent)
    torch.testing.assert_close(out[1:], net(coords[1:], latent[1:]))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("shape", [(2, 2, 10), (2, 4, 10), (2, 3)])
def test_wrong_coordinate_shape_raises(shape: tuple[int, ...]) -> None:
    """Coordinates without 3 channels (or without a spatial dim) raise ValueError naming the expected layout."""
    net = tiny_net()
    with pytest.raises(ValueError, match=r"coordinates must be \(B, 3, \*spatial\)") as err:
        net(torch.rand(*shape), torch.zeros(2, 16))
    assert str(list(shape)) in str(err.value) or str(tuple(shape)) in str(err.value)


@pytest.mark.parametrize("latent_shape", [(2, 8), (3, 16), (16,), (2, 16, 1)])
def test_wrong_latent_shape_raises(latent_shape: tuple[int, ...]) -> None:
    """A code of the wrong size, batch or rank raises ValueError stating the expected (B, latent_dim)."""
    net = tiny_net()
    with pytest.raises(ValueError, match=r"latent must be \(B=2, 16\)"):
        net(torch.rand(2, 3, 10), torch.zeros(*latent_shape))


def test_unknown_activation_raises() -> None:
    """An unknown activation name raises ValueError listing the valid choices."""
    with pytest.raises(ValueError, match="gabor"):
        NISFNet(**TINY, activation="tanh")


@pytest.mark.parametrize("kwargs", [{"num_layers": 0}, {"num_classes": 1}])
def test_invalid_sizes_raise(kwargs: dict) -> None:
    """No layers or a single class is rejected at construction."""
    with pytest.raises(ValueError):
        NISFNet(**{**TINY, **kwargs})


# ---------------------------------------------------------------------------------------------- architecture


def test_default_architecture_and_parameter_count() -> None:
    """Defaults: 8 Gabor layers of width 128, code size 128, 4 classes; parameters counted by hand."""
    net = NISFNet()
    assert len(net.layers) == 8
    assert all(isinstance(layer, GaborLayer) for layer in net.layers)
    assert all(layer.freq.out_features == 128 for layer in net.layers)

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    first = 2 * linear(3 + 128, 128)  # Gabor: a frequency and a scale map, input = coordinate + code
    hidden = 7 * 2 * linear(128, 128)
    heads = linear(128, 4) + linear(128, 1)
    expected = first + hidden + heads
    assert expected == 265_605  # ~266k, as documented by the paper's architecture
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("hidden_dim,seeded", [(4, True), (6, False)])
def test_residual_stream_by_hand(hidden_dim: int, seeded: bool) -> None:
    """With every Gabor layer zeroed each layer outputs cos(0) exp(0) = 1, so the residual stream after L
    layers is L (+ the code when latent_dim == hidden_dim seeds it); the seg head is then a plain linear
    map of that, and the intensity head too."""
    torch.manual_seed(0)
    num_layers = 3
    net = NISFNet(latent_dim=4, hidden_dim=hidden_dim, num_layers=num_layers, num_classes=2)
    with torch.no_grad():
        for layer in net.layers:
            for p in layer.parameters():
                p.zero_()
    latent = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    seg, intensity = net.forward_heads(torch.rand(1, 3, 5) - 0.5, latent)
    features = torch.full((hidden_dim,), float(num_layers))
    if seeded:
        features = features + latent[0]
    expected_seg = net.seg_head.weight.detach() @ features + net.seg_head.bias.detach()
    expected_int = net.intensity_head.weight.detach() @ features + net.intensity_head.bias.detach()
    torch.testing.assert_close(seg[0], expected_seg[:, None].expand(2, 5))
    torch.testing.assert_close(intensity[0], expected_int[:, None].expand(1, 5))


@pytest.mark.parametrize("activation,layer_type", [("gabor", GaborLayer), ("siren", SineLayer), ("relu", ReLULayer)])
def test_activation_options(activation: str, layer_type: type) -> None:
    """Each activation option builds layers of its kind and gives finite outputs of the right shape."""
    net = tiny_net(activation=activation)
    assert all(isinstance(layer, layer_type) for layer in net.layers)
    seg, intensity = net.forward_heads(torch.rand(2, 3, 7) - 0.5, torch.randn(2, 16))
    assert seg.shape == (2, 4, 7) and intensity.shape == (2, 1, 7)
    assert torch.isfinite(seg).all() and torch.isfinite(intensity).all()


def test_activation_name_is_case_insensitive() -> None:
    """'SIREN' selects the same layer type as 'siren'."""
    assert isinstance(tiny_net(activation="SIREN").layers[0], SineLayer)


@pytest.mark.parametrize("activation", ["gabor", "siren", "relu"])
def test_torchscript_matches_eager(activation: str) -> None:
    """torch.jit.script gives the same logits as eager mode, with and without a code."""
    net = tiny_net(activation=activation)
    scripted = torch.jit.script(net)
    coords = torch.rand(2, 3, 4, 3, 2) - 0.5
    latent = torch.randn(2, 16)
    torch.testing.assert_close(scripted(coords, latent), net(coords, latent))
    torch.testing.assert_close(scripted(coords), net(coords))


def test_gradients_reach_latent_and_weights() -> None:
    """A loss on the outputs has non-zero gradients with respect to the code and every parameter."""
    net = tiny_net()
    latent = torch.randn(1, 16, requires_grad=True)
    seg, intensity = net.forward_heads(torch.rand(1, 3, 25) - 0.5, latent)
    (seg.square().mean() + intensity.square().mean()).backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------- layers


def test_gabor_layer_matches_formula() -> None:
    """GaborLayer computes cos(w0 (Wf x + bf)) * exp(-(s0 (Ws x + bs))^2), checked with independent maths."""
    torch.manual_seed(1)
    layer = GaborLayer(5, 7, omega0=3.0, sigma0=2.0)
    x = torch.randn(4, 5, dtype=torch.float64)
    wf, bf = layer.freq.weight.detach().double().tolist(), layer.freq.bias.detach().double().tolist()
    ws, bs = layer.scale.weight.detach().double().tolist(), layer.scale.bias.detach().double().tolist()
    xl = x.tolist()
    expected = torch.empty(4, 7, dtype=torch.float64)
    for n in range(4):
        for o in range(7):
            phase = sum(wf[o][i] * xl[n][i] for i in range(5)) + bf[o]
            env = sum(ws[o][i] * xl[n][i] for i in range(5)) + bs[o]
            expected[n, o] = math.cos(3.0 * phase) * math.exp(-((2.0 * env) ** 2))
    with torch.no_grad():
        torch.testing.assert_close(layer.double()(x), expected)


def test_gabor_layer_gradcheck() -> None:
    """Autograd of GaborLayer agrees with finite differences (float64), for inputs and parameters."""
    torch.manual_seed(2)
    layer = GaborLayer(3, 4, omega0=2.0, sigma0=1.0).double()
    x = (0.3 * torch.randn(5, 3, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,))
    params = dict(layer.named_parameters())

    def as_function(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(
        as_function, (x, *[p.detach().clone().requires_grad_(True) for p in params.values()])
    )


def test_gabor_layer_analytic_derivative() -> None:
    """For a 1-in/1-out layer with set weights, dy/dx equals the hand-derived
    -w0 a sin(w0(ax+b)) g - 2 s0^2 c (cx+d) cos(w0(ax+b)) g with g = exp(-(s0(cx+d))^2)."""
    w0, s0, a, b, c, d = 4.0, 1.5, 0.7, -0.2, 0.9, 0.1
    layer = GaborLayer(1, 1, omega0=w0, sigma0=s0).double()
    with torch.no_grad():
        layer.freq.weight.fill_(a)
        layer.freq.bias.fill_(b)
        layer.scale.weight.fill_(c)
        layer.scale.bias.fill_(d)
    xs = torch.linspace(-1, 1, 9, dtype=torch.float64)
    x = xs[:, None].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    for xv, gv in zip(xs.tolist(), grad[:, 0].tolist(), strict=True):
        g = math.exp(-((s0 * (c * xv + d)) ** 2))
        expected = (
            -w0 * a * math.sin(w0 * (a * xv + b)) * g - 2 * s0**2 * c * (c * xv + d) * math.cos(w0 * (a * xv + b)) * g
        )
        assert gv == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("in_features", [3, 64])
def test_sine_layer_init_bounds(in_features: int) -> None:
    """SIREN init: first layer |w| <= 1/fan_in, later layers |w| <= sqrt(6/fan_in)/omega0; and the draws
    fill the range (not a degenerate, far smaller init)."""
    torch.manual_seed(3)
    omega0 = 30.0
    first = SineLayer(in_features, 256, omega0=omega0, is_first=True)
    hidden = SineLayer(in_features, 256, omega0=omega0, is_first=False)
    first_bound = 1.0 / in_features
    hidden_bound = math.sqrt(6.0 / in_features) / omega0
    assert first.linear.weight.abs().max() <= first_bound
    assert first.linear.weight.abs().max() > 0.9 * first_bound
    assert hidden.linear.weight.abs().max() <= hidden_bound
    assert hidden.linear.weight.abs().max() > 0.9 * hidden_bound


def test_sine_and_relu_layer_formulas() -> None:
    """SineLayer is sin(w0 (W x + b)); ReLULayer is max(W x + b, 0)."""
    torch.manual_seed(4)
    x = torch.randn(6, 3)
    sine = SineLayer(3, 5, omega0=7.0)
    torch.testing.assert_close(sine(x), torch.sin(7.0 * (x @ sine.linear.weight.T + sine.linear.bias)))
    relu = ReLULayer(3, 5)
    pre = x @ relu.linear.weight.T + relu.linear.bias
    torch.testing.assert_close(relu(x), torch.where(pre > 0, pre, torch.zeros_like(pre)))


def test_gabor_default_init_is_pytorch_linear() -> None:
    """WIRE keeps nn.Linear's default init: weights within +-1/sqrt(fan_in)."""
    torch.manual_seed(5)
    layer = GaborLayer(16, 64)
    bound = 1.0 / math.sqrt(16)
    for lin in (layer.freq, layer.scale):
        assert isinstance(lin, nn.Linear)
        assert lin.weight.abs().max() <= bound
        assert lin.weight.abs().max() > 0.9 * bound
