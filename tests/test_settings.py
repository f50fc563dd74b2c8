"""Bad settings fail fast: every run checks its settings in ``initialize``, before any image is read or any code
fitted, and a wrong value stops it with one line ``ERROR: <setting>: <what is wrong>; <what would be accepted>``."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, REPO, bundle_command, run_command
from monai.bundle import ConfigParser

from nisf_monai.errors import InputDataError, SettingsError, find_input_error
from nisf_monai.settings import CHECKS, available_devices, check_output_dir, check_settings

DEVICES = "give one of the devices of this machine: " + ", ".join(available_devices())
SPACING = (
    "give 3 positive millimetre values such as [1.0, 1.0, 1.0], or one for every axis, or None to keep the input grid"
)
STEPS = "give an integer number of latent optimisation steps (0 decodes the initial code), 0 or more"
POINTS = "give an integer number of points per image and step, 1 or more, or None for every voxel"
BATCH = "give an integer number of images per batch, 1 or more"
NO_CUDA = not torch.cuda.is_available()

# (setting, value as the command line delivers it, the whole message)
BAD = [
    ("target_spacing", [0, 1, 1], f"target_spacing: [0, 1, 1] has a value that is not positive; {SPACING}"),
    ("target_spacing", [1, -1.5, 1], f"target_spacing: [1, -1.5, 1] has a value that is not positive; {SPACING}"),
    ("target_spacing", [1, 1], f"target_spacing: [1, 1] has 2 value(s); {SPACING}"),
    ("target_spacing", [1, float("inf"), 1], f"target_spacing: [1, inf, 1] has a value that is not finite; {SPACING}"),
    (
        "target_spacing",
        "null",
        f"target_spacing: 'null' is not a spacing (write None, not null, on the command line); {SPACING}",
    ),
    ("target_spacing", "1mm", f"target_spacing: '1mm' is not a spacing; {SPACING}"),
    ("target_spacing", [1, "a", 1], f"target_spacing: [1, 'a', 1] is not a list of numbers; {SPACING}"),
    (
        "measure_spacing",
        0,
        "measure_spacing: 0 has a value that is not positive; give 3 positive millimetre values such as "
        "[1.0, 1.0, 1.0], or one for every axis, or None to read on the acquired grid",
    ),
    (
        "plane_spacing",
        [1, 1, 1, 1],
        "plane_spacing: [1, 1, 1, 1] has 4 value(s); give 2 or 3 positive millimetre values such "
        "as [1.0, 1.0, 1.0], or one for every axis",
    ),
    ("inference_steps", -3, f"inference_steps: -3 is negative; {STEPS}"),
    ("inference_steps", "abc", f"inference_steps: 'abc' is not an integer; {STEPS}"),
    ("inference_steps", 100.0, f"inference_steps: 100.0 is not an integer; {STEPS}"),
    ("val_max_steps", -1, f"val_max_steps: -1 is negative; {STEPS}"),
    (
        "monitor_every",
        -25,
        "monitor_every: -25 is negative; give an integer number of latent steps between Dice records "
        "(0 turns them off), 0 or more",
    ),
    ("max_epochs", 0, "max_epochs: 0 is less than 1; give an integer number of epochs, 1 or more"),
    (
        "val_interval",
        -1,
        "val_interval: -1 is negative; give an integer number of epochs between validations "
        "(0 turns validation off), 0 or more",
    ),
    ("num_points", 0, f"num_points: 0 is less than 1; {POINTS}"),
    ("num_points", 2.5, f"num_points: 2.5 is not an integer; {POINTS}"),
    (
        "num_points",
        "none",
        f"num_points: 'none' is not an integer (write None, not null, on the command line); {POINTS}",
    ),
    ("foreground_fraction", 1.5, "foreground_fraction: 1.5 is outside [0, 1]; give a number in [0, 1], such as 0.5"),
    (
        "point_fraction",
        0,
        "point_fraction: 0 is outside (0, 1]; give a number in (0, 1], such as 0.5 (1 keeps everything)",
    ),
    ("batch_size", 0, f"batch_size: 0 is less than 1; {BATCH}"),
    ("batch_size", -2, f"batch_size: -2 is less than 1; {BATCH}"),
    ("batch_size", True, f"batch_size: True is not an integer; {BATCH}"),
    ("val_batch_size", 4.0, f"val_batch_size: 4.0 is not an integer; {BATCH}"),
    ("device", "gpu", f"device: 'gpu' is not a torch device; {DEVICES}"),
    ("device", [0], f"device: [0] is not a device; {DEVICES}"),
    (
        "stream_outputs",
        "false",
        "stream_outputs: 'false' is text, not True or False; give True or False, capitalised on the "
        "command line (e.g. --stream_outputs False)",
    ),
    (
        "amp",
        "true",
        "amp: 'true' is text, not True or False; give True or False, capitalised on the command line (e.g. --amp True)",
    ),
    (
        "save_images",
        1,
        "save_images: 1 is not True or False; give True or False, capitalised on the command line "
        "(e.g. --save_images True)",
    ),
    (
        "roi_margin_mm",
        -5,
        "roi_margin_mm: -5 is negative; give a number of mm, 0 or more, or None to read the whole slab",
    ),
    ("localiser_weight", -1, "localiser_weight: -1 is negative; give a number, 0 or more"),
    (
        "onednn_primitive_cache",
        -1,
        "onednn_primitive_cache: -1 is negative; give an integer number of oneDNN primitives kept, 0 or more",
    ),
    ("localiser_blend", 1.5, "localiser_blend: 1.5 is outside [0, 1]; give a number in [0, 1], such as 0.5"),
    (
        "localiser_blend_hidden",
        "false",
        "localiser_blend_hidden: 'false' is text, not True or False; give True or False, capitalised on the command "
        "line (e.g. --localiser_blend_hidden False)",
    ),
    ("localiser_lr_power", -0.9, "localiser_lr_power: -0.9 is negative; give a number, 0 or more"),
    (
        "keep_largest_component",
        "false",
        "keep_largest_component: 'false' is text, not True or False; give True or False, capitalised on the command "
        "line (e.g. --keep_largest_component False)",
    ),
    (
        "localiser_random_crop",
        "true",
        "localiser_random_crop: 'true' is text, not True or False; give True or False, capitalised on the command "
        "line (e.g. --localiser_random_crop True)",
    ),
    (
        "localiser_rotations",
        [],
        "localiser_rotations: [] has no angle; give a list of one or more angles in radians, "
        "such as [0.0, 0.15, -0.15] ([0.0]: no turn)",
    ),
    (
        "localiser_zooms",
        [1.0, 0.0],
        "localiser_zooms: [1.0, 0.0] has a value that is not positive; give a list of one or more positive factors, "
        "such as [1.0, 0.9, 1.1] ([1.0]: no zoom)",
    ),
    (
        "localiser_rotations",
        0.15,
        "localiser_rotations: 0.15 is not a list of angles; give a list of one or more angles in radians, such as "
        "[0.0, 0.15, -0.15] ([0.0]: no turn)",
    ),
    (
        "heart_sigma_mm",
        -40,
        "heart_sigma_mm: -40 is negative; give a number of mm, 0 or more, or None to weigh every voxel alike",
    ),
    (
        "heart_reference_volume_ml",
        0,
        "heart_reference_volume_ml: 0 is zero; give a number of ml, above 0, or None to keep each heart's own size",
    ),
    (
        "volume_mode",
        "soft",
        "volume_mode: 'soft' is not one of the accepted values; give one of 'label', 'probability'",
    ),
    (
        "measure_source",
        "manual",
        "measure_source: 'manual' is not one of the accepted values; give one of 'nisf', 'labels'",
    ),
    (
        "measure_blend",
        "yes",
        "measure_blend: 'yes' is text, not True or False; give True or False, capitalised on the command line"
        " (e.g. --measure_blend True)",
    ),
    (
        "mesh_format",
        "ply",
        "mesh_format: 'ply' is not one of the accepted values; give one of 'vtk', 'stl', 'obj', or None for no meshes",
    ),
]
if NO_CUDA:
    BAD += [
        ("device", "cuda", f"device: cuda is not available (torch finds no CUDA GPU here); {DEVICES}"),
        ("device", "cuda:1", f"device: cuda:1 is not available (torch finds no CUDA GPU here); {DEVICES}"),
        ("device", 0, f"device: 0 names a GPU and torch finds no CUDA GPU here; {DEVICES}"),
    ]

GOOD = [
    ("target_spacing", None),
    ("target_spacing", 1.5),
    ("target_spacing", [1, 1, 2.5]),
    ("target_spacing", (0.5, 0.5, 0.5)),
    ("measure_spacing", None),
    ("plane_spacing", [0.5, 2.0]),
    ("inference_steps", 0),
    ("inference_steps", np.int64(300)),
    ("monitor_every", 0),
    ("val_interval", 0),
    ("max_epochs", 1),
    ("num_points", None),
    ("num_points", 1),
    ("batch_size", 1),
    ("val_batch_size", 16),
    ("foreground_fraction", 0),
    ("foreground_fraction", 1.0),
    ("point_fraction", 1),
    ("point_fraction", 0.05),
    ("device", "cpu"),
    ("device", torch.device("cpu")),
    ("amp", False),
    ("stream_outputs", True),
    ("save_images", np.bool_(True)),
    ("roi_margin_mm", None),
    ("roi_margin_mm", 0),
    ("localiser_weight", 0),
    ("localiser_weight", 3.0),
    ("localiser_blend", 0),
    ("localiser_blend", 0.5),
    ("localiser_blend_hidden", False),
    ("localiser_lr_power", 0.9),
    ("localiser_random_crop", True),
    ("keep_largest_component", False),
    ("localiser_rotations", [0.0]),
    ("localiser_zooms", [1.0]),
    ("localiser_zooms", [1.0, 0.9, 1.1]),
    ("localiser_rotations", [0.0, 0.15, -0.15]),
    ("heart_sigma_mm", None),
    ("heart_sigma_mm", 40.0),
    ("heart_reference_volume_ml", None),
    ("heart_reference_volume_ml", 250.0),
    ("volume_mode", "probability"),
    ("measure_source", "labels"),
    ("measure_blend", True),
    ("mesh_format", None),
    ("mesh_format", "stl"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_value_gives_one_line_naming_setting_problem_and_remedy(name: str, value: Any, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        check_settings({name: value})
    assert str(err.value) == message
    assert err.value.setting == name and isinstance(err.value, InputDataError)


@pytest.mark.parametrize("name,value", GOOD, ids=[f"{n}={v!r}" for n, v in GOOD])
def test_good_value_passes(name: str, value: Any) -> None:
    check_settings({name: value})


def test_unknown_setting_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="no check for setting"):
        check_settings({"target_spacng": [1, 1, 1]})


# ---------------------------------------------------------------------------------------------- output folders


def test_output_dir_is_created_with_its_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    check_settings({"output_dir": str(out)})
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is gone


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(SettingsError) as err:
        check_settings({"output_dir": str(tmp_path / "results")})
    assert str(err.value) == (
        f"output_dir: {tmp_path / 'results'} is a file, not a folder; give a folder you can "
        "write to (it is created if missing)"
    )


def test_output_dir_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(SettingsError) as err:
        check_settings({"ckpt_dir": str(tmp_path / "results" / "models")})
    assert str(err.value) == (
        f"ckpt_dir: cannot create {tmp_path / 'results' / 'models'} (Not a directory); give a "
        "folder you can write to (it is created if missing)"
    )


def _writable(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """A folder this process cannot write to: a read-only one, or (as root, who may write anywhere on a normal
    file system) a folder of sysfs."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if not _writable(folder):
            yield folder
        elif Path("/sys/kernel").is_dir() and not _writable(Path("/sys/kernel")):
            yield Path("/sys/kernel")
        else:
            pytest.skip("no folder this process cannot write to")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_output_dir_that_is_not_writable_is_refused(unwritable_dir: Path) -> None:
    with pytest.raises(SettingsError) as err:
        check_settings({"output_dir": str(unwritable_dir)})
    assert str(err.value).startswith(f"output_dir: {unwritable_dir} is not writable (")
    assert str(err.value).endswith("); give a folder you can write to (it is created if missing)")


