"""End to end: the bundle's training and inference commands, run as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_NET_ARGS, oblique_affine, run_bundle

from nisf_monai.data.dicom import write_dicom_cine
from nisf_monai.data.synthetic import generate_cohort
from nisf_monai.inferers import localiser_network, target_grid


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle root with a model trained for a few epochs on a tiny generated cohort."""
    root = tmp_path_factory.mktemp("bundle")
    data = tmp_path_factory.mktemp("cohort")
    datalist = generate_cohort(str(data), num_subjects=3, shape=(32, 32, 6), spacing=(4.0, 4.0, 10.0), num_validation=1)
    run_bundle(
        "training",
        "train.json",
        root,
        "--datalist",
        datalist,
        "--max_epochs",
        "3",
        "--num_points",
        "256",
        "--batch_size",
        "2",
        "--val_interval",
        "3",
        "--val_max_steps",
        "4",
        "--val_monitor_every",
        "2",
        *TINY_NET_ARGS,
    )
    return root, Path(datalist)


def test_training_writes_model_and_state(trained_bundle: tuple[Path, Path]) -> None:
    root, datalist = trained_bundle
    model = torch.load(root / "models" / "model.pt", weights_only=True)
    state = torch.load(root / "models" / "training_state.pt", weights_only=True)
    # model.pt is a plain network state_dict (what Model Zoo and MONAI Label load)
    assert all(isinstance(v, torch.Tensor) for v in model.values())
    assert "seg_head.weight" in model and model["seg_head.weight"].shape == (4, 16)
    assert state["trainer"]["epoch"] == 3
    items = json.loads(datalist.read_text())["training"]
    assert sorted(state["latent_table"]["_extra_state"]["case_ids"]) == sorted(i["case"] for i in items)
    assert state["latent_table"]["weight"].shape == (len(items), 16)


def test_validation_selects_steps_and_keeps_the_best_model(trained_bundle: tuple[Path, Path]) -> None:
    root, _ = trained_bundle
    steps = json.loads((root / "models" / "inference_steps.json").read_text())
    assert steps["steps"] == [0, 2, 4] and steps["inference_steps"] in (0, 2, 4)
    assert steps["num_cases"] == 2  # the validation subject's ED and ES frames
    best = torch.load(root / "models" / "model_best.pt", weights_only=True)
    assert set(best) == set(torch.load(root / "models" / "model.pt", weights_only=True))
    assert (root / "logs" / "dice_vs_latent_step.png").is_file()


