"""Training and latent-fitting throughput of NISFNet, side by side with a plain eager implementation and
with the machine's own matrix-product rate, all measured in ONE run.

Why side by side: the machine is shared, so absolute times drift by 2x within minutes. Every repetition runs
each variant once in turn (A, B, C, A, B, C, ...) and the report uses medians, so slow spells hit all
variants alike and the ratios stay meaningful.

What is measured (per repetition):

- ``train``: one training step (forward + backward + Adam step on the network and on per-frame codes) for
  a batch of ``--batch`` frames x ``--points`` points, for the package's ``NISFNet`` and for ``EagerNISF``,
  the same network written the obvious way (``nn.Linear`` + ``torch.cos * torch.exp``, the code at HEAD
  before the fast path), loaded with the same weights;
- ``latent``: one latent-fitting step (gradient wrt the codes only, via ``torch.autograd.grad``, network
  frozen, Adam on the codes), package vs eager;
- ``matmul``: every float32 matrix product of one training step of this MLP on the MLP's own shapes
  (forward ``(B*N) x in @ in x out``, then the input and weight gradients), giving GFLOP/s and from it the
  arithmetic limit in points/s: ``rate / flops_per_point`` with ``6 * in * out`` FLOPs per ``Linear`` and
  point (2 forward, 4 backward).

Run: ``python benchmarks/throughput.py`` (about 2 minutes with the defaults; ``--help`` for options).
``--inference`` adds the inference measurements of ``inference.py`` (latent fitting of ACDC-sized volumes,
batched against one at a time, peak memory of streamed against in-memory output) to the same run and JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nisf_monai.denormals import flush_denormal, set_flush_denormal
from nisf_monai.networks import NISFNet, fused

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference  # noqa: E402  (benchmarks/inference.py, next to this file)


class EagerGabor(nn.Module):
    """``cos(omega0 (W_f x + b_f)) * exp(-(sigma0 (W_s x + b_s))^2)`` with two ``nn.Linear`` and autograd."""

    def __init__(self, in_features: int, out_features: int, omega0: float, sigma0: float) -> None:
        super().__init__()
        self.omega0, self.sigma0 = omega0, sigma0
        self.freq = nn.Linear(in_features, out_features)
        self.scale = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        envelope = self.sigma0 * self.scale(x)
        return torch.cos(self.omega0 * self.freq(x)) * torch.exp(-envelope * envelope)


class EagerNISF(nn.Module):
    """The reference: NISFNet as written at HEAD before the fast path (same state_dict keys)."""

    def __init__(
        self,
        coord_dim: int,
        latent_dim: int,
        num_classes: int,
        hidden_dim: int,
        num_layers: int,
        omega0: float = 10.0,
        sigma0: float = 10.0,
    ) -> None:
        super().__init__()
        self.latent_seeds_residual = latent_dim == hidden_dim
        self.num_classes = num_classes
        self.layers = nn.ModuleList(
            [
                EagerGabor(coord_dim + latent_dim if i == 0 else hidden_dim, hidden_dim, omega0, sigma0)
                for i in range(num_layers)
            ]
        )
        self.seg_head = nn.Linear(hidden_dim, num_classes)
        self.intensity_head = nn.Linear(hidden_dim, 1)

    def forward_heads(self, coords: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, spatial = coords.shape[0], list(coords.shape[2:])
        points = coords.reshape(batch, coords.shape[1], -1).transpose(1, 2)
        code = latent[:, None, :].expand(-1, points.shape[1], -1)
        x = torch.cat([points, code], dim=-1)
        for i, layer in enumerate(self.layers):
            if i == 0:
                x = layer(x) + code if self.latent_seeds_residual else layer(x)
            else:
                x = layer(x) + x
        seg = self.seg_head(x).transpose(1, 2).reshape([batch, self.num_classes] + spatial)
        intensity = self.intensity_head(x).transpose(1, 2).reshape([batch, 1] + spatial)
        return seg, intensity


def linear_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(in, out) of every Linear of the MLP, counted as the eager network computes it."""
    first = [(args.coord_dim + args.latent_dim, args.hidden_dim)] * 2
    hidden = [(args.hidden_dim, args.hidden_dim)] * (2 * (args.layers - 1))
    return first + hidden + [(args.hidden_dim, args.classes), (args.hidden_dim, 1)]


