"""Inference speed and memory of NISF on the CPU: latent fitting of ACDC-sized volumes, batched against one
at a time, and peak memory of writing a segmentation at 1 mm and 0.5 mm, streamed against in memory.

Everything that is compared is measured side by side in one run, interleaved, and reported as medians and
ratios (the machine is shared; absolute times drift):

- ``volume``: time for one ACDC-sized frame to run the bundle's latent optimisation for the selected step
  count (``bundle/models/inference_steps.json``), and the time to sample its segmentation on the input grid,
  for the package network and, per step, for the eager reference network of ``throughput.py``.
- ``batched``: ``--cases`` frames fitted one after the other against the same frames fitted as one batch
  (``LatentOptimisationInferer.fit`` on a list: one batched forward per step), same steps; cases/s ratio.
- ``memory``: in a fresh subprocess per variant, the peak resident memory (``ru_maxrss``) above the
  process's baseline when writing the labels and reconstruction of one ACDC-sized frame at 1 mm and at
  0.5 mm isotropic, with ``stream_sampled_grid`` (slab by slab) and with ``sample`` + MONAI ``SaveImage``
  (whole volume in memory). A small network is used here: memory is about the output grid, not the network.

Frames: ACDC test patients from ``../shared/data/acdc`` when present (patient number 4 mod 5), else
synthetic frames on ACDC's typical grid (216 x 256 x 10 at 1.5 x 1.5 x 10 mm).

Run: ``python benchmarks/inference.py`` (about 10 minutes; ``--help``), or as part of ``throughput.py --part all``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nisf_monai.handlers import selected_inference_steps
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.networks import NISFNet
from nisf_monai.spatial import voxel_sizes

ROOT = Path(__file__).resolve().parents[1]
ACDC = ROOT.parent / "shared" / "data" / "acdc"


def load_frames(count: int, seed: int = 0) -> tuple[list, str]:
    """``count`` intensity-scaled frames ``(1, X, Y, Z)`` MetaTensors (ACDC test frames, else synthetic)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, ScaleIntensityRangePercentiles

    if (ACDC / "datalist.json").exists():
        frames = json.loads((ACDC / "datalist.json").read_text())["frames"]
        test = sorted((f for f in frames if int(f["patient"][-3:]) % 5 == 4), key=lambda f: f["id"])[:count]
        load = Compose(
            [
                LoadImage(image_only=True),
                EnsureChannelFirst(),
                ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True),
            ]
        )
        return [load(str(ACDC / f["image"])) for f in test], "ACDC test frames " + ", ".join(f["id"] for f in test)
    from monai.data import MetaTensor

    generator = torch.Generator().manual_seed(seed)
    affine = torch.diag(torch.tensor([1.5, 1.5, 10.0, 1.0], dtype=torch.float64))
    return [
        MetaTensor(torch.rand(1, 216, 256, 10, generator=generator), affine=affine) for _ in range(count)
    ], "synthetic 216x256x10 frames"