def test_training_resumes_from_state(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = trained_bundle
    out = run_bundle(
        "training",
        "train.json",
        root,
        "--datalist",
        str(datalist),
        "--max_epochs",
        "4",
        "--num_points",
        "256",
        "--batch_size",
        "2",
        *TINY_NET_ARGS,
    )
    assert "resumed from" in out.stdout + out.stderr
    state = torch.load(root / "models" / "training_state.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 4


def test_inference_writes_segmentations_at_target_spacing(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = trained_bundle
    images = sorted(p for p in datalist.parent.glob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))
    out_dir = tmp_path / "out"
    run_bundle(
        "inference",
        "inference.json",
        root,
        "--dataset_dir",
        str(datalist.parent),
        "--output_dir",
        str(out_dir),
        "--target_spacing",
        "[2.0, 3.0, 5.0]",
        "--inference_steps",
        "5",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    for image_path in images:
        name = image_path.name[: -len(".nii.gz")]
        source = nib.load(str(image_path))
        seg = nib.load(str(out_dir / f"{name}_seg.nii.gz"))
        recon = nib.load(str(out_dir / f"{name}_recon.nii.gz"))
        expected_affine, expected_shape = target_grid(source.affine, source.shape, [2.0, 3.0, 5.0])
        for written in (seg, recon):
            assert list(written.shape) == expected_shape
            np.testing.assert_allclose(written.affine, expected_affine, atol=1e-4)
            np.testing.assert_allclose(written.header.get_zooms()[:3], [2.0, 3.0, 5.0], atol=1e-5)
        assert seg.get_data_dtype() == np.uint8
        labels = np.asarray(seg.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        values = np.asarray(recon.dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0
        # same physical extent: the first and last output voxel centres lie on the input's corners
        corners_in = source.affine @ np.array([[0, 0, 0, 1], [*(np.array(source.shape) - 1), 1]]).T
        corners_out = seg.affine @ np.array([[0, 0, 0, 1], [*(np.array(seg.shape) - 1), 1]]).T
        np.testing.assert_allclose(corners_out[:3, 0], corners_in[:3, 0], atol=1e-4)
        assert np.all(np.abs(corners_out[:3, 1] - corners_in[:3, 1]) < np.array([2.0, 3.0, 5.0]))


# a localiser smaller than the default, so that the test also shows the architecture settings reach both configs
SMALL_LOCALISER_ARGS = ("--localiser_channels", "[8, 16, 32]", "--localiser_res_units", "1")


def test_localiser_trains_and_seeds_inference(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """train_localiser.json writes localiser.pt beside the model; inference then starts its pose search from it
    (no warning about a missing localiser) and still writes every case."""
    root, datalist = trained_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "models", bundle / "models")
    run_bundle(
        "training",
        ["train.json", "train_localiser.json"],
        bundle,
        "--datalist",
        str(datalist),
        "--localiser_epochs",
        "1",
        "--localiser_batch_size",
        "4",
        "--localiser_patch",
        "[32, 32]",
        *SMALL_LOCALISER_ARGS,
    )
    weights = torch.load(bundle / "models" / "localiser.pt", weights_only=True)
    assert set(weights) == set(localiser_network(4, (8, 16, 32), 1).state_dict())
    images = sorted(p for p in datalist.parent.glob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))[:1]
    data = tmp_path / "images"
    data.mkdir()
    shutil.copy(images[0], data / images[0].name)
    out = run_bundle(
        "inference",
        "inference.json",
        bundle,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--inference_steps",
        "2",
        "--num_points",
        "256",
        "--localiser_refine_steps",
        "0",
        *SMALL_LOCALISER_ARGS,
        *TINY_NET_ARGS,
    )
    assert "no heart localiser" not in out.stdout + out.stderr
    assert len(list((tmp_path / "out").rglob("*_seg.nii.gz"))) == 1
    # the same weights read as the default (deeper) localiser: one ERROR line naming the settings, nothing fitted
    mismatched = run_bundle(
        "inference",
        "inference.json",
        bundle,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out_mismatched"),
        *TINY_NET_ARGS,
        check=False,
    )
    assert mismatched.returncode == 1
    assert "ERROR: localiser_channels: the weights in" in mismatched.stderr
    assert "Traceback" not in mismatched.stderr
    assert not list((tmp_path / "out_mismatched").rglob("*_seg.nii.gz"))
    without = run_bundle(
        "inference",
        "inference.json",
        root,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out2"),
        "--inference_steps",
        "0",
        "--num_points",
        "256",
        *TINY_NET_ARGS,
    )
    assert "no heart localiser" in without.stdout + without.stderr


def test_training_without_data_generates_the_default_cohort(tmp_path: Path) -> None:
    """A user with no data runs the training command as is: the synthetic cohort appears and is logged."""
    out = run_bundle(
        "training",
        "train.json",
        tmp_path,
        "--max_epochs",
        "1",
        "--num_points",
        "64",
        "--batch_size",
        "8",
        *TINY_NET_ARGS,
    )
    datalist = tmp_path / "data" / "synthetic" / "datalist.json"
    assert datalist.is_file()
    assert "generated a synthetic cohort" in out.stdout + out.stderr
    assert (tmp_path / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "models" / "training_state.pt", weights_only=True)
    cases = [item["case"] for item in json.loads(datalist.read_text())["training"]]
    assert sorted(state["latent_table"]["_extra_state"]["case_ids"]) == sorted(cases)


def test_inference_skips_a_bad_case_and_writes_the_others(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = trained_bundle
    images = sorted(p for p in datalist.parent.glob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))[:2]
    data = tmp_path / "data"
    data.mkdir()
    for p in images:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.nii.gz").write_bytes(images[0].read_bytes()[:200])  # truncated
    out = run_bundle(
        "inference",
        "inference.json",
        root,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--inference_steps",
        "2",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    log = out.stdout + out.stderr
    assert "skipping case" in log and "broken.nii.gz" in log and "1 case(s) were skipped" in log
    written = sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz"))
    assert written == sorted(p.name.replace(".nii.gz", "_seg.nii.gz") for p in images)


def test_inference_on_a_cine_series_writes_4d_outputs(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = trained_bundle
    ed, es = (nib.load(str(datalist.parent / f"synth000_{phase}.nii.gz")) for phase in ("ED", "ES"))
    series = np.stack([np.asarray(ed.dataobj), np.asarray(es.dataobj)], axis=-1).astype(np.float32)
    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(series, ed.affine), str(data / "cine.nii.gz"))
    run_bundle(
        "inference",
        "inference.json",
        root,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--inference_steps",
        "2",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # the per-frame model fits each frame alone; its frames' outputs are joined into the input's 4D layout
    assert written == [
        "cine_recon.nii.gz",
        "cine_seg.nii.gz",
        "cine_t00_qc.json",
        "cine_t01_qc.json",
        "qc_summary.csv",
    ]
    qc = json.loads((tmp_path / "out" / "cine_t00_qc.json").read_text())  # quality control beside every frame
    assert {"reconstruction_error", "volume_ml", "warnings"} <= set(qc)
    for name in ("cine_seg.nii.gz", "cine_recon.nii.gz"):
        out = nib.load(str(tmp_path / "out" / name))
        assert out.shape == (*ed.shape, 2)
        np.testing.assert_allclose(out.affine, ed.affine, atol=1e-4)


def test_inference_on_a_dicom_cine_matches_the_same_cine_as_nifti(
    trained_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    """A scanner-like export (one series per slice, oblique orientation) runs with no conversion step of the user's
    own, and its labels and geometry are those of the same voxels given as NIfTI."""
    root, datalist = trained_bundle
    ed, es = (nib.load(str(datalist.parent / f"synth000_{phase}.nii.gz")) for phase in ("ED", "ES"))
    cine = np.stack([np.asarray(ed.dataobj), np.asarray(es.dataobj)], axis=-1)
    cine = np.rint(cine / cine.max() * 1000.0).astype(np.float32)  # scanner-like integers
    affine = oblique_affine(np.linalg.norm(ed.affine[:3, :3], axis=0), (-30.0, 70.0, 110.0), 0.6, 1.1)
    write_dicom_cine(cine, affine, tmp_path / "dicom" / "patient1")
    (tmp_path / "nifti").mkdir()
    nib.save(nib.Nifti1Image(cine, affine), str(tmp_path / "nifti" / "patient1.nii.gz"))
    outputs = {}
    for kind in ("dicom", "nifti"):
        args = ["--dataset_dir", str(tmp_path / kind), "--output_dir", str(tmp_path / f"out_{kind}")]
        run_bundle("inference", "inference.json", root, *args, "--inference_steps", "2", *TINY_NET_ARGS, cwd=tmp_path)
        outputs[kind] = nib.load(str(tmp_path / f"out_{kind}" / "patient1_seg.nii.gz"))
    assert (tmp_path / "out_dicom" / "dicom_inputs" / "patient1.nii.gz").is_file()
    dicom, nifti = outputs["dicom"], outputs["nifti"]
    assert dicom.shape == nifti.shape == cine.shape
    np.testing.assert_allclose(dicom.affine, affine, atol=1e-3)
    agreement = (np.asarray(dicom.dataobj) == np.asarray(nifti.dataobj)).mean()
    assert agreement >= 0.999, agreement


def test_inference_without_data_segments_a_demo_frame(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """A first run with no --dataset_dir segments one synthetic frame and says how to give one's own."""
    root, _ = trained_bundle
    out = tmp_path / "out"
    run = run_bundle(
        "inference",
        "inference.json",
        root,
        "--output_dir",
        str(out),
        "--inference_steps",
        "2",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    assert "no --dataset_dir given" in run.stdout + run.stderr
    assert sorted(p.name for p in (root / "data" / "demo").iterdir()) == ["demo_ED.nii.gz"]
    assert (out / "demo_ED_seg.nii.gz").is_file() and (out / "qc_summary.csv").is_file()


def test_inference_rerun_writes_only_the_missing_cases(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """An interrupted cohort run, started again, fits only what is missing; ``--overwrite True`` redoes all."""
    root, datalist = trained_bundle
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(datalist.parent.glob("synth00[01]_ED.nii.gz")):
        (data / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    args = ["--dataset_dir", str(data), "--output_dir", str(out), "--inference_steps", "2", *TINY_NET_ARGS]
    run_bundle("inference", "inference.json", root, *args, cwd=tmp_path)
    kept = out / "synth000_ED_seg.nii.gz"
    written = kept.stat().st_mtime_ns
    (out / "synth001_ED_qc.json").unlink()  # as if stopped after this case's segmentation, before its QC
    second = run_bundle("inference", "inference.json", root, *args, cwd=tmp_path)
    assert "1 of 2 cases already written" in second.stdout + second.stderr
    assert kept.stat().st_mtime_ns == written and (out / "synth001_ED_qc.json").is_file()
    third = run_bundle("inference", "inference.json", root, *args, cwd=tmp_path)
    assert "2 of 2 cases already written" in third.stdout + third.stderr and kept.stat().st_mtime_ns == written
    run_bundle("inference", "inference.json", root, *args, "--overwrite", "True", cwd=tmp_path)
    assert kept.stat().st_mtime_ns > written


def _write_case(
    folder: Path, name: str, image: np.ndarray, label: np.ndarray, label_affine: np.ndarray | None = None
) -> dict:
    affine = np.diag([2.0, 2.0, 8.0, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / f"{name}.nii.gz"))
    nib.save(
        nib.Nifti1Image(label.astype(np.uint8), affine if label_affine is None else label_affine),
        str(folder / f"{name}_gt.nii.gz"),
    )
    return {"image": f"{name}.nii.gz", "label": f"{name}_gt.nii.gz"}


BAD_CASES = {
    "shape mismatch": (lambda rng: (rng.random((16, 16, 4)), np.zeros((16, 16, 5))), "differs from image shape"),
    "label outside classes": (lambda rng: (rng.random((16, 16, 4)), np.full((16, 16, 4), 7)), "not classes 0..3"),
    "NaN intensities": (
        lambda rng: (np.where(rng.random((16, 16, 4)) > 0.5, np.nan, 1.0), np.zeros((16, 16, 4))),
        "NaN or infinite",
    ),
    "2D image": (lambda rng: (rng.random((16, 16)), np.zeros((16, 16))), "expected one 3D volume"),
}


@pytest.mark.parametrize("problem", sorted(BAD_CASES))
def test_training_on_a_bad_case_fails_with_one_clear_line(problem: str, tmp_path: Path) -> None:
    """A bad file stops training with one line naming the file and the problem, not a traceback."""
    make, message = BAD_CASES[problem]
    image, label = make(np.random.default_rng(0))
    good = _write_case(tmp_path, "good", np.random.default_rng(1).random((16, 16, 4)), np.zeros((16, 16, 4)))
    bad = _write_case(tmp_path, "bad", image, label)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [good, bad]}))
    result = run_bundle(
        "training",
        "train.json",
        tmp_path,
        "--datalist",
        str(tmp_path / "datalist.json"),
        "--max_epochs",
        "1",
        *TINY_NET_ARGS,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "bad" in error_lines[0] and message in error_lines[0]


def test_training_with_a_missing_file_names_it(tmp_path: Path) -> None:
    good = _write_case(tmp_path, "good", np.random.default_rng(1).random((16, 16, 4)), np.zeros((16, 16, 4)))
    (tmp_path / "datalist.json").write_text(
        json.dumps({"training": [good, {"image": "gone.nii.gz", "label": "gone_gt.nii.gz"}]})
    )
    result = run_bundle(
        "training",
        "train.json",
        tmp_path,
        "--datalist",
        str(tmp_path / "datalist.json"),
        "--max_epochs",
        "1",
        *TINY_NET_ARGS,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ERROR: " in result.stderr and "gone.nii.gz does not exist" in result.stderr


def test_streamed_outputs_equal_saveimage_outputs(trained_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """With a target spacing the outputs are sampled and written slab by slab (``stream_outputs``, the default
    then); the files equal what sampling the whole grid and MONAI ``SaveImaged`` write: names, affines, labels."""
    root, datalist = trained_bundle
    common = [
        "--dataset_dir",
        str(datalist.parent),
        "--target_spacing",
        "[2.5, 2.5, 4.0]",
        "--inference_steps",
        "3",
        *TINY_NET_ARGS,
    ]
    streamed, saved = tmp_path / "streamed", tmp_path / "saved"
    run_bundle("inference", "inference.json", root, "--output_dir", str(streamed), *common, cwd=tmp_path)
    run_bundle(
        "inference",
        "inference.json",
        root,
        "--output_dir",
        str(saved),
        "--stream_outputs",
        "False",
        *common,
        cwd=tmp_path,
    )
    names = sorted(p.name for p in saved.glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in streamed.glob("*.nii.gz"))
    assert sorted(p.name for p in saved.glob("*_qc.json")) == sorted(p.name for p in streamed.glob("*_qc.json"))
    for name in names:
        a, b = nib.load(str(streamed / name)), nib.load(str(saved / name))
        assert a.shape == b.shape and a.get_data_dtype() == b.get_data_dtype()
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
        np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-6)
