"""Fused real Gabor (WIRE) network with a hand-written backward, for fast training on CPU and CUDA.

Autograd of ``cos(a) * exp(-b^2)`` written with plain tensor operations keeps about ten full-size
temporaries per layer alive for the backward pass and runs as many separate memory passes; on a CPU they
cost as much as the matrix products. Here the activation computes, in its forward pass, the output and the
two local derivatives

    dy/da = -sin(a) exp(-b^2),        dy/db = -2 b cos(a) exp(-b^2) = -2 b y

and saves only those, so the backward pass is one multiply per half. ``omega0`` and ``sigma0`` are folded
into the weights and both affine maps of a layer are ONE product with the stacked weights
``[omega0 W_f; sigma0 W_s]``, so ``z = [a | b]`` is already scaled. :func:`gabor_network` runs the whole
NISF network (points to both heads) as a single autograd node that also hoists the code's product out of
the per-point work and skips weight gradients of frozen weights.

The elementwise work runs through ``torch.compile`` (one fused loop per call) when a compiler works for the
device, and through in-place eager operations otherwise: a failed compilation is logged once and the eager
kernels take over, with the same results. Set the environment variable ``NISF_COMPILE=0`` or call
:func:`set_compile` to switch compilation off.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "gabor_activation",
    "gabor_network",
    "stacked_gabor_weights",
    "autocast_enabled",
    "set_compile",
    "compile_state",
]

logger = logging.getLogger("nisf_monai")

# Compiling pays off only for large inputs; small ones (unit tests, tiny networks) stay eager so they never
# wait for a compiler.
MIN_COMPILE_ROWS = 2048
MIN_COMPILE_WIDTH = 128  # of the stacked pre-activation (2H): hidden width 64 and up
# Points go through the network in chunks of at most this many pre-activation elements (rows x 2H) on CPU,
# which bounds the temporaries when a whole volume is evaluated at once. Larger chunks are faster here:
# every chunk adds a parallel region per operation, and on a shared machine each region can wait a
# scheduler tick for a descheduled thread. CUDA takes all points at once.
CPU_CHUNK_ELEMENTS = 1 << 24

_settings: dict[str, Any] = {"enabled": os.environ.get("NISF_COMPILE", "1").strip().lower() not in ("0", "false", "no")}
_compiled: dict[str, Callable] = {}
_failed: set[str] = set()


def set_compile(enabled: bool) -> None:
    """Switch ``torch.compile`` of the elementwise kernels on or off (e.g. to avoid the first-call compile
    time in short runs); clears earlier failures so a new attempt is made."""
    _settings["enabled"] = bool(enabled)
    _failed.clear()


def compile_state() -> dict[str, Any]:
    """Whether compilation is enabled, which kernels are compiled and on which device types it failed."""
    return {"enabled": _settings["enabled"], "compiled": sorted(_compiled), "failed": sorted(_failed)}


# ------------------------------------------------------------------------------------------------ kernels
# Each kernel has a plain form (written for the compiler: one expression per output, fused into a single
# loop) and an eager form (in-place operations that reuse buffers, for when no compiler works). ``P`` and
# ``Q`` below are the saved local derivatives dy/da and dy/db.


def _activation_plain(z: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, need_grad: bool):
    if bias is not None:
        z = z + bias
    half = z.shape[-1] // 2
    a, b = z[..., :half], z[..., half:]
    envelope = torch.exp(-b * b)
    y = torch.cos(a) * envelope
    out = y if residual is None else y + residual
    if not need_grad:
        return out, None, None
    return out, -torch.sin(a) * envelope, -2.0 * b * y


def _activation_eager(z: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, need_grad: bool):
    if bias is not None:
        z = z + bias
    half = z.shape[-1] // 2
    a, b = z[..., :half], z[..., half:]
    envelope = torch.mul(b, b).neg_().exp_()
    y = torch.cos(a).mul_(envelope)
    dy_da = dy_db = None
    if need_grad:
        dy_da = torch.sin(a).mul_(envelope).neg_()
        dy_db = torch.mul(b, y, out=envelope).mul_(-2.0)  # the envelope buffer is free again
    out = y if residual is None else y.add_(residual)  # after dy_db, which needs y itself
    return out, dy_da, dy_db


def _first_plain(
    points: torch.Tensor,
    weight_t: torch.Tensor,
    frame_bias: torch.Tensor,
    residual: torch.Tensor | None,
    need_grad: bool,
):
    # the coordinate product has only coord_dim (3) terms: written out, it fuses into the activation loop
    # and the (B, N, 2H) pre-activation is never stored
    z = frame_bias
    for c in range(points.shape[-1]):
        z = z + points[..., c : c + 1] * weight_t[c]
    return _activation_plain(z, None, residual, need_grad)


def _first_eager(
    points: torch.Tensor,
    weight_t: torch.Tensor,
    frame_bias: torch.Tensor,
    residual: torch.Tensor | None,
    need_grad: bool,
):
    z = torch.baddbmm(frame_bias, points, weight_t.expand(points.shape[0], -1, -1))
    return _activation_eager(z, None, residual, need_grad)


def _backward_plain(grad: torch.Tensor, dy_da: torch.Tensor, dy_db: torch.Tensor) -> torch.Tensor:
    return torch.cat([grad * dy_da, grad * dy_db], dim=-1)


def _backward_eager(grad: torch.Tensor, dy_da: torch.Tensor, dy_db: torch.Tensor) -> torch.Tensor:
    half = dy_da.shape[-1]
    out = grad.new_empty(grad.shape[:-1] + (2 * half,))
    torch.mul(grad, dy_da, out=out[..., :half])
    torch.mul(grad, dy_db, out=out[..., half:])
    return out


def _backward_acc_plain(grad: torch.Tensor, through: torch.Tensor, dy_da: torch.Tensor, dy_db: torch.Tensor):
    # gradient of a residual layer's input = skip path + path through the layer; then that layer's dz
    grad = grad + through
    return grad, torch.cat([grad * dy_da, grad * dy_db], dim=-1)


def _backward_acc_eager(grad: torch.Tensor, through: torch.Tensor, dy_da: torch.Tensor, dy_db: torch.Tensor):
    grad = through.add_(grad)  # ``through`` is a fresh product owned by the caller
    return grad, _backward_eager(grad, dy_da, dy_db)


def _compiled_kernel(name: str, plain: Callable, device_type: str) -> Callable:
    key = f"{name}:{device_type}"
    if key not in _compiled:
        # static sizes except the leading (batch, point) dims, marked per call: with a symbolic feature width
        # the compiler cannot prove the two halves' loops equal and splits the kernel into several loops
        _compiled[key] = torch.compile(plain, dynamic=False, fullgraph=True)
    return _compiled[key]


def _mark_rows_dynamic(*tensors: Any) -> None:
    """Let one compiled kernel serve every batch size and point count (no recompiling per chunk size)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for dim in range(t.dim() - 1):
                if t.shape[dim] > 1:
                    torch._dynamo.maybe_mark_dynamic(t, dim)


