"""Tests of the synthetic SAX cine cohort (nisf_monai.data.synthetic)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO

from nisf_monai.data.synthetic import LABELS, ensure_synthetic_cohort, generate_cohort, generate_subject
from nisf_monai.io import save_nifti

BP, MYO, RV = LABELS["lv_blood_pool"], LABELS["lv_myocardium"], LABELS["rv_blood_pool"]


def _dilate_in_plane(mask: np.ndarray) -> np.ndarray:
    """8-connected in-plane dilation by one voxel (no scipy needed)."""
    padded = np.pad(mask, [(1, 1), (1, 1), (0, 0)])
    nx, ny = mask.shape[:2]
    return np.any([padded[i : i + nx, j : j + ny] for i in range(3) for j in range(3)], axis=0)


def _mid_slices(label: np.ndarray) -> list[int]:
    z = label.shape[2]
    return [z // 2 - 1, z // 2]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    path = generate_cohort(
        str(out), num_subjects=3, seed=1, spacing=(1.25, 1.5, 7.0), shape=(112, 96, 12), num_validation=1
    )
    return Path(path)


def test_deterministic_per_seed() -> None:
    image, label, affine, info = generate_subject(3, "ES")
    image2, label2, affine2, info2 = generate_subject(3, "ES")
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(label, label2)
    np.testing.assert_array_equal(affine, affine2)
    assert info == info2
    other_image, other_label, other_affine, _ = generate_subject(4, "ES")
    assert not np.array_equal(label, other_label)
    assert not np.allclose(image, other_image)
    assert not np.array_equal(affine, other_affine)
    # ED and ES of one seed are the same subject: same grid and pose, different contraction
    _, label_ed, affine_ed, info_ed = generate_subject(3, "ED")
    np.testing.assert_array_equal(affine_ed, affine)
    assert info_ed["lv_center_mm"] == info["lv_center_mm"]
    assert info_ed["lv_apex_z_mm"] == pytest.approx(info["lv_apex_z_mm"])
    assert not np.array_equal(label_ed, label)


@pytest.mark.parametrize("seed", [0, 5, 11])
@pytest.mark.parametrize("phase", ["ED", "ES"])
def test_anatomy(seed: int, phase: str) -> None:
    image, label, _, _ = generate_subject(seed, phase)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == label.shape == (96, 96, 10)
    assert set(np.unique(label).tolist()) <= set(LABELS.values())
    mid = _mid_slices(label)
    for k in mid:
        assert {BP, MYO, RV} <= set(np.unique(label[..., k]).tolist()), f"slice {k} misses a structure"
    # the blood pool is enclosed by myocardium: growing it by a voxel stays inside the LV
    lv = (label == BP) | (label == MYO)
    grown = _dilate_in_plane(label == BP)
    assert not np.any(grown[..., mid] & ~lv[..., mid])
    # the RV touches the LV only at the myocardium, never the blood pool
    assert not np.any(_dilate_in_plane(label == RV)[..., mid] & (label == BP)[..., mid])
    # tapering: the most apical LV slice is much smaller than the largest, and has no RV
    lv_area = lv.sum(axis=(0, 1))
    heart_slices = np.nonzero(lv_area)[0]
    apex = heart_slices[0]
    assert lv_area[apex] < 0.5 * lv_area.max()
    assert not np.any(label[..., apex] == RV)
    assert heart_slices[-1] < label.shape[2] - 1 or lv_area[-1] > 0.5 * lv_area.max()  # the base is at +z


@pytest.mark.parametrize("seed", range(4))
def test_volumes(seed: int) -> None:
    _, label_ed, affine, info_ed = generate_subject(seed, "ED")
    _, label_es, _, info_es = generate_subject(seed, "ES")
    assert {"lv_blood_pool_ml", "lv_myocardium_ml", "rv_blood_pool_ml"} <= set(info_ed)
    ef = 1.0 - info_es["lv_blood_pool_ml"] / info_ed["lv_blood_pool_ml"]
    assert 0.4 <= ef <= 0.75
    assert info_es["rv_blood_pool_ml"] < info_ed["rv_blood_pool_ml"]
    # the closed-form myocardial volume is conserved through the cycle
    assert info_es["lv_myocardium_continuous_ml"] == pytest.approx(info_ed["lv_myocardium_continuous_ml"], rel=1e-6)
    assert info_ed["lv_blood_pool_continuous_ml"] > info_es["lv_blood_pool_continuous_ml"]
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    for name in ("lv_blood_pool", "lv_myocardium", "rv_blood_pool"):
        counted = np.sum(label_ed == LABELS[name]) * voxel_ml
        assert counted == pytest.approx(info_ed[f"{name}_ml"], rel=0.05), name
    assert np.sum(label_es == BP) < np.sum(label_ed == BP)


def test_volume_converges_to_closed_form() -> None:
    """Finer slices make the disc-summation volume approach the continuous LV volume (the anatomy is grid-free)."""
    _, _, _, info = generate_subject(2, "ED", spacing=(1.5, 1.5, 1.0), shape=(96, 96, 80))
    assert info["lv_blood_pool_ml"] == pytest.approx(info["lv_blood_pool_continuous_ml"], rel=0.01)
    assert info["lv_myocardium_ml"] == pytest.approx(info["lv_myocardium_continuous_ml"], rel=0.01)


@pytest.mark.parametrize("seed", [0, 7])
def test_contrast_and_intensity_scale(seed: int) -> None:
    image, label, _, info = generate_subject(seed, "ED")
    assert image[label == BP].mean() > 2.0 * image[label == MYO].mean()
    assert image[label == RV].mean() > 2.0 * image[label == MYO].mean()
    assert image.min() >= 0.0  # magnitude image
    assert 0.5 * 200 < np.percentile(image, 99) < 1.5 * 2000
    assert np.percentile(image[label == BP], 50) == pytest.approx(info["intensity_scale"], rel=0.35)


def test_affine_and_world_coordinates() -> None:
    shape = (96, 96, 10)
    _, label, affine, info = generate_subject(6, "ED", shape=shape)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (1.5, 1.5, 8.0), rtol=1e-6)
    center = affine @ np.append((np.array(shape) - 1) / 2.0, 1.0)
    np.testing.assert_allclose(center[:3], info["fov_center_mm"], atol=1e-4)
    assert 0.1 < np.linalg.norm(center[:3]) < 10.0  # near the origin, but with a subject-specific offset
    # the LV axis in world space maps into the blood pool of the rasterised label
    lv_center = np.asarray(info["lv_center_mm"])
    index = np.rint(np.linalg.solve(affine, np.append(lv_center, 1.0))[:3]).astype(int)
    assert label[tuple(index)] == BP
    off_center = 1.0 < np.linalg.norm(lv_center[:2] - center[:2]) < 12.0
    assert off_center


def test_oblique_keeps_anatomy(tmp_path: Path) -> None:
    _, label, affine, info = generate_subject(6, "ED")
    _, label_ob, affine_ob, info_ob = generate_subject(6, "ED", oblique=True)
    assert np.count_nonzero(affine_ob[:3, :3] - np.diag(np.diag(affine_ob[:3, :3]))) > 0
    np.testing.assert_allclose(np.linalg.norm(affine_ob[:3, :3], axis=0), (1.5, 1.5, 8.0), rtol=1e-5)
    assert info_ob["lv_center_mm"] == info["lv_center_mm"]
    assert info_ob["lv_blood_pool_continuous_ml"] == info["lv_blood_pool_continuous_ml"]
    index = np.rint(np.linalg.solve(affine_ob, np.append(info["lv_center_mm"], 1.0))[:3]).astype(int)
    assert label_ob[tuple(index)] == BP
    assert info_ob["lv_blood_pool_ml"] == pytest.approx(info["lv_blood_pool_ml"], rel=0.15)
    path = tmp_path / "oblique.nii.gz"
    save_nifti(label_ob, affine_ob, path, time_unit="sec")
    np.testing.assert_array_equal(nib.load(path).affine, affine_ob)  # float32-exact, survives the sform


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_subject(0, "MID")
    with pytest.raises(ValueError):
        generate_subject(0, shape=(96, 96))
    with pytest.raises(ValueError):
        generate_cohort(str(tmp_path), num_subjects=0)
    with pytest.raises(ValueError):
        generate_cohort(str(tmp_path), num_subjects=1, phases="ED,XX")


def test_cohort_files_and_datalist(cohort: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    content = json.loads(cohort.read_text())
    assert content["labels"] == {"0": "background", "1": "lv_blood_pool", "2": "lv_myocardium", "3": "rv_blood_pool"}
    assert [e["case"] for e in content["training"]] == ["synth000_ED", "synth000_ES", "synth001_ED", "synth001_ES"]
    assert [e["case"] for e in content["validation"]] == ["synth002_ED", "synth002_ES"]
    assert not {e["subject"] for e in content["training"]} & {e["subject"] for e in content["validation"]}
    for entry in content["training"] + content["validation"]:
        assert not os.path.isabs(entry["image"]) and not os.path.isabs(entry["label"])
        assert entry["image"] == f"{entry['case']}.nii.gz" and entry["label"] == f"{entry['case']}_gt.nii.gz"

    items = load_decathlon_datalist(str(cohort), True, "training")
    assert all(
        Path(item[k]).is_file() and Path(item[k]).parent == cohort.parent for item in items for k in ("image", "label")
    )
    item = items[1]
    loaded = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(item)
    image, label, affine, info = generate_subject(
        item["seed"], item["phase"], spacing=(1.25, 1.5, 7.0), shape=(112, 96, 12)
    )
    assert tuple(loaded["image"].shape) == (1, 112, 96, 12)
    np.testing.assert_array_equal(loaded["image"].affine.numpy(), affine)
    np.testing.assert_array_equal(loaded["label"].affine.numpy(), affine)
    np.testing.assert_allclose(loaded["image"].pixdim.numpy(), (1.25, 1.5, 7.0), rtol=1e-6)
    np.testing.assert_array_equal(loaded["image"][0].numpy(), image)
    np.testing.assert_array_equal(loaded["label"][0].numpy(), label)
    assert item["lv_blood_pool_ml"] == pytest.approx(info["lv_blood_pool_ml"], abs=1e-3)
    header = nib.load(item["label"]).header
    assert header.get_xyzt_units()[0] == "mm" and header.get_data_dtype() == np.uint8


def _capture(caplog: pytest.LogCaptureFixture) -> tuple[logging.Logger, int]:
    """Route the package logger to caplog even if something switched its propagation off."""
    log = logging.getLogger("nisf_monai")
    level = log.level
    log.addHandler(caplog.handler)
    log.setLevel(logging.INFO)
    return log, level


def test_ensure_synthetic_cohort_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = tmp_path / "missing" / "dataset"
    log, level = _capture(caplog)
    try:
        path = ensure_synthetic_cohort(str(dataset), num_subjects=2, phases=("ED",), num_validation=1)
        assert Path(path) == dataset / "datalist.json" and Path(path).is_file()
        assert any(f"generated a synthetic cohort of 2 subjects in {dataset}" in r.getMessage() for r in caplog.records)
        files = sorted(dataset.iterdir())
        for f in files:
            os.utime(f, ns=(1_000_000_000, 1_000_000_000))
        caplog.clear()
        assert ensure_synthetic_cohort(str(dataset), num_subjects=5) == path
        assert sorted(dataset.iterdir()) == files
        assert all(f.stat().st_mtime_ns == 1_000_000_000 for f in files)
        assert not any("generated a synthetic cohort" in r.getMessage() for r in caplog.records)

        empty = tmp_path / "empty"
        empty.mkdir()
        ensure_synthetic_cohort(str(empty), num_subjects=1, phases="ES")
        assert sorted(p.name for p in empty.iterdir()) == [
            "datalist.json",
            "synth000_ES.nii.gz",
            "synth000_ES_gt.nii.gz",
        ]
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(level)


def test_ensure_keeps_existing_datalist(tmp_path: Path) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text('{"training": []}')
    assert ensure_synthetic_cohort(str(tmp_path)) == str(datalist)
    assert datalist.read_text() == '{"training": []}' and len(list(tmp_path.iterdir())) == 1


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "nisf_monai.data.synthetic",
        "generate",
        "--output_dir",
        str(out),
        "--num_subjects",
        "2",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    content = json.loads((out / "datalist.json").read_text())
    assert [e["case"] for e in content["training"]] == ["synth000_ED", "synth000_ES"]
    assert [e["case"] for e in content["validation"]] == ["synth001_ED", "synth001_ES"]
    assert len(list(out.glob("*.nii.gz"))) == 8
