"""How the clinical measures should read a fitted frame (``acdc.py measure-variants``): several readings compared
from one latent fit per frame.

On the ACDC patients of one part of the data README's split (tune on ``validation``), fits a code to each ED and ES
frame once, as the ``measuring`` run does (``inference.json`` + ``measure.json``), and reads the same fit several
ways:

- ``code``: the code alone on the fine grid (``measure_spacing``), argmax volumes (the measuring run's default);
- ``code_soft``: the same probabilities summed (``volume_mode: probability``);
- ``blend``: the localiser's probabilities mixed in as inference writes them (``measure_blend``), fine grid;
- ``blend_soft``: the same, summed probabilities;
- ``written``: the blend on the acquired grid with each structure's largest component kept, i.e. the disc sums of
  the segmentation ``run inference`` writes;
- ``code_acquired``: the code alone on the acquired grid (disc sums), which separates what the fine grid adds
  between the slices from what the code itself predicts;
- ``code_myo<d>`` (``--myo-offsets``): the code alone on the fine grid with the myocardium's log-probability
  lowered by ``d`` before the argmax, a calibration of its wall thickness; each frame's Dice on the acquired grid
  (code alone, with and without the offset) is recorded beside it.

Each reading's LV / RV volumes, ejection fractions and LV mass are compared with the manual labels' disc sums
(MAE, bias, r). Prints a table and writes ``measure_variants.json`` (per frame volumes too) to --work-dir.

    python benchmarks/acdc.py measure-variants --part validation --model M.pt --localiser L.pt --work-dir OUT
    python benchmarks/acdc.py measure-variants ... --offset 5 --limit 5        # half the patients (two processes)
    python benchmarks/acdc.py measure-variants --combine OUT_A OUT_B --work-dir OUT
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from acdc_common import CONFIGS, REPO, RESULTS, add_options, command_parser, dice_of, inference_config, require_data
from acdc_measures import test_datalist
from monai.transforms import KeepLargestConnectedComponent

from nisf_monai.classes import LABELS
from nisf_monai.geometry import NetworkField, load_weights, measure_frame
from nisf_monai.geometry.measures import agreement_table, cardiac_measures, class_volumes
from nisf_monai.io import json_safe
from nisf_monai.spatial import affine_array, voxel_volume_ml
from nisf_monai.transforms import world_grid

SHOWN = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_edv_ml", "rv_ef_pct", "lv_mass_g")
logger = logging.getLogger("measure_variants")


def lowered_myocardium(probs: torch.Tensor, offset: float) -> torch.Tensor:
    """Class probabilities ``(M, ...)`` with the myocardium's scaled by ``exp(-offset)`` (argmax use only)."""
    scaled = probs.clone()
    scaled[LABELS["lv_myocardium"]] *= math.exp(-offset)
    return scaled


def label_dice(probs: np.ndarray | torch.Tensor, label: np.ndarray) -> list[float]:
    """LV, Myo, RV Dice of the argmax of ``probs`` ``(M, X, Y, Z)`` (``acdc_common.dice_of``, MONAI's DiceMetric)."""
    return dice_of(torch.as_tensor(probs).argmax(0), torch.as_tensor(label)).tolist()


def read_frame(
    parser,
    network: torch.nn.Module,
    image,
    label: np.ndarray,
    spacing: float,
    myo_offsets: tuple[float, ...] = (),
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Every reading's structure volumes (ml) of one frame, from one fit of its code and one fine read of it (the
    blend mixes the localiser into those probabilities as ``inferer.sample`` does), and the code's Dice on the
    acquired grid with each myocardium offset."""
    inferer = parser.get_parsed_content("inferer")
    affine, shape = affine_array(image), list(image.shape[1:])
    latent = inferer.fit([image], network)[0]
    case = image[None]  # made after the fit, so that it carries the heart pose the fit stored in the image's meta
    frame, blend = inferer.frame_of(case), inferer.blend_source(case)
    fine = measure_frame(NetworkField(network, inferer, latent, frame), affine, shape, spacing)
    if fine.probabilities is None:
        raise RuntimeError("the code found no heart in this frame: nothing to compare")
    code = torch.as_tensor(fine.probabilities)
    world = world_grid(fine.affine, fine.roi_shape)
    mixed = inferer.blended(code.reshape(1, code.shape[0], -1), blend, world).reshape(code.shape)
    voxel_ml = voxel_volume_ml(fine.affine)
    volumes = {}
    for name, probs in (("code", code), ("blend", mixed)):
        volumes[name] = class_volumes(probs.numpy(), voxel_ml, mode="label")
        volumes[f"{name}_soft"] = class_volumes(probs.numpy(), voxel_ml, mode="probability")
    acquired, _ = NetworkField(network, inferer, latent, frame, blend).sample(affine, shape)
    labels = torch.as_tensor(acquired.argmax(axis=0))[None]
    cleaned = KeepLargestConnectedComponent(applied_labels=[1, 2, 3], independent=True)(labels)
    volumes["written"] = class_volumes(np.asarray(cleaned)[0], voxel_volume_ml(affine))
    code_acquired, _ = NetworkField(network, inferer, latent, frame).sample(affine, shape)
    volumes["code_acquired"] = class_volumes(code_acquired, voxel_volume_ml(affine), mode="label")
    dice = {"code_acquired": label_dice(code_acquired, label)}
    for offset in myo_offsets:
        volumes[f"code_myo{offset:g}"] = class_volumes(lowered_myocardium(code, offset).numpy(), voxel_ml)
        lowered = lowered_myocardium(torch.as_tensor(code_acquired), offset)
        dice[f"code_acquired_myo{offset:g}"] = label_dice(lowered, label)
    return volumes, dice


def agreement_of(frames: list[dict]) -> dict[str, dict]:
    """Per reading, the agreement of the patients' measures (ED / ES from the datalist) with the manual ones."""
    by_subject: dict[str, dict[str, dict]] = defaultdict(dict)
    for f in frames:
        by_subject[f["subject"]][f["phase"]] = f
    paired = {s: p for s, p in by_subject.items() if "ED" in p and "ES" in p}
    manual = {s: cardiac_measures(p["ED"]["manual"], p["ES"]["manual"]) for s, p in paired.items()}
    return {
        reading: agreement_table(
            {s: cardiac_measures(p["ED"][reading], p["ES"][reading]) for s, p in paired.items()}, manual, SHOWN
        )
        for reading in frames[0]
        if reading not in ("subject", "case", "phase", "manual", "dice")
    }