def test_folders_are_checked_last_so_a_refused_run_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="^batch_size"):
        check_settings({"output_dir": str(tmp_path / "out"), "batch_size": 0})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- through the configs

CONFIG_SETS = {
    "inference": ["inference.json"],
    "evaluating": ["inference.json", "evaluate.json"],
    "interpolating": ["inference.json", "evaluate.json", "interpolate.json"],
    "sampling_plane": ["inference.json", "plane.json"],
    "measuring": ["inference.json", "measure.json"],
    "training": ["train.json"],
    "multi_gpu_training": ["train.json", "multi_gpu_train.json"],
}


def test_every_check_is_reachable_from_a_config() -> None:
    """Each check in CHECKS is used by some config's ``checked_settings``, and every id checked there is a
    setting of that config."""
    used: set[str] = set()
    for files in CONFIG_SETS.values():
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        checked = parser["checked_settings"]
        assert all(value == f"@{name}" for name, value in checked.items()), checked
        assert all(name in parser for name in checked)
        used |= set(checked)
    # the localiser's run checks its own ids under the trainer's names (batch_size: @localiser_batch_size, ...)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.json", "train_localiser.json")])
    checked = parser["checked_settings"]
    assert all(str(value).startswith("@") and str(value)[1:] in parser for value in checked.values()), checked
    used |= set(checked)
    assert used == set(CHECKS)


