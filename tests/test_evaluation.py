"""Evaluation pieces: datalist builder, Dice, step selection, batched latent fitting, the evaluating run."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, TINY_NET_ARGS, run_bundle
from monai.data import MetaTensor
from monai.handlers import MeanDice
from monai.metrics import DiceMetric

from nisf_monai.data import build_datalist, generate_subject, load_datalist, read_label_mapping, split_of
from nisf_monai.engines.dice_curve import dice_per_class
from nisf_monai.handlers import class_dice_metrics, select_step, selected_inference_steps
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.networks import NISFNet

ACDC = REPO.parent / "shared" / "data" / "acdc"


def _acdc_like(folder: Path, patients: list[int]) -> None:
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    for n in patients:
        sub = folder / f"patient{n:03d}"
        sub.mkdir(parents=True)
        for frame in (1, 12):
            name = f"patient{n:03d}_frame{frame:02d}"
            nib.save(nib.Nifti1Image(np.random.rand(8, 8, 2).astype(np.float32), affine), str(sub / f"{name}.nii.gz"))
            nib.save(nib.Nifti1Image(np.full((8, 8, 2), 3, np.uint8), affine), str(sub / f"{name}_gt.nii.gz"))


def test_datalist_builder_splits_by_patient_and_maps_labels(tmp_path: Path) -> None:
    patients = list(range(1, 21))
    _acdc_like(tmp_path / "acdc", patients)
    path = build_datalist(str(tmp_path / "acdc"), str(tmp_path / "out" / "datalist.json"))
    parts = {part: load_datalist(path, part) for part in ("training", "validation", "test")}
    subjects = {part: {item["subject"] for item in items} for part, items in parts.items()}
    assert not (
        subjects["training"] & subjects["validation"]
        or subjects["training"] & subjects["test"]
        or subjects["validation"] & subjects["test"]
    )
    for part, names in subjects.items():
        for name in names:
            assert split_of(int(name[-3:])) == part
            # both frames of a patient stay in one part
            assert sum(item["subject"] == name for item in parts[part]) == 2
    assert subjects["test"] == {f"patient{n:03d}" for n in patients if n % 5 == 4}
    assert subjects["validation"] == {"patient002", "patient012"}
    assert all(
        os.path.exists(item["image"]) and os.path.exists(item["label"]) for items in parts.values() for item in items
    )
    assert read_label_mapping(path) == {1: 3, 2: 2, 3: 1}  # ACDC RV 1 -> 3, LV blood pool 3 -> 1


def test_datalist_builder_on_unnumbered_folders_is_reproducible(tmp_path: Path) -> None:
    affine = np.eye(4)
    for name in ("delta", "alpha", "charlie", "bravo", "echo"):
        nib.save(nib.Nifti1Image(np.random.rand(4, 4, 2).astype(np.float32), affine), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), affine), str(tmp_path / f"{name}_gt.nii.gz"))
    first = json.loads(Path(build_datalist(str(tmp_path), label_mapping=None)).read_text())
    second = json.loads(Path(build_datalist(str(tmp_path), label_mapping=None)).read_text())
    assert first == second and first["label_mapping"] == {}
    # subjects without numbers split by their sorted rank:
    # alpha 0, bravo 1, charlie 2 (validation), delta 3, echo 4 (test)
    assert [e["case"] for e in first["validation"]] == ["charlie"]
    assert [e["case"] for e in first["test"]] == ["echo"]


def test_dice_per_class_and_class_metrics_equal_monai_dice_metric() -> None:
    rng = np.random.default_rng(0)
    label = torch.as_tensor(rng.integers(0, 4, (12, 10, 3)))
    pred = label.clone()
    flip = torch.as_tensor(rng.random(label.shape) < 0.3)
    pred[flip] = torch.as_tensor(rng.integers(0, 4, int(flip.sum())))
    onehot = lambda x: F.one_hot(x.long(), 4).movedim(-1, 0)[None]  # noqa: E731
    expected = DiceMetric(include_background=False, reduction="none")(onehot(pred), onehot(label))[0]
    torch.testing.assert_close(dice_per_class(pred, label, 4), expected.float(), rtol=1e-6, atol=1e-6)
    metrics = class_dice_metrics(["background", "lv", "myo", "rv"])
    output = [{"pred": onehot(pred)[0], "label": onehot(label)[0]}]
    for c, (name, metric) in enumerate(metrics.items(), start=1):
        assert isinstance(metric, MeanDice) and name == ["dice_lv", "dice_myo", "dice_rv"][c - 1]
        preds, labels = metric._output_transform(output)
        value = DiceMetric(include_background=False)(torch.stack(preds), torch.stack(labels))
        assert float(value.mean()) == pytest.approx(float(expected[c - 1]), abs=1e-6)


def test_select_step_picks_the_best_mean_and_the_earliest_tie() -> None:
    steps = [0, 50, 100, 150, 200]
    # two cases, two classes; case means peak at step 100 (0.8) then fall
    case_a = [[0.1, 0.3], [0.5, 0.5], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6]]
    case_b = [[0.2, np.nan], [0.6, np.nan], [0.8, np.nan], [0.75, np.nan], [0.5, np.nan]]
    best, curve = select_step(steps, np.asarray([case_a, case_b]))
    assert best == 100 and curve[2] == pytest.approx(0.8)
    tied = np.asarray([[[0.5], [0.9], [0.9], [0.4], [0.2]]])
    assert select_step(steps, tied)[0] == 50
    with pytest.raises(ValueError):
        select_step(steps, np.full((1, 5, 1), np.nan))


def test_selected_steps_are_read_from_the_model_folder(tmp_path: Path) -> None:
    assert selected_inference_steps(tmp_path, default=123) == 123
    (tmp_path / "inference_steps.json").write_text(json.dumps({"inference_steps": 672}))
    assert selected_inference_steps(tmp_path, default=123) == 672


def test_batched_fitting_equals_sequential_on_different_grids() -> None:
    """Cases of different shapes and spacings fitted together get the codes they get alone."""
    torch.manual_seed(0)
    net = NISFNet(latent_dim=8, hidden_dim=16, num_layers=2)
    cases = []
    for shape, spacing in (((10, 8, 3), 2.0), ((7, 9, 4), 3.0), ((12, 12, 2), 1.5)):
        affine = torch.diag(torch.tensor([spacing, spacing, 8.0, 1.0], dtype=torch.float64))
        cases.append(MetaTensor(torch.rand(1, *shape), affine=affine))
    inferer = LatentOptimisationInferer(num_steps=15, num_points=64, learning_rate=1e-2, log_every=0)
    batched = inferer.fit(cases, net)
    sequential = torch.cat([inferer.fit([case], net) for case in cases])
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-6)
    outputs = inferer.fit_and_sample(cases, net)
    for case, output in zip(cases, outputs):
        assert output["pred"].shape == case.shape and output["pred"].dtype == torch.uint8
        np.testing.assert_allclose(output["pred"].affine, case.affine)


@pytest.mark.skipif(not ACDC.is_dir(), reason=f"ACDC data not found at {ACDC} (see shared/data/README.md)")
def test_evaluating_run_on_two_acdc_cases(tmp_path: Path) -> None:
    """The `evaluating` command on two real ACDC frames writes per-case and summary Dice CSVs and figures."""
    full = json.loads(Path(build_datalist(str(ACDC), str(tmp_path / "datalist.json"))).read_text())
    full["test"] = full["test"][:2]
    (tmp_path / "datalist.json").write_text(json.dumps(full))
    net = NISFNet(latent_dim=16, hidden_dim=16, num_layers=2)
    (tmp_path / "models").mkdir()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    result = run_bundle(
        "evaluating",
        ["inference.json", "evaluate.json"],
        tmp_path,
        "--datalist_file",
        str(tmp_path / "datalist.json"),
        "--inference_steps",
        "4",
        "--monitor_every",
        "2",
        "--num_points",
        "256",
        "--save_images",
        "True",
        *TINY_NET_ARGS,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    raw = (tmp_path / "eval" / "mean_dice_raw.csv").read_text().splitlines()
    assert len(raw) == 3 and "patient" in raw[1]  # header + two cases, named by file
    # the numbers written are the Dice of the written segmentation against the manual labels, class by class
    for row, case in zip(csv.DictReader(raw), full["test"]):
        name = Path(row["filename"]).name.replace(".nii.gz", "")
        written = np.asarray(nib.load(str(tmp_path / "eval" / f"{name}_seg.nii.gz")).dataobj)
        acdc = np.asarray(nib.load(str(tmp_path / case["label"])).dataobj)
        truth = np.select([acdc == 3, acdc == 2, acdc == 1], [1, 2, 3], 0)
        for c in (1, 2, 3):
            a, b = written == c, truth == c
            assert float(row[f"class{c - 1}"]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-5)
    summary = (tmp_path / "eval" / "mean_dice_summary.csv").read_text()
    assert summary.startswith("class,mean,std")
    for name in ("dice_lv_blood_pool", "dice_lv_myocardium", "dice_rv_blood_pool"):
        assert (tmp_path / "eval" / f"{name}_summary.csv").is_file()
    steps = json.loads((tmp_path / "eval" / "inference_steps.json").read_text())
    assert steps["steps"] == [0, 2, 4] and steps["num_cases"] == 2
    assert (tmp_path / "eval" / "figures" / "dice_vs_latent_step.png").stat().st_size > 0
    assert len(list((tmp_path / "eval" / "figures").glob("*_overlay.png"))) == 2


def test_evaluating_run_scores_each_frame_of_a_cine_series(tmp_path: Path) -> None:
    """A 4D cine image with its 4D label in the datalist, beside a 3D frame: the `evaluating` run scores and
    saves each frame of the series as its own case (expanded datalist, frame cut out after loading)."""
    frames = [generate_subject(7, phase, spacing=(4.0, 4.0, 10.0), shape=(24, 24, 4)) for phase in ("ED", "ES")]
    affine = frames[0][2]
    image = np.stack([f[0] for f in frames], axis=-1)
    label = np.stack([f[1] for f in frames], axis=-1)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "cine.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "cine_gt.nii.gz"))
    nib.save(nib.Nifti1Image(image[..., 0], affine), str(tmp_path / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(label[..., 0], affine), str(tmp_path / "flat_gt.nii.gz"))
    test = [{"image": "cine.nii.gz", "label": "cine_gt.nii.gz"}, {"image": "flat.nii.gz", "label": "flat_gt.nii.gz"}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": test, "test": test}))
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(NISFNet(latent_dim=16, hidden_dim=16, num_layers=2).state_dict(), tmp_path / "models" / "model.pt")
    run_bundle(
        "evaluating",
        ["inference.json", "evaluate.json"],
        tmp_path,
        "--datalist_file",
        str(tmp_path / "datalist.json"),
        "--save_images",
        "True",
        "--inference_steps",
        "2",
        "--num_points",
        "256",
        "--localiser_refine_steps",
        "0",
        *TINY_NET_ARGS,
    )
    rows = (tmp_path / "eval" / "mean_dice_raw.csv").read_text().splitlines()[1:]
    assert sorted(Path(row.split(",")[0]).name for row in rows) == ["cine_t00.nii.gz", "cine_t01.nii.gz", "flat.nii.gz"]
    assert not (tmp_path / "eval" / "failed_cases.txt").exists()  # no frame skipped
    figures = sorted(p.name for p in (tmp_path / "eval" / "figures").glob("*_overlay.png"))
    assert figures == ["cine_t00_overlay.png", "cine_t01_overlay.png", "flat_overlay.png"]
    for name in ("cine_t00_seg.nii.gz", "cine_t01_seg.nii.gz", "flat_seg.nii.gz"):
        seg = nib.load(str(tmp_path / "eval" / name))
        assert seg.shape == image.shape[:3]
        np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