def _want_compiled(device: torch.device, rows: int, width: int) -> bool:
    """Compile for large enough work on a device where compiling has not failed yet."""
    return (
        bool(_settings["enabled"])
        and device.type not in _failed
        and rows >= MIN_COMPILE_ROWS
        and width >= MIN_COMPILE_WIDTH
        and not torch.compiler.is_compiling()
    )


def _run(name: str, plain: Callable, eager: Callable, compiled: bool, *args: Any):
    """Run the compiled form of a kernel if asked and working, else the eager form (same results)."""
    if compiled:
        device_type = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        if device_type not in _failed:
            try:
                _mark_rows_dynamic(*args)
                return _compiled_kernel(name, plain, device_type)(*args)
            except Exception as err:  # no compiler, no triton, unsupported platform...: stay correct, go eager
                _failed.add(device_type)
                logger.warning(
                    "torch.compile of the Gabor kernels failed on %s (%s: %s); using eager kernels instead.",
                    device_type,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
    return eager(*args)


def _activation(
    compiled: bool, z: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, need_grad: bool
):
    name = "activation_grad" if need_grad else "activation"
    return _run(name, _activation_plain, _activation_eager, compiled, z, bias, residual, need_grad)


def _first(
    compiled: bool,
    points: torch.Tensor,
    weight_t: torch.Tensor,
    frame_bias: torch.Tensor,
    residual: torch.Tensor | None,
    need_grad: bool,
):
    name = "first_grad" if need_grad else "first"
    return _run(name, _first_plain, _first_eager, compiled, points, weight_t, frame_bias, residual, need_grad)


def _backward(compiled: bool, grad: torch.Tensor, dy_da: torch.Tensor, dy_db: torch.Tensor) -> torch.Tensor:
    return _run("backward", _backward_plain, _backward_eager, compiled, grad, dy_da, dy_db)


def _backward_acc(compiled: bool, grad: torch.Tensor, through: torch.Tensor, dy_da: torch.Tensor, dy_db: torch.Tensor):
    return _run("backward_acc", _backward_acc_plain, _backward_acc_eager, compiled, grad, through, dy_da, dy_db)


# ------------------------------------------------------------------------------------------ matrix products

_onednn: dict[str, bool | None] = {"ok": None}


def _onednn_ok() -> bool:
    """Whether oneDNN's fp32 linear kernel runs here and matches ``torch.mm`` (checked once). On the CPUs
    tried it is 15-30% faster than the BLAS behind ``torch.mm`` for the ``(rows, 128) x (128, 256)`` shapes
    of this network; anything unexpected (no oneDNN build, changed private op) falls back to ``torch.mm``."""
    if _onednn["ok"] is None:
        ok = False
        try:
            op = torch.ops.mkldnn._linear_pointwise
            if torch.backends.mkldnn.is_available():
                gen = torch.Generator().manual_seed(0)  # leave the global random stream alone
                a, w = torch.randn(37, 19, generator=gen), torch.randn(23, 19, generator=gen)
                ok = bool(torch.allclose(op(a, w, None, "none", [], ""), a @ w.t(), rtol=1e-4, atol=1e-5))
        except Exception:
            ok = False
        _onednn["ok"] = ok
    return bool(_onednn["ok"])


def _mm_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for 2-D ``x`` and a contiguous ``weight``, through oneDNN for float32 on CPU."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and weight.is_contiguous() and _onednn_ok():
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        except Exception:  # e.g. an input layout the op rejects: the plain product is always right
            pass
    return torch.mm(x, weight.t())


# ----------------------------------------------------------------------------------------------- functions


def once_differentiable(backward: Callable) -> Callable:
    """Mark a hand-written backward as first order only, with an error that says what to do instead
    (autograd runs a backward with grad mode on only for ``create_graph=True``)."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused Gabor fast path is differentiable once (no create_graph=True); build the network "
                "with NISFNet(fast_path=False) (or GaborLayer(fused=False)) for higher-order gradients."
            )
        return backward(ctx, *grads)

    return wrapper


class _GaborActivation(torch.autograd.Function):
    """``y = cos(a) exp(-b^2)`` for a pre-activation ``z = [a | b]`` along the last dim (GaborLayer)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.compiled = _want_compiled(z.device, z[..., 0].numel(), z.shape[-1])
        out, dy_da, dy_db = _activation(ctx.compiled, z, None, None, need_grad=True)
        ctx.save_for_backward(dy_da, dy_db)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        dy_da, dy_db = ctx.saved_tensors
        return _backward(ctx.compiled, grad.contiguous(), dy_da, dy_db)


def _chunks(batch: int, num_points: int, max_rows: int) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, n0, n1)`` blocks of at most ``max_rows`` points, each contiguous in ``(B * N)`` order:
    whole frames together when frames are short, else pieces of one frame."""
    if num_points >= max_rows:
        return [
            (b, b + 1, n, min(n + max_rows, num_points)) for b in range(batch) for n in range(0, num_points, max_rows)
        ]
    frames = max(1, max_rows // max(num_points, 1))
    return [(b, min(b + frames, batch), 0, num_points) for b in range(0, batch, frames)]


class _GaborNetwork(torch.autograd.Function):
    """The whole residual Gabor network, from points to logits, as one autograd node.

    Inputs: points ``(B, N, C)``; the first layer's coordinate weights ``(C, 2H)``, its per-frame bias
    ``(B, 1, 2H)`` (the code's product, computed once per frame by the caller) and residual ``(B, 1, H)``
    (or None); then ``W_l, b_l`` of each hidden layer (stacked and scaled, ``(2H, H)``, ``(2H,)``); then the
    heads' ``(K, H)`` weight and ``(K,)`` bias. Output: logits ``(B * N, K)``.

    Points go through in chunks (see ``CPU_CHUNK_ELEMENTS``), each through every layer before the next;
    the backward pass walks the layers itself, adds each skip gradient inside the next elementwise kernel,
    accumulates weight gradients chunk by chunk and skips those of frozen weights (latent fitting).
    """

    @staticmethod
    def forward(
        ctx: Any,
        points: torch.Tensor,
        weight_t: torch.Tensor,
        frame_bias: torch.Tensor,
        residual: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        logits, saved, chunks, compiled = _network_forward(
            points, weight_t, frame_bias, residual, params, need_grad=True
        )
        ctx.chunks, ctx.compiled, ctx.has_residual = chunks, compiled, residual is not None
        ctx.save_for_backward(points, weight_t, *params, *saved)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logits: torch.Tensor):
        need = ctx.needs_input_grad
        tensors = ctx.saved_tensors
        points, weight_t = tensors[0], tensors[1]
        num_params = len(need) - 4
        params, saved = tensors[2 : 2 + num_params], tensors[2 + num_params :]
        hidden_params, head_w = params[:-2], params[-2]
        num_hidden = len(hidden_params) // 2
        # grad_x = grad_z @ W is a product with W^T as the "weight": transpose each W once, not per chunk
        weights_t = [w.t().contiguous() for w in hidden_params[0::2]]
        per_chunk = 3 + 3 * num_hidden  # dy_da0, dy_db0, hidden inputs and derivatives, last features
        batch, num_points, _ = points.shape
        grad_logits = grad_logits.reshape(batch * num_points, head_w.shape[0])
        compiled = ctx.compiled

        grads: list[torch.Tensor | None] = [None] * num_params
        grad_points = torch.empty_like(points) if need[0] else None
        grad_weight_t = torch.zeros_like(weight_t) if need[1] else None
        grad_frame = points.new_zeros((batch, 1, weight_t.shape[1])) if need[2] else None
        grad_res = points.new_zeros((batch, 1, weight_t.shape[1] // 2)) if ctx.has_residual and need[3] else None

        def accumulate(index: int, value: torch.Tensor) -> None:
            grads[index] = value if grads[index] is None else grads[index].add_(value)

        for c, (b0, b1, n0, n1) in enumerate(ctx.chunks):
            dy_da0, dy_db0, *hidden_saved, features = saved[c * per_chunk : (c + 1) * per_chunk]
            rows = _rows(grad_logits, batch, num_points, b0, b1, n0, n1)
            # heads
            if need[4 + 2 * num_hidden]:
                accumulate(2 * num_hidden, torch.mm(rows.t(), features))
            if need[5 + 2 * num_hidden]:
                accumulate(2 * num_hidden + 1, rows.sum(0))
            grad = torch.mm(rows, head_w)
            # hidden layers, last first
            through = None
            for layer in reversed(range(num_hidden)):
                x, dy_da, dy_db = hidden_saved[3 * layer : 3 * layer + 3]
                if through is None:
                    grad_z = _backward(compiled, grad, dy_da, dy_db)
                else:
                    grad, grad_z = _backward_acc(compiled, grad, through, dy_da, dy_db)
                if need[4 + 2 * layer]:
                    accumulate(2 * layer, torch.mm(grad_z.t(), x))
                if need[5 + 2 * layer]:
                    accumulate(2 * layer + 1, grad_z.sum(0))
                through = _mm_t(grad_z, weights_t[layer])
            if through is not None:
                grad = through.add_(grad)
            # first layer (grad: (rows, H) of its output)
            shape = (b1 - b0, n1 - n0)
            grad = grad.reshape(*shape, grad.shape[-1])
            if grad_res is not None:
                grad_res[b0:b1] += grad.sum(1, keepdim=True)
            if not (need[0] or need[1] or need[2]):
                continue
            grad_z = _backward(compiled, grad, dy_da0, dy_db0)  # (b, n, 2H)
            if grad_frame is not None:
                grad_frame[b0:b1] += grad_z.sum(1, keepdim=True)
            if grad_weight_t is not None:
                grad_weight_t += torch.bmm(points[b0:b1, n0:n1].transpose(1, 2), grad_z).sum(0)
            if grad_points is not None:
                grad_points[b0:b1, n0:n1] = torch.matmul(grad_z, weight_t.t())
        return (grad_points, grad_weight_t, grad_frame, grad_res, *grads)


def _rows(flat: torch.Tensor, batch: int, num_points: int, b0: int, b1: int, n0: int, n1: int) -> torch.Tensor:
    """Rows of a ``(B * N, K)`` tensor that belong to block ``(b0, b1, n0, n1)`` (a contiguous range)."""
    return flat[b0 * num_points + n0 : (b1 - 1) * num_points + n1]


def _network_forward(
    points: torch.Tensor,
    weight_t: torch.Tensor,
    frame_bias: torch.Tensor,
    residual: torch.Tensor | None,
    params: tuple[torch.Tensor, ...] | list[torch.Tensor],
    need_grad: bool,
):
    """Logits ``(B * N, K)``, the tensors the backward pass needs, the chunks and whether compiled."""
    batch, num_points, _ = points.shape
    hidden_params, head_w, head_b = params[:-2], params[-2], params[-1]
    width = weight_t.shape[1]
    rows_total = batch * num_points
    max_rows = max(1, CPU_CHUNK_ELEMENTS // width) if points.device.type == "cpu" else max(1, rows_total)
    chunks = _chunks(batch, num_points, max_rows)
    compiled = _want_compiled(points.device, rows_total, width)
    logits = points.new_empty((rows_total, head_w.shape[0]))
    saved: list[torch.Tensor] = []
    for b0, b1, n0, n1 in chunks:
        res = None if residual is None else residual[b0:b1]
        x, dy_da0, dy_db0 = _first(compiled, points[b0:b1, n0:n1], weight_t, frame_bias[b0:b1], res, need_grad)
        x = x.reshape(-1, width // 2)
        if need_grad:
            saved += [dy_da0, dy_db0]
        for weight, bias in zip(hidden_params[0::2], hidden_params[1::2]):
            out, dy_da, dy_db = _activation(compiled, _mm_t(x, weight), bias, x, need_grad)
            if need_grad:
                saved += [x, dy_da, dy_db]
            x = out
        if need_grad:
            saved.append(x)
        torch.addmm(head_b, x, head_w.t(), out=_rows(logits, batch, num_points, b0, b1, n0, n1))
    return logits, saved, chunks, compiled


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for this device type (False for types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gabor_activation(z: torch.Tensor) -> torch.Tensor:
    """``cos(a) * exp(-b^2)`` of a pre-activation ``z = [a | b]`` whose last dim stacks the already scaled
    frequency and envelope arguments. Differentiable once."""
    if _needs_grad(z):
        return _GaborActivation.apply(z)
    compiled = _want_compiled(z.device, z[..., 0].numel(), z.shape[-1])
    return _activation(compiled, z, None, None, need_grad=False)[0]


def stacked_gabor_weights(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and biases of a GaborLayer's two maps, scaled and stacked into one ``(2H, K)`` map (cheap:
    two small copies per call, and autograd carries the gradients back to the original parameters)."""
    weight = torch.cat([layer.freq.weight * layer.omega0, layer.scale.weight * layer.sigma0])
    bias = torch.cat([layer.freq.bias * layer.omega0, layer.scale.bias * layer.sigma0])
    return weight, bias


def gabor_network(
    layers: torch.nn.ModuleList,
    heads: list[torch.nn.Linear],
    points: torch.Tensor,
    latent: torch.Tensor,
    latent_seeds_residual: bool,
) -> torch.Tensor:
    """Logits ``(B, N, K)`` of the residual Gabor network with the given linear heads (their outputs
    concatenated, ``K`` in all) for points ``(B, N, C)`` and codes ``(B, L)``.

    Same maths as concatenating the code to every point, but the first layer's product with the code is
    computed once per frame (``(B, L) @ (L, 2H)``) instead of once per point, which removes most of that
    layer's work; the per-point part is the ``C``-term product with the coordinates, fused into the first
    activation.
    """
    batch, num_points, coord_dim = points.shape
    points = points.contiguous()  # (B, C, N) inputs arrive transposed; C is tiny, so this copy is cheap
    weight, bias = stacked_gabor_weights(layers[0])
    frame_bias = torch.addmm(bias, latent, weight[:, coord_dim:].t()).unsqueeze(1)  # (B, 1, 2H)
    weight_t = weight[:, :coord_dim].t()  # (C, 2H)
    residual = latent.unsqueeze(1) if latent_seeds_residual else None  # (B, 1, H), broadcast over the points
    params = [t for layer in layers[1:] for t in stacked_gabor_weights(layer)]
    params += [torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads])]
    if _needs_grad(points, weight_t, frame_bias, residual, *params):
        logits = _GaborNetwork.apply(points, weight_t, frame_bias, residual, *params)
    else:
        logits = _network_forward(points, weight_t, frame_bias, residual, params, need_grad=False)[0]
    return logits.reshape(batch, num_points, params[-2].shape[0])