def bundle_parser(run: str, root: Path, **overrides: Any) -> ConfigParser:
    """A run's merged configs as ``monai.bundle run`` reads them, with a bundle root and data folder that do not
    exist: if anything read or generated data, they would appear (or the run would fail on them)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in CONFIG_SETS[run]])
    parser.update({"bundle_root": str(root), "dataset_dir": str(root / "no_data_here"), **overrides})
    return parser


@pytest.mark.parametrize("run", [r for r in CONFIG_SETS if r != "multi_gpu_training"])
def test_initialize_checks_defaults_without_touching_data(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run's ``initialize`` passes with the config's own defaults and reads no data: the data folder (which
    ``ensure_synthetic_cohort`` would generate) is never created and the datalist is never resolved."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # `initialize` installs a hook; restore it after
    root = tmp_path / "bundle"
    parser = bundle_parser(run, root)
    parser.get_parsed_content("initialize")
    assert not (root / "no_data_here").exists()
    assert "datalist" not in parser.ref_resolver.resolved_content
    assert (root / ("logs" if run == "training" else "eval")).is_dir()  # output_dir was checked (and created)


@pytest.mark.parametrize(
    "run,override,message",
    [
        (
            "inference",
            {"target_spacing": [0, 1, 1]},
            f"target_spacing: [0, 1, 1] has a value that is not positive; {SPACING}",
        ),
        ("evaluating", {"monitor_every": -1}, "monitor_every: -1 is negative"),
        ("interpolating", {"point_fraction": 2.0}, "point_fraction: 2.0 is outside (0, 1]"),
        ("sampling_plane", {"plane_spacing": [1, 0]}, "plane_spacing: [1, 0] has a value that is not positive"),
        ("measuring", {"mesh_format": "ply"}, "mesh_format: 'ply' is not one of the accepted values"),
        ("training", {"val_batch_size": 0}, "val_batch_size: 0 is less than 1"),
        ("training", {"device": "cuda:9"}, "device: cuda:9"),
    ],
)
def test_initialize_refuses_a_bad_value_of_each_run(
    run: str, override: dict, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    root = tmp_path / "bundle"
    parser = bundle_parser(run, root, **override)
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("initialize")
    found = find_input_error(err.value)
    assert isinstance(found, SettingsError) and str(found).startswith(message), repr(err.value)
    assert not root.exists()  # nothing created, nothing read


def test_multi_gpu_initialize_checks_before_joining_the_process_group(tmp_path: Path) -> None:
    """Under torchrun a bad value must stop each process before it waits for the others in
    ``init_process_group``; the merged ``checked_settings`` resolve and pass."""
    parser = bundle_parser("multi_gpu_training", tmp_path / "bundle")
    steps = parser["initialize"]
    check = steps.index("$nisf_monai.settings.check_settings(@checked_settings)")
    assert check < next(i for i, s in enumerate(steps) if "init_process_group" in s)
    check_settings(parser.get_parsed_content("checked_settings"))
    assert check_output_dir("output_dir", tmp_path / "bundle" / "logs").is_dir()


# ---------------------------------------------------------------------------------------------- as a user runs them


def truncated_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32), np.eye(4)), str(path))
    path.write_bytes(path.read_bytes()[:100])
    return path


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """Exit code 1, stderr exactly the one ``ERROR:`` line, no traceback anywhere, and no data read (the image
    folders hold a truncated file, which would be logged as skipped)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and lines == [f"ERROR: {expected}"], result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert "skipping case" not in result.stdout and "generated a synthetic cohort" not in result.stdout


