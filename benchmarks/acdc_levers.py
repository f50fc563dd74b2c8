"""ACDC levers (``acdc.py train``, ``evaluate``, ``steps``, ``qc``, ``report``): train NISF through the bundle's
``train.json`` with a few settings changed, under a CPU budget, then score it on validation frames. Each lever of
the ablation table in ``benchmarks/README.md`` is one such run.

    python benchmarks/acdc.py train --name latent_lr_1e-2 --budget-minutes 20 --set latent_learning_rate=0.01
    python benchmarks/acdc.py evaluate --name latent_lr_1e-2

``train`` counts the budget in process CPU time (all threads; one thread by default, so two runs side by
side use both cores), saves a snapshot of the network and codes every ``--snapshot-minutes`` for the
learning curve, and resumes from ``training_state.pt`` and its record when run again with the same name
(a stopped session loses nothing but the last epoch). ``--set key=value`` overrides any id of
``train.json`` (the value is read as JSON when it parses, else as a string).

``evaluate`` fits codes to the first ``--frames`` validation frames with the frozen network through the
bundle's :class:`~nisf_monai.inferers.LatentOptimisationInferer` (the settings ``inference.json`` would use,
``--set`` overriding the inferer's arguments), records Dice at several latent steps on every voxel, and
writes ``evaluation.json`` beside the run. ``--part test`` reads the test split: do that once per reported
configuration, never to choose settings. ``--snapshot`` scores a snapshot instead of the last model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from acdc_common import (
    CLASSES,
    CONFIGS,
    DATA,
    REPO,
    RESULTS,
    acdc_datalist,
    add_options,
    fit_overrides,
    frames_of,
    parse_overrides,
    require_data,
    steps_of,
    write_record,
)
from ignite.engine import Events
from monai.bundle import ConfigParser

from nisf_monai.classes import STRUCTURES
from nisf_monai.data import load_datalist
from nisf_monai.denormals import flush_denormal
from nisf_monai.handlers import select_step

WORK = RESULTS / "acdc_levers"


def run_overrides(record: dict) -> dict:
    """The config overrides a run was trained with. Runs from before ``heart_reference_volume_ml`` existed were
    trained in world millimetres, so they get None rather than today's default."""
    return {"heart_reference_volume_ml": None, **record.get("overrides", {})}


def locator_override(args: argparse.Namespace, reference_volume_ml: float | None = None) -> dict:
    """The inferer's ``heart_locator`` starting from ``--localiser`` weights (a coarse segmentation network's
    labels, poses scaled to ``reference_volume_ml`` as the network was trained), as ``inference.json`` builds
    it; nothing without ``--localiser``."""
    if not getattr(args, "localiser", ""):
        return {}
    weights = Path(args.localiser).resolve()
    if not weights.is_file():
        sys.exit(f"no localiser weights at {weights}")
    channels = [int(c) for c in args.localiser_channels.split(",")]
    localiser = f"{str(weights)!r}, 4, 'cpu', {args.localiser_mm}, {channels}, {args.localiser_res_units}"
    rotations = [float(a) for a in args.localiser_rotations.split(",")]
    zooms = [float(z) for z in args.localiser_zooms.split(",")]
    localiser += f", {reference_volume_ml}, {rotations}, {zooms}"
    return {
        "heart_locator": {
            "_target_": "nisf_monai.inferers.HeartLocator",
            "refine_steps": args.refine_steps,
            "localiser": f"$nisf_monai.inferers.load_localiser({localiser})",
        }
    }