def print_table(table: dict[str, dict], patients: int) -> None:
    print(f"{patients} patients: MAE / bias (r) per reading")
    print("reading".ljust(12) + "".join(m.ljust(22) for m in SHOWN))
    for reading, rows in table.items():
        cells = [f"{rows[m]['mae']:.1f} / {rows[m]['bias']:+.1f} ({rows[m]['pearson_r']:.2f})" for m in SHOWN]
        print(reading.ljust(12) + "".join(c.ljust(22) for c in cells))


def write_summary(frames: list[dict], out: Path, extra: dict) -> None:
    table = agreement_of(frames)
    patients = len({f["subject"] for f in frames})
    dice = {k: np.nanmean([f["dice"][k] for f in frames], axis=0).tolist() for k in frames[0].get("dice", {})}
    out.mkdir(parents=True, exist_ok=True)
    summary = {**extra, "patients": patients, "agreement": table, "dice_mean": dice, "frames": frames}
    (out / "measure_variants.json").write_text(json.dumps(json_safe(summary), indent=2))
    print_table(table, patients)
    for reading, (lv, myo, rv) in dice.items():
        print(f"Dice {reading}: LV {lv:.3f} Myo {myo:.3f} RV {rv:.3f} mean {(lv + myo + rv) / 3:.3f}")
    print(f"written {out / 'measure_variants.json'}")


def main(argv: list[str] | None = None) -> None:
    ap = command_parser("measure-variants", __doc__)
    add_options(ap, "data", "work_dir", "offset", "threads", work_dir=str(RESULTS / "measure_variants"))
    ap.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    ap.add_argument("--localiser", default=str(REPO / "bundle" / "models" / "localiser.pt"))
    ap.add_argument("--part", choices=("validation", "test"), default="validation")
    ap.add_argument("--inference-steps", type=int, default=200)
    ap.add_argument("--spacing", type=float, default=1.0, help="fine spacing in mm")
    ap.add_argument(
        "--myo-offsets", default="", help="comma-separated myocardium log-probability offsets to try, e.g. 0.5,1,2"
    )
    ap.add_argument("--limit", type=int, default=0, help="only the first N patients")
    ap.add_argument("--combine", nargs="+", default=[], metavar="WORK_DIR", help="only merge earlier runs' frames")
    args = ap.parse_args(argv)
    out = Path(args.work_dir)
    if args.combine:
        runs = [json.loads((Path(d) / "measure_variants.json").read_text()) for d in args.combine]
        frames = [f for run in runs for f in run["frames"]]
        write_summary(frames, out, {"combined": args.combine})
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    require_data(args.data)
    offsets = tuple(float(v) for v in args.myo_offsets.split(",") if v)
    datalist = test_datalist(Path(args.data), out / "datalist.json", args.limit, args.offset, args.part)
    parser = inference_config(
        {
            "datalist_file": datalist,
            "section": "test",
            "ckpt_dir": str(Path(args.model).parent),
            "localiser_path": args.localiser,
            "inference_steps": args.inference_steps,
            "device": "cpu",
        },
        str(CONFIGS / "measure.json"),
    )
    network = load_weights(parser.get_parsed_content("network"), args.model)
    preprocessing = parser.get_parsed_content("preprocessing")
    entries = json.loads(Path(datalist).read_text())["test"]
    frames, start = [], time.perf_counter()
    for entry in entries:
        item = preprocessing(dict(entry))
        label = np.asarray(item["label"])[0]
        volumes, dice = read_frame(parser, network, item["image"], label, args.spacing, offsets)
        volumes["manual"] = class_volumes(label, voxel_volume_ml(affine_array(item["image"])))
        frames.append(
            {"subject": entry["subject"], "case": entry["case"], "phase": entry["phase"], **volumes, "dice": dice}
        )
        logger.info("%s: %s", entry["case"], {k: round(v["lv_myocardium"], 1) for k, v in volumes.items()})
    write_summary(
        frames,
        out,
        {
            "part": args.part,
            "model": args.model,
            "localiser": args.localiser,
            "inference_steps": args.inference_steps,
            "spacing_mm": args.spacing,
            "seconds": time.perf_counter() - start,
        },
    )


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
