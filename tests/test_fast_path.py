"""The fused fast path of NISFNet (``nisf_monai.networks.fused``) computes the same function, and the same
gradients, as the network written the obvious way.

The reference below is independent of the package's code paths: ``nn.functional.linear`` on the layers'
own parameters, ``torch.cos * torch.exp``, the code concatenated to every point, autograd for gradients.
"""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTHETIC_MODEL
from helpers import tiny_net

from nisf_monai.networks import GaborLayer, NISFNet, fused

SMALL = {"latent_dim": 32, "hidden_dim": 32, "num_layers": 3, "num_classes": 4}


small_net = partial(tiny_net, **SMALL)


def reference_heads(net: NISFNet, coords: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NISFNet.forward_heads written the obvious way, from the same parameters."""
    batch, spatial = coords.shape[0], list(coords.shape[2:])
    points = coords.reshape(batch, net.coord_dim, -1).transpose(1, 2)
    code = latent[:, None, :].expand(-1, points.shape[1], -1)
    x = torch.cat([points, code], dim=-1)
    for i, layer in enumerate(net.layers):
        phase = layer.omega0 * F.linear(x, layer.freq.weight, layer.freq.bias)
        envelope = layer.sigma0 * F.linear(x, layer.scale.weight, layer.scale.bias)
        y = torch.cos(phase) * torch.exp(-envelope * envelope)
        if i == 0:
            x = y + code if net.latent_seeds_residual else y
        else:
            x = y + x
    seg = F.linear(x, net.seg_head.weight, net.seg_head.bias).transpose(1, 2).reshape([batch, -1] + spatial)
    intensity = (
        F.linear(x, net.intensity_head.weight, net.intensity_head.bias).transpose(1, 2).reshape([batch, 1] + spatial)
    )
    return seg, intensity


def outputs_and_grads(forward, net: NISFNet, coords: torch.Tensor, latent: torch.Tensor) -> list[torch.Tensor]:
    """Both heads, then the gradients of a loss that weights every output differently, wrt the coordinates,
    the codes and every parameter."""
    coords = coords.detach().clone().requires_grad_(True)
    latent = latent.detach().clone().requires_grad_(True)
    seg, intensity = forward(net, coords, latent)
    weights = torch.linspace(-1.0, 2.0, seg[0, 0].numel(), dtype=seg.dtype).reshape(seg.shape[2:])
    loss = (seg.square() * weights).mean() + (intensity * weights).sum() / weights.numel()
    grads = torch.autograd.grad(loss, [coords, latent, *net.parameters()])
    return [seg.detach(), intensity.detach(), *grads]


def package_heads(net: NISFNet, coords: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return net.forward_heads(coords, latent)


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, names: list[str]) -> None:
    for name, a, e in zip(names, actual, expected, strict=True):
        # relative to the tensor's scale: gradients of single entries can be ~0 where others are large
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * float(e.abs().max()), msg=lambda m, n=name: f"{n}: {m}")


def names_of(net: NISFNet) -> list[str]:
    return ["seg", "intensity", "d/coords", "d/latent", *[f"d/{n}" for n, _ in net.named_parameters()]]


@pytest.fixture(autouse=True)
def _eager_kernels():
    """Unit tests run the eager kernels (compiling would take longer than the tests); the compiled form's
    maths is checked separately below, run as plain Python."""
    fused.set_compile(False)
    yield
    fused.set_compile(True)


# ------------------------------------------------------------------------------------- same function


@pytest.mark.parametrize("latent_dim", [32, 12])  # 32: the code seeds the residual stream; 12: input only
def test_float32_outputs_and_all_gradients_match_reference(latent_dim: int) -> None:
    """Point set (B, 3, N): outputs and gradients wrt coordinates, codes and every parameter agree with the
    obvious implementation to float32 precision."""
    net = small_net(latent_dim=latent_dim)
    torch.manual_seed(1)
    coords, latent = torch.rand(3, 3, 200) - 0.5, 0.1 * torch.randn(3, latent_dim)
    expected = outputs_and_grads(reference_heads, net, coords, latent)
    actual = outputs_and_grads(package_heads, net, coords, latent)
    assert_all_close(actual, expected, rtol=1e-4, names=names_of(net))


def test_float64_matches_reference_exactly_and_default_sizes_work() -> None:
    """In float64 the two agree to rounding (1e-10), also at the default sizes (8 x 128, code 128)."""
    net = NISFNet().double()
    torch.manual_seed(2)
    coords, latent = torch.rand(2, 3, 64, dtype=torch.float64) - 0.5, 0.1 * torch.randn(2, 128, dtype=torch.float64)
    expected = outputs_and_grads(reference_heads, net, coords, latent)
    actual = outputs_and_grads(package_heads, net, coords, latent)
    assert_all_close(actual, expected, rtol=1e-10, names=names_of(net))


def test_grid_input_matches_reference() -> None:
    """A coordinate grid (B, 3, X, Y, Z) gives the reference's outputs and gradients, shaped like the grid."""
    net = small_net()
    torch.manual_seed(3)
    coords, latent = torch.rand(2, 3, 5, 4, 3) - 0.5, 0.1 * torch.randn(2, 32)
    expected = outputs_and_grads(reference_heads, net, coords, latent)
    actual = outputs_and_grads(package_heads, net, coords, latent)
    assert actual[0].shape == (2, 4, 5, 4, 3) and actual[1].shape == (2, 1, 5, 4, 3)
    assert_all_close(actual, expected, rtol=1e-4, names=names_of(net))


def test_no_grad_and_inference_mode_match_grad_mode() -> None:
    """Without autograd (evaluation, sampling) the fast path gives the same logits as with it."""
    net = small_net()
    coords, latent = torch.rand(2, 3, 50) - 0.5, 0.1 * torch.randn(2, 32)
    seg, intensity = net.forward_heads(coords, latent.requires_grad_(True))
    with torch.no_grad():
        seg_ng, int_ng = net.forward_heads(coords, latent)
    with torch.inference_mode():
        seg_im, _ = net.forward_heads(coords, latent)
    torch.testing.assert_close(seg_ng, seg.detach(), rtol=0, atol=0)
    torch.testing.assert_close(int_ng, intensity.detach(), rtol=0, atol=0)
    torch.testing.assert_close(seg_im, seg.detach(), rtol=0, atol=0)
    torch.testing.assert_close(seg_ng, reference_heads(net, coords, latent.detach())[0], rtol=1e-4, atol=1e-5)


def test_latent_only_gradient_with_frozen_network() -> None:
    """Latent fitting: the network frozen, the gradient wrt the code alone (torch.autograd.grad) equals the
    reference's, and no parameter gradient is produced."""
    net = small_net().requires_grad_(False)
    coords = torch.rand(2, 3, 300) - 0.5
    latent = (0.1 * torch.randn(2, 32)).requires_grad_(True)
    target = torch.rand(2, 1, 300)
    grads = []
    for forward in (package_heads, reference_heads):
        _, logit = forward(net, coords, latent)
        (grad,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logit, target), [latent])
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4 * float(grads[1].abs().max()))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("chunk_elements", [64 * 30, 64 * 200])  # within one frame / several frames a chunk
def test_chunked_evaluation_matches_whole(chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluating the points chunk by chunk (as on CPU for large inputs) changes nothing: outputs and all
    gradients match the reference, whether chunks split frames or group several."""
    monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", chunk_elements)
    net = small_net()
    torch.manual_seed(4)
    coords, latent = torch.rand(3, 3, 70) - 0.5, 0.1 * torch.randn(3, 32)
    expected = outputs_and_grads(reference_heads, net, coords, latent)
    actual = outputs_and_grads(package_heads, net, coords, latent)
    assert_all_close(actual, expected, rtol=1e-4, names=names_of(net))


def test_without_onednn_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN product and its plain ``torch.mm`` fallback give the same network."""
    net = small_net()
    coords, latent = torch.rand(2, 3, 40) - 0.5, 0.1 * torch.randn(2, 32)
    with_onednn = outputs_and_grads(package_heads, net, coords, latent)
    monkeypatch.setitem(fused._onednn, "ok", False)
    without = outputs_and_grads(package_heads, net, coords, latent)
    assert_all_close(without, with_onednn, rtol=1e-5, names=names_of(net))


# ------------------------------------------------------------------------------------- autograd Functions


def test_gradcheck_gabor_activation() -> None:
    """The hand-written backward of cos(a) exp(-b^2) agrees with finite differences (float64)."""
    torch.manual_seed(5)
    z = (0.5 * torch.randn(6, 2 * 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(fused.gabor_activation, (z,))


def test_gradcheck_whole_network_function() -> None:
    """The network's single autograd node agrees with finite differences (float64) for the points, the
    code and every parameter; with and without the code seeding the residual stream."""
    for latent_dim in (4, 3):
        torch.manual_seed(6)
        net = NISFNet(latent_dim=latent_dim, hidden_dim=4, num_layers=3, num_classes=2, omega0=2.0, sigma0=1.0).double()
        params = dict(net.named_parameters())
        points = (torch.rand(2, 5, 3, dtype=torch.float64) - 0.5).requires_grad_(True)
        latent = (0.3 * torch.randn(2, latent_dim, dtype=torch.float64)).requires_grad_(True)

        def run(points, latent, *values, net=net, params=params):
            with torch.nn.utils.stateless._reparametrize_module(net, dict(zip(params, values, strict=True))):
                return fused.gabor_network(
                    net.layers, [net.seg_head, net.intensity_head], points, latent, net.latent_seeds_residual
                )

        values = [p.detach().clone().requires_grad_(True) for p in params.values()]
        assert torch.autograd.gradcheck(run, (points, latent, *values))


def test_compiled_kernel_maths_equals_eager_kernels() -> None:
    """The kernels' compiler form (run here as plain Python, no compiler) and their eager in-place form
    compute the same values: so the compiled path is checked without waiting for a compiler."""
    torch.manual_seed(7)
    z, bias, res = torch.randn(9, 2, 16), torch.randn(16), torch.randn(9, 2, 8)
    for need_grad in (True, False):
        plain = fused._activation_plain(z, bias, res, need_grad)
        eager = fused._activation_eager(z.clone(), bias, res.clone(), need_grad)
        for p, e in zip(plain, eager, strict=True):
            assert (p is None) == (e is None)
            if p is not None:
                torch.testing.assert_close(p, e)
    points, weight_t, frame_bias = torch.rand(3, 4, 3), torch.randn(3, 16), torch.randn(3, 1, 16)
    for p, e in zip(
        fused._first_plain(points, weight_t, frame_bias, None, True),
        fused._first_eager(points, weight_t, frame_bias, None, True),
        strict=True,
    ):
        torch.testing.assert_close(p, e)
    g, m, da, db = (torch.randn(5, 8) for _ in range(4))
    torch.testing.assert_close(fused._backward_plain(g, da, db), fused._backward_eager(g, da, db))
    for p, e in zip(
        fused._backward_acc_plain(g, m, da, db), fused._backward_acc_eager(g, m.clone(), da, db), strict=True
    ):
        torch.testing.assert_close(p, e)


# ------------------------------------------------------------------------------------- fallbacks, other paths


def test_failed_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When torch.compile fails (no compiler, no triton, ...) the network still runs, gives the right values,
    logs one warning and stops trying on that device."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "MIN_COMPILE_ROWS", 1)
    monkeypatch.setattr(fused, "MIN_COMPILE_WIDTH", 1)
    fused.set_compile(True)
    net = small_net()
    coords, latent = torch.rand(2, 3, 30) - 0.5, 0.1 * torch.randn(2, 32)
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        actual = outputs_and_grads(package_heads, net, coords, latent)
        actual_again = outputs_and_grads(package_heads, net, coords, latent)
    assert_all_close(actual, outputs_and_grads(reference_heads, net, coords, latent), rtol=1e-4, names=names_of(net))
    assert_all_close(actual_again, actual, rtol=0.0, names=names_of(net))
    assert fused.compile_state()["failed"] == ["cpu"]
    assert sum("torch.compile of the Gabor kernels failed" in r.getMessage() for r in caplog.records) == 1


def test_compiled_kernels_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a working compiler the compiled kernels run (none failed) and give the reference's outputs and
    gradients, for point sets with and without gradients. Compilation is on by default, so CI runs this (about
    30 s of compiling)."""
    monkeypatch.setattr(fused, "MIN_COMPILE_ROWS", 1)
    monkeypatch.setattr(fused, "MIN_COMPILE_WIDTH", 1)
    fused.set_compile(True)
    net = small_net()
    coords, latent = torch.rand(2, 3, 300) - 0.5, 0.1 * torch.randn(2, 32)
    actual = outputs_and_grads(package_heads, net, coords, latent)
    assert_all_close(actual, outputs_and_grads(reference_heads, net, coords, latent), rtol=1e-4, names=names_of(net))
    with torch.no_grad():
        torch.testing.assert_close(net(coords, latent), actual[0], rtol=1e-5, atol=1e-6)
    state = fused.compile_state()
    assert state["failed"] == [] and {"activation_grad:cpu", "backward:cpu", "first_grad:cpu"} <= set(state["compiled"])


def test_torchscript_matches_fast_path() -> None:
    """torch.jit.script(NISFNet) runs the plain maths and gives the fast path's logits."""
    net = small_net().eval()
    scripted = torch.jit.script(net)
    coords, latent = torch.rand(2, 3, 4, 3, 2) - 0.5, 0.1 * torch.randn(2, 32)
    torch.testing.assert_close(scripted(coords, latent), net(coords, latent), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scripted(coords), net(coords), rtol=1e-4, atol=1e-5)


def test_autocast_uses_plain_maths() -> None:
    """Under autocast the plain formula runs (so products follow the autocast dtype), as before the fast path."""
    net = small_net()
    coords, latent = torch.rand(1, 3, 20) - 0.5, 0.1 * torch.randn(1, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg, _ = net.forward_heads(coords, latent)
        expected, _ = reference_heads(net, coords, latent)
    assert seg.dtype == torch.bfloat16
    torch.testing.assert_close(seg, expected, rtol=0, atol=0)


def test_state_dict_keys_unchanged_and_layer_uses_fused_activation() -> None:
    """Checkpoints keep the per-map keys (freq/scale); GaborLayer alone still equals its formula."""
    net = small_net()
    keys = set(net.state_dict())
    for i in range(SMALL["num_layers"]):
        assert {
            f"layers.{i}.freq.weight",
            f"layers.{i}.freq.bias",
            f"layers.{i}.scale.weight",
            f"layers.{i}.scale.bias",
        } <= keys
    torch.manual_seed(8)
    layer = GaborLayer(6, 5)
    x = torch.randn(7, 6, requires_grad=True)
    y = layer(x)
    expected = torch.cos(10 * layer.freq(x)) * torch.exp(-((10 * layer.scale(x)) ** 2))
    torch.testing.assert_close(y, expected)
    (g_fast,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_non_cpu_device_path_is_guarded() -> None:
    """On a device other than CPU the fast path takes no CPU-only route (oneDNN, chunking): run it on the
    'meta' device, which has no kernels of its own, and check the shapes."""
    net = small_net().to("meta")
    coords, latent = torch.empty(2, 3, 10, device="meta"), torch.empty(2, 32, device="meta", requires_grad=True)
    seg, intensity = net.forward_heads(coords, latent)
    assert seg.shape == (2, 4, 10) and intensity.shape == (2, 1, 10) and seg.device.type == "meta"
    (grad,) = torch.autograd.grad(seg.sum() + intensity.sum(), [latent])
    assert grad.shape == (2, 32)


def test_double_backward_needs_plain_path() -> None:
    """The fast path is differentiable once and says so; fast_path=False gives higher-order gradients."""
    coords = (torch.rand(1, 3, 6) - 0.5).requires_grad_(True)
    latent = torch.zeros(1, 32)
    with pytest.raises(RuntimeError, match="fast_path=False"):
        torch.autograd.grad(small_net()(coords, latent).sum(), coords, create_graph=True)
    plain = small_net(fast_path=False)
    assert not any(layer.fused for layer in plain.layers)
    (grad,) = torch.autograd.grad(plain(coords, latent).sum(), coords, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), coords)
    assert torch.isfinite(second).all()
    torch.testing.assert_close(plain(coords, latent), small_net()(coords, latent), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    """The same code runs on CUDA and agrees with the CPU result (outputs and code gradients)."""
    net = small_net()
    coords, latent = torch.rand(2, 3, 500) - 0.5, 0.1 * torch.randn(2, 32)
    cpu = outputs_and_grads(package_heads, net, coords, latent)
    gpu = outputs_and_grads(package_heads, net.cuda(), coords.cuda(), latent.cuda())
    assert_all_close([t.cpu() for t in gpu], cpu, rtol=1e-3, names=names_of(net))


def test_float16_autocast_keeps_a_trained_models_segmentation() -> None:
    """What the bundle's AMP (on CUDA: float16 autocast) does to the trained network's outputs, measured here
    with the CPU's float16 autocast: the argmax segmentation must stay (>= 99% of points agree), so sampling
    under AMP gives the same labels. bfloat16 (7 mantissa bits) is not used: omega0 = 10 amplifies rounding."""
    model = SYNTHETIC_MODEL / "model.pt"
    network = NISFNet()
    network.load_state_dict(torch.load(model, map_location="cpu", weights_only=True))
    network.eval()
    generator = torch.Generator().manual_seed(0)
    points = (torch.rand(2, 3, 8192, generator=generator) - 0.5) * 0.5  # +-100 mm around the volume centre
    latent = torch.randn(2, 128, generator=generator) * 0.05
    with torch.no_grad():
        seg, _ = network.forward_heads(points, latent)
        with torch.autocast("cpu", dtype=torch.float16):
            seg16, _ = network.forward_heads(points, latent)
    assert seg16.dtype == torch.float16
    agreement = (seg16.float().argmax(1) == seg.argmax(1)).float().mean()
    assert agreement >= 0.99, f"float16 autocast changed {1 - agreement:.1%} of the labels"
