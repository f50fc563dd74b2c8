"""Does NISF start learning ACDC? Short training runs that differ only in how training points are drawn and in
the network's learning rate, each scored by fitting codes to a few validation frames.

Why: in ACDC's field of view about 98% of voxels are background, so with uniformly drawn points the
segmentation head sees a few dozen heart points per frame; the 12-minute ACDC benchmark with uniform points
learned nothing. This script isolates the two levers (``RandPointSampled(foreground_fraction=...)`` and the
learning rate) at a fixed number of iterations.

Run one setting per process (they can run side by side, one thread each):

    python benchmarks/acdc_sampling.py --name fg50_lr1e3 --foreground-fraction 0.5 --learning-rate 1e-3

Writes ``benchmarks/results/acdc_sampling/<name>/result.json`` (training Dice-loss curve, validation Dice).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from nisf_monai.data import build_datalist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--foreground-fraction", type=float, default=0.0)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--val-frames", type=int, default=4, help="first validation frames scored")
    ap.add_argument("--val-steps", type=int, default=150, help="latent steps per validation frame")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--work-dir", default=str(REPO / "benchmarks" / "results" / "acdc_sampling"))
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        sys.exit(f"ACDC data not found at {args.data}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.work_dir) / args.name
    (root / "models").mkdir(parents=True, exist_ok=True)
    datalist = build_datalist(args.data, str(Path(args.work_dir) / "datalist.json"))

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {
            "bundle_root": str(root),
            "datalist": datalist,
            "max_epochs": 100000,
            "resume": False,
            "learning_rate": args.learning_rate,
            "foreground_fraction": args.foreground_fraction,
            "val_interval": 0,
        }
    )
    trainer = parser.get_parsed_content("train#trainer")
    dice_loss: list[float] = []
    start = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine) -> None:
        output = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        dice_loss.append(float(output["dice"]))
        if engine.state.iteration % 50 == 0:
            print(
                f"{args.name} iteration {engine.state.iteration}: Dice loss (last 50) {np.mean(dice_loss[-50:]):.4f}",
                flush=True,
            )
        if engine.state.iteration >= args.iterations:
            engine.terminate()

    trainer.run()
    train_s = time.perf_counter() - start
    torch.save(parser.get_parsed_content("network").state_dict(), root / "models" / "model.pt")

    evaluation = ConfigParser()
    evaluation.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json")])
    evaluation.update(
        {
            "bundle_root": str(root),
            "datalist_file": datalist,
            "section": "validation",
            "output_dir": str(root / "eval"),
            "inference_steps": args.val_steps,
            "num_points": 4096,
            "batch_size": 4,
        }
    )
    evaluation["datalist"] = f"$nisf_monai.data.load_datalist({datalist!r}, 'validation')[:{args.val_frames}]"
    evaluator = evaluation.get_parsed_content("evaluator")
    evaluator.run()
    result = {
        "settings": vars(args),
        "train_seconds": train_s,
        "dice_loss_every_50": [float(np.mean(dice_loss[i : i + 50])) for i in range(0, len(dice_loss), 50)],
        "validation_dice": {k: float(v) for k, v in evaluator.state.metrics.items()},
    }
    (root / "result.json").write_text(json.dumps(result, indent=2))
    print(args.name, "validation", {k: round(v, 3) for k, v in result["validation_dice"].items()}, flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