def train(args: argparse.Namespace) -> None:
    root = WORK / args.name
    (root / "snapshots").mkdir(parents=True, exist_ok=True)
    record_path = root / "record.json"
    record = (
        json.loads(record_path.read_text())
        if record_path.is_file()
        else {"cpu_s": 0.0, "iterations": 0, "snapshots": []}
    )
    overrides = parse_overrides(args.set)
    if record_path.is_file():  # resuming: what the run was trained with so far, unless --set changes it
        overrides = run_overrides(record) | overrides
    torch.set_num_threads(args.threads)
    datalist = acdc_datalist(WORK, args.parts, args.data)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {
            "bundle_root": str(root),
            "datalist": datalist,
            "max_epochs": 100000,
            "resume": True,
            "val_interval": 0,
            **overrides,
        }
    )
    record["overrides"] = overrides | {
        "heart_reference_volume_ml": parser.get_parsed_content("heart_reference_volume_ml")
    }
    trainer = parser.get_parsed_content("train#trainer")
    network, latents = parser.get_parsed_content("network"), parser.get_parsed_content("train#latents")
    cpu_start, cpu_before = time.process_time(), float(record["cpu_s"])
    budget = args.budget_minutes * 60.0
    every = args.snapshot_minutes * 60.0

    def cpu_now() -> float:
        return cpu_before + time.process_time() - cpu_start

    def save_record() -> None:
        record["cpu_s"], record["threads"] = cpu_now(), args.threads
        record_path.write_text(json.dumps(record, indent=2))

    @trainer.on(Events.ITERATION_COMPLETED)
    def account(engine) -> None:
        record["iterations"] += 1
        if engine.state.iteration % 50 == 0:
            out = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
            print(
                f"{args.name}: iteration {record['iterations']}, {cpu_now() / 60:.1f} CPU-min, "
                f"dice loss {float(out['dice']):.3f}, intensity bce {float(out['bce_intensity']):.4f}",
                flush=True,
            )
        taken = {s["cpu_minutes"] for s in record["snapshots"]}
        mark = int(cpu_now() // every * args.snapshot_minutes)
        if mark > 0 and mark not in taken:
            path = root / "snapshots" / f"model_{mark:04d}min.pt"
            torch.save({"network": network.state_dict(), "latents": latents.state_dict()}, path)
            record["snapshots"].append(
                {"cpu_minutes": mark, "iteration": record["iterations"], "path": str(path.relative_to(root))}
            )
            save_record()
        if cpu_now() >= budget:
            engine.terminate()

    @trainer.on(Events.EPOCH_COMPLETED)
    def keep(_) -> None:
        save_record()

    trainer.run()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    torch.save({"network": network.state_dict(), "latents": latents.state_dict()}, root / "snapshots" / "final.pt")
    save_record()
    print(f"{args.name}: {record['iterations']} iterations in {record['cpu_s'] / 60:.1f} CPU-min", flush=True)


def evaluate(args: argparse.Namespace) -> dict:
    from acdc_fit import evaluate_cases  # beside this script

    root = WORK / args.name
    torch.set_num_threads(args.threads)
    datalist = acdc_datalist(WORK, "split", args.data)
    cases = frames_of(datalist, args.part, args.frames, args.offset)
    train_record = json.loads((root / "record.json").read_text())
    overrides = run_overrides(train_record)
    checkpoint = root / "snapshots" / args.snapshot if args.snapshot else root / "snapshots" / "final.pt"
    steps = steps_of(args.steps)
    inferer_overrides = parse_overrides(args.set) | locator_override(args, overrides["heart_reference_volume_ml"])
    start = time.perf_counter()
    with flush_denormal():
        result = evaluate_cases(
            checkpoint,
            cases,
            datalist,
            steps,
            config_overrides=overrides,
            inferer_overrides=inferer_overrides,
            objective=args.objective,
            pose=args.pose,
            blends=tuple(float(w) for w in args.blend.split(",") if w),
            largest_component=args.largest_component,
        )
    result.update(
        {
            "name": args.name,
            "part": args.part,
            "checkpoint": str(checkpoint.name),
            "seconds": time.perf_counter() - start,
            "train_cpu_minutes": train_record["cpu_s"] / 60,
            "train_iterations": train_record["iterations"],
        }
    )
    out = write_record(
        root / f"evaluation_{args.part}_{args.objective}_{args.pose}_{checkpoint.stem}{args.tag}.json", result
    )
    print(f"{args.name} ({args.part}, {args.objective}, {checkpoint.name}): mean Dice by step")
    for step, dice in zip(result["steps"], result["mean_dice"]):
        per_class = " ".join(f"{c} {d:.3f}" for c, d in zip(CLASSES, result["class_dice"][result["steps"].index(step)]))
        print(f"  step {step:4d}: {dice:.3f}  ({per_class})")
    for weight, blended in result.get("blends", {}).items():
        print(f"  blended with the localiser, weight {weight}: " + " ".join(f"{d:.3f}" for d in blended["mean_dice"]))
    for weight, cleaned in result.get("blends_largest_component", {}).items():
        print(f"  largest components kept, weight {weight}: " + " ".join(f"{d:.3f}" for d in cleaned["mean_dice"]))
    if result.get("pose_errors"):
        errors = result["pose_errors"]
        print(
            f"  estimated pose vs labels: origin {errors['median_origin_mm']:.1f} mm "
            f"(median; max {max(errors['origin_mm']):.1f}), "
            f"angle {errors['median_angle_deg']:.1f} deg (median; max {max(errors['angle_deg']):.1f})"
        )
    print(f"written {out}")
    return result


def quality_reference(args: argparse.Namespace) -> None:
    """``qc_reference.json`` for a run's final model (or ``--snapshot``): its training codes, and the reconstruction
    errors and code distances of ``--frames`` of its training frames refitted from zero as inference fits them."""
    from nisf_monai.data import case_ids
    from nisf_monai.handlers import qc_reference
    from nisf_monai.networks import LatentTable

    root = WORK / args.name
    torch.set_num_threads(args.threads)
    record = json.loads((root / "record.json").read_text())
    datalist = str(WORK / ("datalist_final.json" if (WORK / "datalist_final.json").is_file() else "datalist.json"))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    overrides = run_overrides(record)
    parser.update({"datalist": datalist, **overrides})
    for key, value in fit_overrides(
        {
            "num_steps": args.steps,
            "log_every": 0,
            **parse_overrides(args.set),
            **locator_override(args, overrides["heart_reference_volume_ml"]),
        }
    ).items():
        parser[f"validate#inferer#{key}"] = value
    saved = torch.load(root / "snapshots" / (args.snapshot or "final.pt"), map_location="cpu", weights_only=False)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(saved["network"])
    network.eval()
    training = load_datalist(datalist, "training")
    key = parser.get_parsed_content("latent_key")  # the cine model's codes are its subjects'
    table = LatentTable(case_ids(training, key), network.latent_dim)
    table.load_state_dict(saved["latents"])
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    picks = training[:: max(1, len(training) // args.frames)][: args.frames]
    if key == "subject":  # whole subjects, fitted as inference fits them
        chosen = {case["subject"] for case in picks}
        picks = [case for case in training if case["subject"] in chosen]
    images = [preprocessing(dict(case))["image"] for case in picks]
    with flush_denormal():
        reference = qc_reference(
            parser.get_parsed_content("validate#inferer"),
            network,
            images,
            table.weight.detach(),
            parser.get_parsed_content("label_names"),
            own_rows=table.rows(case_ids(picks, key)).tolist(),
            groups=case_ids(picks, key) if key == "subject" else None,
        )
    reference["cases"] = case_ids(picks)
    out = Path(args.output)
    out.write_text(json.dumps(reference))
    print(
        f"reconstruction error {np.round(reference['reconstruction_error'], 4).tolist()}, nearest-code distance "
        f"{np.round(reference['nearest_training_code_distance'], 3).tolist()}; written {out}"
    )


def report(args: argparse.Namespace) -> None:
    """The ablation table (markdown, best step per run) and the learning curve PNG of ``--curve`` runs."""
    rows = [
        "| run | changes from train.json | training CPU-min | iterations | validation Dice at step 0 | best step | "
        "validation Dice (LV / Myo / RV) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for root in sorted(p for p in WORK.iterdir() if (p / "record.json").is_file()):
        record = json.loads((root / "record.json").read_text())
        for path in sorted(root.glob(f"evaluation_validation_*{args.checkpoint}*.json")):
            result = json.loads(path.read_text())
            best = int(np.nanargmax(result["mean_dice"]))
            label = root.name + (
                "" if path.stem.endswith(args.checkpoint) else f" ({path.stem.split(args.checkpoint)[-1].strip('_')})"
            )
            changes = ", ".join(f"{k}={v}" for k, v in record.get("overrides", {}).items())
            objective = "" if result["objective"] == "intensity" else f" [{result['objective']} fit]"
            rows.append(
                f"| {label}{objective} | {changes} | "
                f"{result['train_cpu_minutes']:.0f} | {result['train_iterations']} | "
                f"{result['mean_dice'][0]:.3f} | {result['steps'][best]} | **{result['mean_dice'][best]:.3f}** "
                f"({' / '.join(f'{d:.2f}' for d in result['class_dice'][best])}) |"
            )
    print("\n".join(rows))
    for name in args.curve:
        root = WORK / name
        points = []
        for path in root.glob(f"evaluation_validation_intensity_*{args.curve_tag}.json"):
            result = json.loads(path.read_text())
            if "_model_" not in path.stem and "_final" not in path.stem:
                continue
            minutes = (
                int(path.stem.split("model_")[1][:4]) if "_model_" in path.stem else round(result["train_cpu_minutes"])
            )
            points.append((minutes, max(result["mean_dice"]), result["mean_dice"][0]))
        if not points:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        points.sort()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="after the latent fit (best step)")
        ax.plot([p[0] for p in points], [p[2] for p in points], "s--", label="zero code (step 0)")
        ax.set_xlabel("training CPU-minutes")
        ax.set_ylabel("validation mean Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"ACDC learning curve: {name}{args.curve_tag}")
        fig.tight_layout()
        out = REPO / "benchmarks" / f"learning_curve_{name}{args.curve_tag.replace('.', 'p')}.png"
        fig.savefig(out, dpi=110)
        print(f"learning curve: {out}")


def add_localiser_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--localiser", default="", help="localiser weights (train_localiser.json) seeding the pose")
    parser.add_argument(
        "--refine-steps", type=int, default=50, help="pose refinement steps after the localiser (0: as is)"
    )
    parser.add_argument(
        "--localiser-mm", type=float, default=2.0, help="in-plane spacing the localiser was trained at (v2: 4)"
    )
    parser.add_argument(
        "--localiser-channels",
        default="16,32,64,128,256",
        help="the localiser UNet's channels per level (v2-v4: 16,...,128)",
    )
    parser.add_argument(
        "--localiser-res-units", type=int, default=2, help="the localiser UNet's residual units (v2-v4: 1)"
    )
    parser.add_argument(
        "--localiser-rotations",
        default="0",
        help="comma-separated in-plane angles (radians) the localiser also predicts each slice at, averaged",
    )
    parser.add_argument(
        "--localiser-zooms",
        default="1",
        help="comma-separated factors of the localiser's spacing it also predicts each slice at, averaged",
    )


def select_inference_steps(args: argparse.Namespace) -> dict:
    """``inference_steps.json`` from validation evaluations (several files pool their frames): the fewest steps
    whose mean Dice is within ``--tolerance`` of the best, since each step costs inference time."""
    evaluations = [json.loads(Path(f).read_text()) for f in args.evaluations]
    if any(e["part"] == "test" for e in evaluations):
        sys.exit("inference steps are chosen on validation frames, never on the test split")
    steps = evaluations[0]["steps"]
    if any(e["steps"] != steps for e in evaluations):
        sys.exit("the evaluations recorded different steps; pool only evaluations with the same --steps")
    per_case = np.concatenate([[e["per_case"][str(s)] for s in steps] for e in evaluations], axis=1)  # (S, N, C)
    _, curve = select_step(steps, per_case.transpose(1, 0, 2))  # the mean curve as StepSelectionHandler makes it
    with np.errstate(invalid="ignore"):
        per_class = np.nanmean(per_case, axis=1)  # (S, C)
    chosen = min(s for s, d in zip(steps, curve) if d >= np.nanmax(curve) - args.tolerance)
    record = {
        "inference_steps": int(chosen),
        "mean_dice_at_best": float(curve[steps.index(chosen)]),
        "num_cases": int(per_case.shape[1]),
        "steps": steps,
        "mean_dice": curve.tolist(),
        "per_class_dice": {name: per_class[:, c].tolist() for c, name in enumerate(STRUCTURES)},
        "selected_on": args.selected_on,
        "evaluations": [Path(f).name for f in args.evaluations],
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    best = float(np.nanmax(curve))
    print(f"{chosen} steps (mean Dice {record['mean_dice_at_best']:.4f}, best {best:.4f}); written {args.output}")
    return record


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(
        prog="acdc.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run under a CPU budget")
    t.add_argument("--name", required=True)
    t.add_argument("--budget-minutes", type=float, default=20.0, help="training CPU-minutes (process CPU time)")
    t.add_argument("--snapshot-minutes", type=float, default=5.0)
    t.add_argument("--parts", choices=("split", "final"), default="split", help="final: train on training + validation")
    add_options(t, "data", "threads", "set")
    e = sub.add_parser("evaluate", help="Dice per latent step of a trained run")
    e.add_argument("--name", required=True)
    e.add_argument("--part", default="validation", choices=("validation", "test", "training"))
    add_options(e, "data", "frames", "offset", "steps", "tag", "threads", "set", frames=10)
    e.add_argument(
        "--objective",
        default="intensity",
        choices=("intensity", "segmentation", "trained", "localiser"),
        help="segmentation: fit codes to the labels (the latent space's ceiling); trained: the training codes; "
        "localiser: the --localiser network's own labels",
    )
    e.add_argument(
        "--pose",
        default="label",
        choices=("label", "estimate"),
        help="heart-frame models: pose from the labels (oracle) or estimated by the inferer",
    )
    add_localiser_arguments(e)
    e.add_argument("--snapshot", default="", help="snapshot file name (default: the final model)")
    e.add_argument(
        "--blend",
        default="",
        help="comma-separated weights w of the localiser's probabilities mixed with NISF's, (1-w) NISF + w localiser, "
        "each scored at every step beside NISF alone",
    )
    e.add_argument(
        "--largest-component",
        action="store_true",
        help="score every --blend weight also after keeping each structure's largest connected component",
    )
    q = sub.add_parser("qc", help="qc_reference.json of a trained run")
    q.add_argument("--name", required=True)
    add_options(q, "frames", "threads", "set", frames=8)
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--output", default=str(REPO / "bundle" / "models" / "qc_reference.json"))
    q.add_argument("--snapshot", default="", help="snapshot file name (default: the final model)")
    add_localiser_arguments(q)
    r = sub.add_parser("report", help="a table and learning curves from the evaluation records")
    r.add_argument("--checkpoint", default="final", help="which evaluations make the table (file-name part)")
    r.add_argument("--curve", action="append", default=[], help="runs whose snapshot evaluations make a learning curve")
    r.add_argument("--curve-tag", default="", help="only evaluations whose file name ends with this tag make the curve")
    st = sub.add_parser("steps", help="write inference_steps.json from validation evaluations")
    st.add_argument("evaluations", nargs="+", help="evaluation_validation_*.json files (their frames are pooled)")
    st.add_argument("--tolerance", type=float, default=0.005, help="fewest steps within this of the best mean Dice")
    st.add_argument("--output", default=str(REPO / "bundle" / "models" / "inference_steps.json"))
    st.add_argument("--selected-on", default="", help="what the evaluations were: recorded in the file")
    args = ap.parse_args(argv)
    if args.command == "steps":
        return select_inference_steps(args)
    if args.command == "report":
        report(args)
        return None
    require_data(getattr(args, "data", DATA))
    if args.command == "train":
        return train(args)
    if args.command == "qc":
        return quality_reference(args)
    return evaluate(args)


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