def test_inference_with_a_zero_spacing_stops_before_reading_data(tmp_path: Path) -> None:
    data = truncated_image(tmp_path / "data").parent
    cmd = bundle_command(
        "inference",
        ["inference.json"],
        REPO / "bundle",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--target_spacing",
        "[0, 1, 1]",
    )
    result = run_command(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert_one_error_line(result, f"target_spacing: [0, 1, 1] has a value that is not positive; {SPACING}")
    assert not (tmp_path / "out").exists()


def test_inference_into_a_file_is_refused(tmp_path: Path) -> None:
    data = truncated_image(tmp_path / "data").parent
    (tmp_path / "out.txt").write_text("a file")
    cmd = bundle_command(
        "inference",
        ["inference.json"],
        REPO / "bundle",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out.txt"),
    )
    result = run_command(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert_one_error_line(
        result,
        f"output_dir: {tmp_path / 'out.txt'} is a file, not a folder; give a "
        "folder you can write to (it is created if missing)",
    )


def test_evaluating_with_batch_size_zero_is_refused(tmp_path: Path) -> None:
    cmd = bundle_command(
        "evaluating",
        ["inference.json", "evaluate.json"],
        REPO / "bundle",
        "--dataset_dir",
        str(tmp_path / "cohort"),
        "--output_dir",
        str(tmp_path / "out"),
        "--batch_size",
        "0",
    )
    result = run_command(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert_one_error_line(result, f"batch_size: 0 is less than 1; {BATCH}")
    assert not (tmp_path / "cohort").exists()  # the synthetic cohort was not generated either


def test_training_with_no_points_is_refused(tmp_path: Path) -> None:
    cmd = bundle_command("training", ["train.json"], tmp_path / "bundle", "--num_points", "0")
    result = run_command(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert_one_error_line(result, f"num_points: 0 is less than 1; {POINTS}")
    assert not (tmp_path / "bundle").exists()


def test_cli_plane_with_a_bad_device_is_refused(tmp_path: Path) -> None:
    image = truncated_image(tmp_path / "data")
    cmd = [
        sys.executable,
        "-m",
        "nisf_monai.cli",
        "plane",
        str(image),
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "gpu",
    ]
    result = run_command(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert_one_error_line(result, f"device: 'gpu' is not a torch device; {DEVICES}")