def package_flops(args: argparse.Namespace, weight_grads: bool = True) -> int:
    """FLOPs per point of the package's products: its first layer multiplies the code once per frame, so
    per point only the coordinate columns remain (no input gradient needed there)."""
    two_h = 2 * args.hidden_dim
    first = 2 * args.coord_dim * two_h * (2 if weight_grads else 1)
    hidden = flops_per_point([(args.hidden_dim, args.hidden_dim)] * (2 * (args.layers - 1)), weight_grads=weight_grads)
    heads = flops_per_point([(args.hidden_dim, args.classes + 1)], weight_grads=weight_grads)
    return first + hidden + heads


def flops_per_point(shapes: list[tuple[int, int]], backward: bool = True, weight_grads: bool = True) -> int:
    """Forward 2*in*out per Linear; backward adds 2*in*out for the input grad and 2*in*out for the weight
    grad."""
    per = 2 + (2 if backward else 0) + (2 if backward and weight_grads else 0)
    return sum(per * i * o for i, o in shapes)


class MatmulProbe:
    """Every float32 product of one training step of the MLP on preallocated inputs, so its rate is what
    the hardware and the library give on exactly these shapes.

    ``route="blas"`` uses ``torch.mm`` (MKL or OpenBLAS, what ``nn.Linear`` uses); ``route="onednn"`` runs
    the forward and input-gradient products through oneDNN's linear kernel, as the package does where it
    is faster (weight gradients stay on ``torch.mm`` in both). The faster route sets the arithmetic limit.
    """

    def __init__(self, rows: int, shapes: list[tuple[int, int]], route: str = "blas") -> None:
        self.ops: list[Callable[[], torch.Tensor]] = []
        self.flops = 0
        linear = torch.ops.mkldnn._linear_pointwise if route == "onednn" else None
        for n_in, n_out in shapes:
            x, w, gy = torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(rows, n_out)
            w_t = w.t().contiguous()
            y, gx, gw = torch.empty(rows, n_out), torch.empty(rows, n_in), torch.empty(n_out, n_in)
            if linear is None:
                self.ops += [
                    lambda x=x, w=w, y=y: torch.mm(x, w.t(), out=y),
                    lambda gy=gy, w=w, gx=gx: torch.mm(gy, w, out=gx),
                ]
            else:
                self.ops += [
                    lambda x=x, w=w: linear(x, w, None, "none", [], ""),
                    lambda gy=gy, w_t=w_t: linear(gy, w_t, None, "none", [], ""),
                ]
            self.ops.append(lambda gy=gy, x=x, gw=gw: torch.mm(gy.t(), x, out=gw))
            self.flops += 6 * rows * n_in * n_out

    def __call__(self) -> None:
        for op in self.ops:
            op()


def onednn_available() -> bool:
    try:
        a = torch.randn(8, 4)
        return bool(
            torch.allclose(torch.ops.mkldnn._linear_pointwise(a, a, None, "none", [], ""), a @ a.t(), atol=1e-5)
        )
    except Exception:
        return False


def bf16_autocast_accuracy(args: argparse.Namespace) -> dict[str, float]:
    """How far bf16 autocast moves the eager network's outputs and code gradients from float32 (the package
    runs the plain maths under autocast, so this is what autocast would give either way)."""
    torch.manual_seed(args.seed + 2)
    ref = EagerNISF(args.coord_dim, args.latent_dim, args.classes, args.hidden_dim, args.layers)
    coords = torch.rand(2, args.coord_dim, min(args.points, 8192)) - 0.5
    codes = torch.randn(2, args.latent_dim) * 0.01
    out = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        latent = codes.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            seg, intensity = ref.forward_heads(coords, latent)
        (grad,) = torch.autograd.grad(intensity.float().square().mean(), [latent])
        out[name] = (seg.detach().float(), grad)
    (seg32, g32), (seg16, g16) = out["fp32"], out["bf16"]
    return {
        "seg_max_abs_err_over_max": float((seg16 - seg32).abs().max() / seg32.abs().max()),
        "argmax_agreement": float((seg16.argmax(1) == seg32.argmax(1)).float().mean()),
        "latent_grad_cosine": float(F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)),
    }


