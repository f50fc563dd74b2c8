"""Does the quality check predict failure? Calibration of the QC score on ACDC frames, clean and degraded on purpose.

Subcommands (each writes into ``--work``, default ``benchmarks/results/qc``):

- ``prepare --split val|test``: the split's frames as given (``<split>/clean``) and a degraded copy of each
  (``<split>/degraded``; validation: two degradations per frame, test: one), with each frame's manual labels in
  the bundle's classes (``<split>/labels``) and ``<split>/manifest.json``. Degradations, seeded: MONAI's Rician
  noise, bias field, Gibbs ringing, k-space spike, an inverted contrast, a crop through the heart, the stack
  resliced into another plane, and images of other anatomy (a 3D Shepp-Logan head phantom, Dice taken as 0).
- ``rigid --split val --frames 4 --turns 5``: the first frames again under random rigid affines (same voxels,
  the affine turned about and shifted from the frame's centre), for the invariance check.
- ``infer --split S --part clean|degraded|rigid``: ``python -m monai.bundle run inference`` on that folder exactly
  as a user runs it (one thread), outputs in ``<split>/out_<part>``.
- ``collect --split S``: per frame, the written segmentation's Dice against the labels and every QC signal from
  ``<name>_qc.json``, into ``<split>/cases.json``.
- ``fit``: the linear QC score fitted on the validation cases (clean + degraded) and its limit; written into
  ``bundle/models/qc_reference.json`` under ``"score"`` and into ``qc_score_fit.json``.
- ``report --split S``: rank correlation of the score with Dice, how often it warns below 0.75 and at 0.85 or
  above, and (``--part rigid``) the verdicts and label agreement under the rigid affines; prints a table, writes
  ``<split>/report.json``.

Split: ACDC patients 4 mod 5 (test), 2 mod 10 (validation), as every ACDC benchmark here. Run the test split's
``report`` once, after ``fit``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from acdc_common import DATA as ACDC  # noqa: E402
from acdc_common import data_frames  # noqa: E402

KINDS = ["noise", "bias", "gibbs", "spike", "inverted", "crop", "resliced", "anatomy"]
FAIL_BELOW, GOOD_FROM = 0.75, 0.85


def split_frames(split: str) -> list[dict]:
    """The ``val`` or ``test`` frames of the data's split, sorted by frame id."""
    return data_frames({"val": "validation", "test": "test"}[split], ACDC)


def bundle_labels(path: Path) -> np.ndarray:
    """An ACDC label file in the bundle's classes (ACDC: 1 RV, 2 myocardium, 3 LV; bundle: 1 LV, 2 myocardium, 3 RV)."""
    from monai.transforms import MapLabelValue

    from nisf_monai.data import ACDC_LABEL_MAPPING

    acdc = np.asarray(nib.load(str(path)).dataobj).astype(np.int64)
    mapped = MapLabelValue(list(ACDC_LABEL_MAPPING), list(ACDC_LABEL_MAPPING.values()), dtype=np.uint8)(acdc)
    return np.asarray(mapped)