def trained_network(fast_path: bool = True) -> NISFNet:
    network = NISFNet(fast_path=fast_path)
    state = torch.load(ROOT / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_volume(args: argparse.Namespace, frames: list) -> dict:
    steps = args.steps or selected_inference_steps(ROOT / "bundle" / "models", default=200)
    package, eager = trained_network(True), trained_network(False)
    frame = frames[0][None]
    fit = LatentOptimisationInferer(num_steps=steps, log_every=0)
    per_step = LatentOptimisationInferer(num_steps=args.step_probe, log_every=0)
    fit.fit(frame, package)  # warm-up (torch.compile of the kernels)
    fits, samples, step_package, step_eager = [], [], [], []
    grid = fit.frame_of(frame)
    for _ in range(args.inference_repeats):
        start = time.perf_counter()
        latent = fit.fit(frame, package)
        fits.append(time.perf_counter() - start)
        start = time.perf_counter()
        fit.sample(package, latent, grid, grid.affine, frame.shape[2:])
        samples.append(time.perf_counter() - start)
        step_package.append(timed(lambda: per_step.fit(frame, package)) / args.step_probe)
        step_eager.append(timed(lambda: per_step.fit(frame, eager)) / args.step_probe)
    med = statistics.median
    return {
        "steps": steps,
        "num_points": fit.num_points,
        "voxels": int(np.prod(frame.shape[2:])),
        "fit_seconds": med(fits),
        "sample_seconds": med(samples),
        "total_seconds": med(fits) + med(samples),
        "seconds_per_step": {"package": med(step_package), "eager": med(step_eager)},
        "step_speedup_over_eager": med(e / p for e, p in zip(step_eager, step_package)),
        "projected_seconds_for_672_steps": 672 * med(step_package) + med(samples),
        "spread": {"fit": [min(fits), max(fits)], "sample": [min(samples), max(samples)]},
    }


def bench_batched(args: argparse.Namespace, frames: list) -> dict:
    package = trained_network(True)
    inferer = LatentOptimisationInferer(num_steps=args.batched_steps, log_every=0)
    cases = [f for f in frames[: args.cases]]
    inferer.fit(cases[:2], package)  # warm-up
    one, batch = [], []
    for _ in range(args.inference_repeats):
        one.append(timed(lambda: [inferer.fit([case], package) for case in cases]))
        batch.append(timed(lambda: inferer.fit(cases, package)))
    return {
        "cases": len(cases),
        "steps": args.batched_steps,
        "one_at_a_time_seconds": statistics.median(one),
        "batched_seconds": statistics.median(batch),
        "cases_per_second": {
            "one_at_a_time": len(cases) / statistics.median(one),
            "batched": len(cases) / statistics.median(batch),
        },
        "batched_speedup": statistics.median(o / b for o, b in zip(one, batch)),
    }


MEMORY_CHILD = r"""
import json, resource, sys, tempfile
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImage
from nisf_monai.inferers import LatentOptimisationInferer, target_grid
from nisf_monai.inferers.streaming import stream_sampled_grid
from nisf_monai.networks import NISFNet

mode, spacing, shape, pixdim = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
torch.manual_seed(0)
network = NISFNet(latent_dim=16, hidden_dim=16, num_layers=2).eval()
image = MetaTensor(torch.zeros(1, 1, *shape), affine=torch.diag(torch.tensor(pixdim + [1.0], dtype=torch.float64)))
inferer = LatentOptimisationInferer(num_steps=0)
latent = torch.zeros(1, 16)
frame = inferer.frame_of(image)
affine, out_shape = target_grid(frame.affine, shape, spacing)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as folder:
    if mode == "streamed":
        stream_sampled_grid(
            inferer, network, latent, frame, affine, out_shape, folder + "/case_seg.nii", folder + "/case_recon.nii"
        )
    else:
        labels, recon = inferer.sample(network, latent, frame, affine, out_shape)
        meta = {"affine": torch.as_tensor(affine), "filename_or_obj": "case"}
        save = dict(output_dir=folder, output_ext=".nii", separate_folder=False, resample=False, print_log=False)
        SaveImage(output_postfix="seg", **save)(MetaTensor(labels[0], meta=meta))
        SaveImage(output_postfix="recon", **save)(MetaTensor(recon[0], meta=meta))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
voxels = int(torch.tensor(out_shape).prod())
print(json.dumps({"voxels": voxels, "shape": out_shape, "peak_above_baseline_mb": (peak - baseline) / 1024}))
"""


def bench_memory(args: argparse.Namespace, frames: list) -> dict:
    shape = [int(s) for s in frames[0].shape[1:]]
    pixdim = [float(v) for v in voxel_sizes(frames[0].affine)]
    results = {}
    for spacing in args.spacings:
        for mode in ("streamed", "in_memory"):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", MEMORY_CHILD, mode, str(spacing), json.dumps(shape), json.dumps(pixdim)],
                capture_output=True,
                text=True,
                check=True,
            )
            record = json.loads(done.stdout.strip().splitlines()[-1])
            record["seconds"] = time.perf_counter() - start
            results[f"{mode}@{spacing}mm"] = record
    return {"input_shape": shape, "input_spacing_mm": pixdim, "runs": results}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, default=0, help="latent steps for `volume` (0: the bundle's selected count)"
    )
    parser.add_argument(
        "--step-probe", dest="step_probe", type=int, default=10, help="steps timed per repeat for seconds/step"
    )
    parser.add_argument("--cases", type=int, default=8, help="frames for `batched`")
    parser.add_argument("--batched-steps", dest="batched_steps", type=int, default=10)
    parser.add_argument(
        "--spacings", type=float, nargs="+", default=[1.0, 0.5], help="output spacings (mm) for `memory`"
    )
    parser.add_argument(
        "--inference-repeats",
        dest="inference_repeats",
        type=int,
        default=3,
        help="interleaved repetitions of `volume` and `batched`",
    )
    parser.add_argument(
        "--parts", nargs="+", default=["volume", "batched", "memory"], choices=["volume", "batched", "memory"]
    )


def run(args: argparse.Namespace) -> dict:
    frames, source = load_frames(max(args.cases, 1))
    result: dict = {
        "frames": source,
        "threads": torch.get_num_threads(),
        "load_average_1min_before": os.getloadavg()[0],
    }
    if "volume" in args.parts:
        result["volume"] = bench_volume(args, frames)
    if "batched" in args.parts:
        result["batched"] = bench_batched(args, frames)
    if "memory" in args.parts:
        result["memory"] = bench_memory(args, frames)
    result["load_average_1min_after"] = os.getloadavg()[0]
    report(result)
    return result


def report(result: dict) -> None:
    print(
        f"NISF inference on {result['frames']}; {result['threads']} threads; load average "
        f"{result['load_average_1min_before']:.1f} -> {result['load_average_1min_after']:.1f}"
    )
    if "volume" in result:
        v = result["volume"]
        print(
            f"one frame ({v['voxels']:,} voxels), {v['steps']} latent steps x {v['num_points']} points: "
            f"fit {v['fit_seconds']:.1f} s + sample {v['sample_seconds']:.1f} s = {v['total_seconds']:.1f} s; "
            f"per step {v['seconds_per_step']['package'] * 1e3:.0f} ms "
            f"(eager {v['seconds_per_step']['eager'] * 1e3:.0f} ms, {v['step_speedup_over_eager']:.2f}x); "
            f"672 steps (paper): {v['projected_seconds_for_672_steps']:.0f} s projected"
        )
    if "batched" in result:
        b = result["batched"]
        print(
            f"{b['cases']} frames x {b['steps']} steps: one at a time {b['one_at_a_time_seconds']:.1f} s, "
            f"batched {b['batched_seconds']:.1f} s "
            f"-> {b['batched_speedup']:.2f}x cases/s"
        )
    if "memory" in result:
        print(f"{'output':<22}{'voxels':>14}{'peak MB':>10}{'seconds':>9}")
        for name, r in result["memory"]["runs"].items():
            print(f"{name:<22}{r['voxels']:>14,}{r['peak_above_baseline_mb']:>10.0f}{r['seconds']:>9.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