def make_step_fns(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One closure per variant; each runs one full step."""
    torch.manual_seed(args.seed)
    net = NISFNet(args.coord_dim, args.latent_dim, args.classes, args.hidden_dim, args.layers)
    if args.weights:  # a trained network: its activations reach the subnormal range far more than random weights
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    ref = EagerNISF(args.coord_dim, args.latent_dim, args.classes, args.hidden_dim, args.layers)
    ref.load_state_dict(net.state_dict())
    coords = torch.rand(args.batch, args.coord_dim, args.points) - 0.5
    labels = torch.randint(args.classes, (args.batch, args.points))
    target = torch.rand(args.batch, 1, args.points)
    init_codes = torch.randn(args.batch, args.latent_dim) * 0.01

    def loss_of(seg: torch.Tensor, intensity: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return (
            F.cross_entropy(seg, labels)
            + F.binary_cross_entropy_with_logits(intensity, target)
            + 1e-4 * codes.square().mean()
        )

    def trainer(model: nn.Module) -> Callable[[], None]:
        codes = nn.Parameter(init_codes.clone())
        optimizer = torch.optim.Adam([*model.parameters(), codes], lr=1e-5)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            seg, intensity = model.forward_heads(coords, codes)
            loss_of(seg, intensity, codes).backward()
            optimizer.step()

        return step

    def latent_fitter(model: nn.Module) -> Callable[[], None]:
        model.requires_grad_(False)  # frozen network, as in inference
        codes = init_codes.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([codes], lr=1e-3)

        def step() -> None:
            _, intensity = model.forward_heads(coords, codes)
            loss = F.binary_cross_entropy_with_logits(intensity, target) + 1e-4 * codes.square().mean()
            (grad,) = torch.autograd.grad(loss, [codes])
            codes.grad = grad
            optimizer.step()

        return step

    net_frozen, ref_frozen = copy.deepcopy(net), copy.deepcopy(ref)
    net_subnormal, net_frozen_subnormal = copy.deepcopy(net), copy.deepcopy(net_frozen)
    return {
        "train/package": trainer(net),
        "train/eager": trainer(ref),
        "train/subnormals": with_subnormals(trainer(net_subnormal)),
        "latent/package": latent_fitter(net_frozen),
        "latent/eager": latent_fitter(ref_frozen),
        "latent/subnormals": with_subnormals(latent_fitter(net_frozen_subnormal)),
    }


def with_subnormals(step: Callable[[], None]) -> Callable[[], None]:
    """The step with subnormal floats computed as such (the CPU's default), inside a run that flushes them as
    the bundle does: the "before" of the flush."""

    def run() -> None:
        set_flush_denormal(False)
        try:
            step()
        finally:
            set_flush_denormal(True)

    return run


def agreement(args: argparse.Namespace) -> dict[str, float]:
    """Largest differences between package and eager outputs and code gradients on the same weights."""
    torch.manual_seed(args.seed + 1)
    net = NISFNet(args.coord_dim, args.latent_dim, args.classes, args.hidden_dim, args.layers)
    ref = EagerNISF(args.coord_dim, args.latent_dim, args.classes, args.hidden_dim, args.layers)
    ref.load_state_dict(net.state_dict())
    coords = torch.rand(args.batch, args.coord_dim, min(args.points, 4096)) - 0.5
    init_codes = torch.randn(args.batch, args.latent_dim) * 0.01
    result = {}
    grads = []
    for model in (net, ref):
        codes = init_codes.clone().requires_grad_(True)
        seg, intensity = model.forward_heads(coords, codes)
        (grad,) = torch.autograd.grad(seg.square().mean() + intensity.square().mean(), [codes])
        grads.append((seg.detach(), grad))
    (seg_a, g_a), (seg_b, g_b) = grads
    result["max_abs_diff_seg"] = float((seg_a - seg_b).abs().max())
    result["max_abs_seg"] = float(seg_b.abs().max())
    result["rel_diff_latent_grad"] = float((g_a - g_b).abs().max() / g_b.abs().max())
    return result


def measure(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved: A, B, C, ..., A, B, C, ..."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numer: list[float], denom: list[float]) -> float:
    """Median over repetitions of numer[i] / denom[i] (same repetition, so the same machine load)."""
    return statistics.median(n / d for n, d in zip(numer, denom, strict=True))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4, help="frames per step (each with its own code)")
    parser.add_argument("--points", type=int, default=8192, help="points per frame")
    parser.add_argument("--latent-dim", dest="latent_dim", type=int, default=128)
    parser.add_argument("--hidden-dim", dest="hidden_dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--coord-dim", dest="coord_dim", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (includes torch.compile)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager kernels in the package")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights", default="", help="state_dict of a trained NISFNet of these sizes (default: random init)"
    )
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "throughput.json"))
    parser.add_argument("--inference", action="store_true", help="also run the inference benchmarks (inference.py)")
    inference.add_arguments(parser)
    return parser.parse_args(argv)


def time_variants(
    args: argparse.Namespace, rows: int, shapes: list
) -> tuple[dict[str, list[float]], MatmulProbe, tuple, float]:
    """Times of every variant's step (``measure``), the BLAS matmul probe, the load average before and the wall
    time."""
    fns = make_step_fns(args)
    probe = MatmulProbe(rows, shapes)
    fns["matmul/blas"] = probe
    if onednn_available():
        fns["matmul/onednn"] = MatmulProbe(rows, shapes, route="onednn")
    load_before = os.getloadavg()
    start = time.perf_counter()
    with flush_denormal():  # as the bundle runs; the "subnormals" variants switch it off for their own steps
        times = measure(fns, args.repeats, args.warmup)
    return times, probe, load_before, time.perf_counter() - start


def benchmark(args: argparse.Namespace) -> dict:
    """Time every variant, set the times against the matmul rate's arithmetic limit, and check the variants agree."""
    rows = args.batch * args.points
    shapes = linear_shapes(args)
    train_flops, latent_flops = flops_per_point(shapes), flops_per_point(shapes, weight_grads=False)
    times, probe, load_before, wall = time_variants(args, rows, shapes)
    med = {name: statistics.median(t) for name, t in times.items()}
    rates = {name.split("/")[1]: probe.flops / med[name] / 1e9 for name in med if name.startswith("matmul/")}
    best = min((name for name in med if name.startswith("matmul/")), key=lambda name: med[name])
    times["matmul"], med["matmul"] = times[best], med[best]

    gflops = probe.flops / med["matmul"] / 1e9
    limit_train = gflops * 1e9 / train_flops
    limit_latent = gflops * 1e9 / latent_flops
    pts = {name: rows / med[name] for name in med if not name.startswith("matmul")}
    # package / limit per repetition (the limit from that repetition's matmul probe, under the same load):
    # (rows / t_step) / (probe_flops / t_probe / flops_per_point)
    of_limit_paired = {
        task: paired_ratio(times["matmul"], times[f"{task}/package"]) * rows * flops / probe.flops
        for task, flops in (("train", train_flops), ("latent", latent_flops))
    }
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "compile": fused.compile_state(),
        "agreement": agreement(args),
        "bf16_autocast_accuracy": bf16_autocast_accuracy(args),
        "rows_per_step": rows,
        "flops_per_point": {"train": train_flops, "latent": latent_flops},
        "flops_per_point_package": {"train": package_flops(args), "latent": package_flops(args, weight_grads=False)},
        "median_seconds": med,
        "points_per_second": pts,
        "matmul_gflops": gflops,
        "matmul_gflops_by_route": rates,
        "arithmetic_limit_points_per_second": {"train": limit_train, "latent": limit_latent},
        "ratios": ratios(times, med, pts, limit_train, limit_latent, of_limit_paired),
        "spread": {name: [min(t), max(t)] for name, t in times.items()},
        "wall_seconds": wall,
    }
    return result


def ratios(times: dict, med: dict, pts: dict, limit_train: float, limit_latent: float, of_limit_paired: dict) -> dict:
    """The package against the eager network and against the arithmetic limit, and flushed against subnormal steps."""
    return {
        "train_package_over_eager": med["train/eager"] / med["train/package"],
        "train_package_over_eager_paired": paired_ratio(times["train/eager"], times["train/package"]),
        "train_package_over_limit": pts["train/package"] / limit_train,
        "train_package_over_limit_paired": of_limit_paired["train"],
        "train_eager_over_limit": pts["train/eager"] / limit_train,
        "latent_package_over_eager": med["latent/eager"] / med["latent/package"],
        "latent_package_over_eager_paired": paired_ratio(times["latent/eager"], times["latent/package"]),
        "latent_package_over_limit": pts["latent/package"] / limit_latent,
        "latent_package_over_limit_paired": of_limit_paired["latent"],
        "latent_eager_over_limit": pts["latent/eager"] / limit_latent,
        "train_flushed_over_subnormals_paired": paired_ratio(times["train/subnormals"], times["train/package"]),
        "latent_flushed_over_subnormals_paired": paired_ratio(times["latent/subnormals"], times["latent/package"]),
    }


def print_report(args: argparse.Namespace, result: dict) -> None:
    """The table and the ratios of ``result`` on stdout."""
    med, pts, r = result["median_seconds"], result["points_per_second"], result["ratios"]
    gflops, rates = result["matmul_gflops"], result["matmul_gflops_by_route"]
    train_flops, latent_flops = result["flops_per_point"]["train"], result["flops_per_point"]["latent"]
    limit_train = result["arithmetic_limit_points_per_second"]["train"]
    limit_latent = result["arithmetic_limit_points_per_second"]["latent"]
    load_before, wall = result["load_average_1min"]["before"], result["wall_seconds"]
    print(
        f"NISFNet throughput: {args.batch} frames x {args.points} points, {args.layers} x {args.hidden_dim} Gabor, "
        f"latent {args.latent_dim}; {torch.get_num_threads()} threads, {args.repeats} interleaved repeats; "
        f"compile {'on' if args.compile else 'off'} {result['compile']['compiled'] or ''}"
    )
    print(
        f"matmul rate on the MLP's shapes: {gflops:.1f} GFLOP/s ("
        + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        + f"); FLOPs/point: train {train_flops / 1e6:.3f} M, latent {latent_flops / 1e6:.3f} M; "
        f"load average {load_before:.1f} -> {result['load_average_1min']['after']:.1f}"
    )
    print(f"{'step':<8}{'variant':<10}{'points/s':>12}{'median ms':>11}{'vs eager':>10}{'vs limit':>10}")
    for task, limit in (("train", limit_train), ("latent", limit_latent)):
        for variant in ("eager", "package"):
            name = f"{task}/{variant}"
            vs_eager = med[f"{task}/eager"] / med[name]
            print(
                f"{task:<8}{variant:<10}{pts[name]:>12,.0f}{med[name] * 1e3:>11.1f}{vs_eager:>9.2f}x"
                f"{pts[name] / limit:>9.0%}"
            )
        print(f"{task:<8}{'limit':<10}{limit:>12,.0f}")
    print(
        f"paired ratios (median over repeats): train {r['train_package_over_eager_paired']:.2f}x eager, "
        f"latent {r['latent_package_over_eager_paired']:.2f}x eager, "
        f"train {r['train_package_over_limit_paired']:.0%} of limit"
    )
    for task in ("train", "latent"):
        print(
            f"subnormals flushed ({task}): {pts[f'{task}/package']:,.0f} points/s vs {pts[f'{task}/subnormals']:,.0f} "
            f"computed as subnormals: {r[f'{task}_flushed_over_subnormals_paired']:.2f}x (paired)"
        )
    agree = result["agreement"]
    print(
        f"agreement: max |seg diff| {agree['max_abs_diff_seg']:.2e} (max |seg| {agree['max_abs_seg']:.2f}), "
        f"latent grad rel diff {agree['rel_diff_latent_grad']:.2e}; wall {wall:.0f} s"
    )
    bf16 = result["bf16_autocast_accuracy"]
    print(
        f"bf16 autocast vs float32 (eager): seg error {bf16['seg_max_abs_err_over_max']:.1%} of max |seg|, "
        f"argmax agreement {bf16['argmax_agreement']:.1%}, code-gradient cosine {bf16['latent_grad_cosine']:.2f}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fused.set_compile(args.compile)
    result = benchmark(args)
    print_report(args, result)

    if args.inference:
        result["inference"] = inference.run(args)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
