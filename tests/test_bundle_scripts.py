"""bundle/scripts: each entry point run as a user runs it, in a fresh process, on tiny inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nisf_monai.data.synthetic import generate_cohort
from nisf_monai.inferers import localiser_network
from nisf_monai.networks import NISFNet

SCRIPTS = Path(__file__).resolve().parents[1] / "bundle" / "scripts"
TINY_NET = {"latent_dim": 16, "hidden_dim": 16, "num_layers": 2}


def run_script(name: str, *args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """``python bundle/scripts/NAME ARGS`` from ``cwd`` (not the repository)."""
    env = dict(os.environ, CI="true", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert (result.returncode == 0) == ok, (
        f"{name} {args}: rc {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-subject synthetic cohort of 16 x 16 x 4 frames."""
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(str(folder), num_subjects=2, shape=(16, 16, 4), spacing=(6.0, 6.0, 10.0), num_validation=1)
    return folder


def test_make_synthetic_writes_a_cohort_and_overwrites_on_request(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    result = run_script(
        "make_synthetic.py",
        "--output_dir",
        str(out),
        "--num_subjects",
        "2",
        "--shape",
        "[16,16,4]",
        "--num_validation",
        "1",
        cwd=tmp_path,
    )
    assert result.stdout.strip() == str(out / "datalist.json")
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["case"] for e in datalist["training"]] == ["synth000_ED", "synth000_ES"]
    assert [e["case"] for e in datalist["validation"]] == ["synth001_ED", "synth001_ES"]
    for entry in datalist["training"] + datalist["validation"]:
        image, label = nib.load(out / entry["image"]), nib.load(out / entry["label"])
        assert image.shape == label.shape == (16, 16, 4)
        np.testing.assert_array_equal(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}
    # without --overwrite an existing cohort would be kept (ensure_synthetic_cohort); with it, it is written again
    run_script(
        "make_synthetic.py",
        "--output_dir",
        str(out),
        "--num_subjects",
        "3",
        "--shape",
        "[16,16,4]",
        "--phases",
        "ED",
        "--num_validation",
        "1",
        "--overwrite",
        "True",
        cwd=tmp_path,
    )
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["case"] for e in datalist["training"]] == ["synth000_ED", "synth001_ED"]
    assert [e["case"] for e in datalist["validation"]] == ["synth002_ED"]


def test_prepare_datalist_splits_an_acdc_folder_by_patient(tiny_cohort: Path, tmp_path: Path) -> None:
    """patientNNN/patientNNN_frameMM(.nii.gz, _gt.nii.gz), as ACDC ships them; 4 is test, 2 validation."""
    acdc = tmp_path / "acdc"
    for number in range(1, 5):
        patient = acdc / f"patient{number:03d}"
        patient.mkdir(parents=True)
        for frame, phase in ((1, "ED"), (12, "ES")):
            case = f"synth{number % 2:03d}_{phase}"
            shutil.copy(tiny_cohort / f"{case}.nii.gz", patient / f"{patient.name}_frame{frame:02d}.nii.gz")
            shutil.copy(tiny_cohort / f"{case}_gt.nii.gz", patient / f"{patient.name}_frame{frame:02d}_gt.nii.gz")
    output = tmp_path / "lists" / "datalist.json"
    output.parent.mkdir()
    result = run_script("prepare_datalist.py", "--data_dir", str(acdc), "--output", str(output), cwd=tmp_path)
    assert result.stdout.strip() == str(output)
    datalist = json.loads(output.read_text())
    subjects = {part: sorted({e["subject"] for e in datalist[part]}) for part in ("training", "validation", "test")}
    assert subjects == {"training": ["patient001", "patient003"], "validation": ["patient002"], "test": ["patient004"]}
    assert datalist["label_mapping"] == {"1": 3, "2": 2, "3": 1}
    for entry in datalist["training"] + datalist["validation"] + datalist["test"]:
        assert not Path(entry["image"]).is_absolute()
        assert (output.parent / entry["image"]).is_file() and (output.parent / entry["label"]).is_file()
    assert datalist["test"][0] == {
        "image": "../acdc/patient004/patient004_frame01.nii.gz",
        "label": "../acdc/patient004/patient004_frame01_gt.nii.gz",
        "case": "patient004_frame01",
        "subject": "patient004",
        "cardiac_phase": 0.0,  # frame 1 of a cycle whose length no Info.cfg or 4D file gives
        "phase_source": "file name, 30 frames assumed",
    }
    run_script(
        "prepare_datalist.py", "--data_dir", str(acdc), "--output", str(output), "--label_mapping", "None", cwd=tmp_path
    )
    assert json.loads(output.read_text())["label_mapping"] == {}


def test_export_writes_torchscript_of_the_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = NISFNet(**TINY_NET).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    sizes = [arg for key, value in TINY_NET.items() for arg in (f"--{key}", str(value))]
    result = run_script("export.py", "--ckpt_file", str(tmp_path / "model.pt"), *sizes, cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "model.ts")
    extra = {"metadata.json": "", "inference.json": ""}
    exported = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"] == "NISF cardiac short-axis segmentation"
    assert "network_def" in json.loads(extra["inference.json"])
    coords, latent = torch.rand(2, 3, 6, 5, 4) - 0.5, torch.randn(2, 16) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(exported(coords, latent), net(coords, latent), rtol=1e-5, atol=1e-6)


def test_export_writes_torchscript_of_the_localiser(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = localiser_network().eval()
    torch.save(net.state_dict(), tmp_path / "localiser.pt")
    run_script(
        "export.py",
        "--network",
        "localiser",
        "--ckpt_file",
        str(tmp_path / "localiser.pt"),
        "--filepath",
        str(tmp_path / "out" / "loc.ts"),
        cwd=tmp_path,
    )
    exported = torch.jit.load(str(tmp_path / "out" / "loc.ts"))
    slices = torch.rand(3, 1, 32, 48)  # multiples of the network's total stride (16)
    with torch.no_grad():
        torch.testing.assert_close(exported(slices), net(slices))
    missing = run_script(
        "export.py", "--network", "localiser", "--ckpt_file", str(tmp_path / "gone.pt"), cwd=tmp_path, ok=False
    )
    assert "ERROR:" in missing.stderr and "gone.pt: no such checkpoint" in missing.stderr
    wrong = run_script("export.py", "--network", "unet", cwd=tmp_path, ok=False)
    assert wrong.stderr.strip() == "ERROR: network: 'unet' is not a network of this bundle; give 'model' or 'localiser'"