def _unit(volume: np.ndarray) -> np.ndarray:
    low, high = np.percentile(volume, [0.5, 99.5])
    return np.clip((volume - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def degrade(kind: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, rng: np.random.Generator):
    """``(image, label or None, affine, setting)`` of one degraded frame; intensities in [0, 1]."""
    import monai.transforms as mt

    x = _unit(image)[None]
    if kind == "noise":
        std = float(rng.uniform(0.15, 0.3))
        noisy = mt.RandRicianNoise(prob=1.0, std=std, relative=False, sample_std=False)
        noisy.set_random_state(int(rng.integers(1 << 31)))
        return noisy(x)[0].numpy(), label, affine, {"std": std}
    if kind == "bias":
        coeff = float(rng.uniform(0.3, 0.6))
        field = mt.RandBiasField(degree=3, coeff_range=(coeff, coeff), prob=1.0)
        field.set_random_state(int(rng.integers(1 << 31)))
        return np.asarray(field(x))[0], label, affine, {"coeff": coeff}
    if kind == "gibbs":
        alpha = float(rng.uniform(0.9, 0.98))
        return np.asarray(mt.GibbsNoise(alpha=alpha)(x))[0], label, affine, {"alpha": alpha}
    if kind == "spike":
        where = tuple(int(rng.integers(s // 2 - 12, s // 2 + 12)) for s in x.shape[1:3])
        spiked = [
            np.asarray(mt.KSpaceSpikeNoise(loc=(0, *where, z), k_intensity=14.0)(x))[0, ..., z]
            for z in range(x.shape[-1])
        ]
        return np.stack(spiked, axis=-1), label, affine, {"loc": list(where), "k_intensity": 14.0}
    if kind == "inverted":
        return 1.0 - x[0], label, affine, {}
    if kind == "crop":  # keep one side of the heart's centre in x: part of the heart is cut off
        centre = int(np.round(np.argwhere(label > 0)[:, 0].mean())) if (label > 0).any() else x.shape[1] // 2
        keep_low = bool(rng.integers(2))
        cut = slice(0, centre + 8) if keep_low else slice(max(centre - 8, 0), x.shape[1])
        moved = affine.copy()
        moved[:3, 3] = affine[:3, :3] @ np.array([cut.start, 0, 0]) + affine[:3, 3]
        return x[0, cut], label[cut], moved, {"x_from": cut.start, "x_to": cut.stop}
    if kind == "resliced":  # the same world geometry, sliced along the first in-plane axis
        order = (2, 1, 0)
        moved = affine.copy()
        moved[:3, :3] = affine[:3, list(order)]
        return np.transpose(x[0], order).copy(), np.transpose(label, order).copy(), moved, {"axes": list(order)}
    if kind == "anatomy":
        from skimage.data import shepp_logan_phantom
        from skimage.transform import resize

        slice2d = resize(shepp_logan_phantom(), x.shape[1:3], anti_aliasing=True)
        depth = np.abs(np.linspace(-1, 1, x.shape[3]))
        volume = np.stack([slice2d * (1.0 - 0.6 * d**2) for d in depth], axis=-1)
        volume = volume + rng.normal(0, 0.02, volume.shape)
        return np.clip(volume, 0, 1).astype(np.float32), None, affine, {"phantom": "shepp_logan"}
    raise ValueError(kind)


def _save(path: Path, array: np.ndarray, affine: np.ndarray, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), affine), str(path))


def prepare(args: argparse.Namespace) -> None:
    base = Path(args.work) / args.split
    rng = np.random.default_rng(args.seed)
    manifest = {}
    per_frame = 2 if args.split == "val" else 1
    for i, frame in enumerate(split_frames(args.split)):
        img = nib.load(str(ACDC / frame["image"]))
        image, affine = np.asarray(img.dataobj).astype(np.float32), img.affine
        label = bundle_labels(ACDC / frame["label"])
        _save(base / "clean" / f"{frame['id']}.nii.gz", image, affine, np.float32)
        _save(base / "labels" / f"{frame['id']}.nii.gz", label, affine, np.uint8)
        manifest[frame["id"]] = {"part": "clean", "kind": "none", "label": f"labels/{frame['id']}.nii.gz"}
        for j in range(per_frame):
            kind = KINDS[(i * per_frame + j + args.offset) % len(KINDS)]
            moved_image, moved_label, moved_affine, setting = degrade(kind, image, label, affine, rng)
            name = f"{frame['id']}_{kind}"
            _save(base / "degraded" / f"{name}.nii.gz", moved_image, moved_affine, np.float32)
            entry = {"part": "degraded", "kind": kind, "setting": setting, "label": None}
            if moved_label is not None:
                _save(base / "labels" / f"{name}.nii.gz", moved_label, moved_affine, np.uint8)
                entry["label"] = f"labels/{name}.nii.gz"
            manifest[name] = entry
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(manifest)} frames in {base}")


def random_rigid(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A random proper rotation (any axis, any angle) about ``centre`` followed by a shift of up to 100 mm."""
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )
    moved = np.eye(4)
    moved[:3, :3] = rotation
    moved[:3, 3] = centre - rotation @ centre + rng.uniform(-100, 100, 3)
    return moved


def rigid(args: argparse.Namespace) -> None:
    base = Path(args.work) / args.split
    manifest = json.loads((base / "manifest.json").read_text())
    rng = np.random.default_rng(args.seed + 1)
    for frame in split_frames(args.split)[: args.frames]:
        img = nib.load(str(ACDC / frame["image"]))
        centre = img.affine[:3, :3] @ (np.array(img.shape[:3]) / 2.0) + img.affine[:3, 3]
        for t in range(args.turns):
            turn = random_rigid(rng, centre)
            name = f"{frame['id']}_rigid{t}"
            _save(base / "rigid" / f"{name}.nii.gz", np.asarray(img.dataobj), turn @ img.affine, np.float32)
            manifest[name] = {"part": "rigid", "kind": "rigid", "of": frame["id"], "turn": turn.tolist(), "label": None}
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1))


def infer(args: argparse.Namespace) -> None:
    base = Path(args.work) / args.split
    out = base / f"out_{args.part}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file"]
    command += [str(ROOT / "bundle/configs/inference.json"), "--bundle_root", str(ROOT / "bundle")]
    command += ["--dataset_dir", str(base / args.part), "--output_dir", str(out)]
    start = time.time()
    subprocess.run(command, env=env, check=True)
    (out / "run.json").write_text(json.dumps({"command": command, "wall_s": time.time() - start}, indent=1))


def dice(pred: np.ndarray, truth: np.ndarray | None) -> list[float]:
    if truth is None:
        return [0.0, 0.0, 0.0]
    found = []
    for c in (1, 2, 3):
        a, b = pred == c, truth == c
        total = a.sum() + b.sum()
        found.append(1.0 if total == 0 else float(2 * (a & b).sum() / total))
    return found


def collect(args: argparse.Namespace) -> None:
    base = Path(args.work) / args.split
    manifest = json.loads((base / "manifest.json").read_text())
    cases = {}
    for name, entry in manifest.items():
        out = base / f"out_{entry['part']}"
        seg_path, qc_path = out / f"{name}_seg.nii.gz", out / f"{name}_qc.json"
        if not qc_path.exists():
            continue
        pred = np.asarray(nib.load(str(seg_path)).dataobj)
        truth = bundle_labels_of(base, entry)
        qc = json.loads(qc_path.read_text())
        per_class = dice(pred, truth)
        cases[name] = {
            **entry,
            "dice": per_class,
            "mean_dice": float(np.mean(per_class)),
            "signals": qc["signals"],
            "verdict": qc.get("verdict"),
            "warnings": qc.get("warnings", []),
            "predicted_dice": qc.get("predicted_dice"),
        }
    (base / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(cases)} of {len(manifest)} frames collected into {base / 'cases.json'}")


def bundle_labels_of(base: Path, entry: dict) -> np.ndarray | None:
    return None if entry["label"] is None else np.asarray(nib.load(str(base / entry["label"])).dataobj)


FEATURES = [
    "agreement_mean",
    "agreement_min",
    "missing_structures",
    "lv_enclosure",
    "heart_reconstruction_error",
    "nearest_training_code_distance",
]


def _design(cases: dict, features: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [n for n, c in cases.items() if c["kind"] != "rigid"]
    x = np.array([[float(cases[n]["signals"].get(f, 0.0) or 0.0) for f in features] for n in names])
    y = np.array([cases[n]["mean_dice"] for n in names])
    return x, y, names


def _rates(predicted: np.ndarray, dice_values: np.ndarray, limit: float) -> tuple[float, float]:
    """(share of failures below FAIL_BELOW flagged, share of good cases from GOOD_FROM flagged)."""
    flagged = predicted < limit
    failing, good = dice_values < FAIL_BELOW, dice_values >= GOOD_FROM
    return float(flagged[failing].mean()) if failing.any() else float("nan"), float(flagged[good].mean())


def fit(args: argparse.Namespace) -> None:
    """Ridge fit of mean Dice on the validation cases' signals; the limit is the midpoint of the range of limits
    that flag every failing validation case and no good one (or, when none does, the one flagging most failures
    while flagging at most 5% of good cases)."""
    from nisf_monai.quality import QualityScore

    cases = json.loads((Path(args.work) / "val" / "cases.json").read_text())
    x, y, _ = _design(cases, FEATURES)
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = np.c_[np.ones(len(x)), (x - mean) / scale]
    penalty = args.ridge * np.eye(z.shape[1])
    penalty[0, 0] = 0.0
    beta = np.linalg.solve(z.T @ z + penalty, z.T @ y)
    weights = beta[1:] / scale
    bias = float(beta[0] - (weights * mean).sum())
    predicted = np.clip(bias + x @ weights, 0, 1)
    candidates = np.round(np.arange(0.50, 0.95, 0.005), 3)
    rates = [(limit, *_rates(predicted, y, limit)) for limit in candidates]
    perfect = [limit for limit, caught, false in rates if caught == 1.0 and false == 0.0]
    if perfect:
        limit = float(np.round((min(perfect) + max(perfect)) / 2, 3))
    else:
        allowed = [(caught, -limit, limit) for limit, caught, false in rates if false <= 0.05]
        limit = float(max(allowed)[2])
    score = QualityScore(
        FEATURES,
        weights.tolist(),
        bias,
        limit,
        fitted_on=f"ACDC validation frames, {len(y)} clean and degraded (benchmarks/qc_calibration.py fit)",
    )
    reference_path = Path(args.reference)
    reference = json.loads(reference_path.read_text())
    reference["score"] = score.to_dict()
    reference_path.write_text(json.dumps(reference, indent=1) + "\n")
    caught, false = _rates(predicted, y, limit)
    record = {
        "score": score.to_dict(),
        "validation": {
            "cases": len(y),
            "spearman": _spearman(predicted, y),
            "flagged_failing": caught,
            "flagged_good": false,
            "ridge": args.ridge,
        },
    }
    (Path(args.work) / "qc_score_fit.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def report(args: argparse.Namespace) -> dict:
    """The shipped score applied to a split's collected cases, and the rigid check's agreement."""
    from nisf_monai.quality import QualityScore

    base = Path(args.work) / args.split
    cases = json.loads((base / "cases.json").read_text())
    reference = json.loads(Path(args.reference).read_text())
    score = QualityScore.from_dict(reference["score"])
    limits = {k: max(v) * 1.25 for k, v in reference.items() if k in ("nearest_training_code_distance",)}

    def error_beyond(signals: dict) -> bool:  # 0.12.0 also warned on the reconstruction error
        return signals["reconstruction_error"] > max(reference["reconstruction_error"]) * 1.25

    rows = {}
    for name, case in cases.items():
        predicted = score.predict(case["signals"])
        distance = case["signals"].get("nearest_training_code_distance")
        no_lv = case["signals"].get("lv_blood_pool_ml", 0.0) < 5.0
        far = distance is not None and distance > limits["nearest_training_code_distance"]
        rows[name] = {
            "kind": case["kind"],
            "part": case["part"],
            "mean_dice": case["mean_dice"],
            "predicted_dice": predicted,
            "warns": bool(score.flags(predicted) or no_lv or far),
            "warned_before": bool(no_lv or far or error_beyond(case["signals"])),  # 0.12.0's three checks
            "by": [w for w, on in (("score", score.flags(predicted)), ("no_lv", no_lv), ("code", far)) if on],
        }
    result: dict = {"split": args.split, "limit": score.limit, "parts": {}}
    for part in ("clean", "degraded", "all"):
        names = [n for n, r in rows.items() if r["kind"] != "rigid" and (part == "all" or r["part"] == part)]
        chosen = [rows[n] for n in names]
        if not chosen:
            continue
        d = np.array([r["mean_dice"] for r in chosen])
        p = np.array([r["predicted_dice"] for r in chosen])
        w = np.array([r["warns"] for r in chosen])
        before = np.array([r["warned_before"] for r in chosen])
        failing, good = d < FAIL_BELOW, d >= GOOD_FROM
        signals = {
            f: _spearman(np.array([float(cases[n]["signals"].get(f) or 0.0) for n in names]), d)
            for f in FEATURES + ["reconstruction_error"]
        }
        result["parts"][part] = {
            "frames": len(chosen),
            "spearman": _spearman(p, d),
            "failing": int(failing.sum()),
            "warned_failing": float(w[failing].mean()) if failing.any() else None,
            "good": int(good.sum()),
            "warned_good": float(w[good].mean()) if good.any() else None,
            "mean_dice": float(d.mean()),
            "before_warned_failing": float(before[failing].mean()) if failing.any() else None,
            "before_warned_good": float(before[good].mean()) if good.any() else None,
            "signal_spearman": signals,
        }
    rigid_rows = {n: r for n, r in rows.items() if r["kind"] == "rigid"}
    if rigid_rows:
        result["rigid"] = _rigid_check(base, cases, rows, rigid_rows)
    result["cases"] = rows
    (base / f"report_{args.split}.json").write_text(json.dumps(result, indent=1))
    print(
        f"{'part':10s} {'frames':>6s} {'rho':>6s} {'<0.75':>6s} {'warned':>7s} {'before':>7s} {'>=0.85':>7s} "
        f"{'warned':>7s} {'before':>7s}"
    )
    for part, r in result["parts"].items():
        print(
            f"{part:10s} {r['frames']:6d} {r['spearman']:6.3f} {r['failing']:6d} {r['warned_failing'] or 0:7.2f} "
            f"{r['before_warned_failing'] or 0:7.2f} {r['good']:7d} {r['warned_good'] or 0:7.2f} "
            f"{r['before_warned_good'] or 0:7.2f}"
        )
        print(
            "  rank correlation with Dice per signal: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["signal_spearman"].items())
        )
    for name, r in result.get("rigid", {}).items():
        print(f"{name}: verdicts {r['verdicts']}, foreground Dice to the original {r['foreground_dice']}")
    return result


def _rigid_check(base: Path, cases: dict, rows: dict, rigid_rows: dict) -> dict:
    """Per original frame: the verdicts under its rigid affines and the foreground agreement of their labels."""
    found: dict = {}
    original_seg = {}
    for name, row in rigid_rows.items():
        of = cases[name]["of"]
        if of not in original_seg:
            original_seg[of] = np.asarray(nib.load(str(base / "out_clean" / f"{of}_seg.nii.gz")).dataobj)
        seg = np.asarray(nib.load(str(base / "out_rigid" / f"{name}_seg.nii.gz")).dataobj)
        a, b = original_seg[of] > 0, seg > 0
        entry = found.setdefault(of, {"original_warns": rows[of]["warns"], "verdicts": [], "foreground_dice": []})
        entry["verdicts"].append(row["warns"])
        entry["foreground_dice"].append(round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 4))
        entry.setdefault("label_agreement", []).append(round(float((original_seg[of] == seg).mean()), 4))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "qc"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--split", choices=["val", "test"], required=True)
    p.add_argument("--seed", type=int, default=27)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(run=prepare)
    p = sub.add_parser("rigid")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--seed", type=int, default=27)
    p.set_defaults(run=rigid)
    p = sub.add_parser("infer")
    p.add_argument("--split", choices=["val", "test"], required=True)
    p.add_argument("--part", choices=["clean", "degraded", "rigid"], required=True)
    p.set_defaults(run=infer)
    p = sub.add_parser("fit")
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--reference", default=str(ROOT / "bundle" / "models" / "qc_reference.json"))
    p.set_defaults(run=fit)
    p = sub.add_parser("report")
    p.add_argument("--split", choices=["val", "test"], required=True)
    p.add_argument("--reference", default=str(ROOT / "bundle" / "models" / "qc_reference.json"))
    p.set_defaults(run=report)
    p = sub.add_parser("collect")
    p.add_argument("--split", choices=["val", "test"], required=True)
    p.set_defaults(run=collect)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
