"""How the bundle's configs are layered. ``train.json`` and ``inference.json`` are complete on their own (MONAI
Label's bundle tasks, ``ckpt_export`` / ``verify_net_in_out`` and the benchmarks read them alone); every other
config overrides one of them. What the two define for both runs is word for word the same, and every run that
reads a datalist takes 4D cine series through the same loading steps."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.transforms import Compose

from nisf_monai.data import generate_subject

# ids that train.json and inference.json both define, with the same value (not dataset_dir: training's default is
# the synthetic cohort, inference's one demo frame)
SHARED = [
    "bundle_root",
    "ckpt_dir",
    "device",
    "amp",
    "seed",
    "label_names",
    "num_classes",
    "latent_dim",
    "hidden_dim",
    "num_layers",
    "activation",
    "coord_dim",
    "assumed_cine_length",
    "coordinate_mode",
    "heart_frame",
    "extent_mm",
    "heart_sigma_mm",
    "heart_reference_volume_ml",
    "localiser_in_plane_mm",
    "network_def",
    "network",
    "allow_missing_inputs",
    "loading_transforms",
    "intensity_scaling",
]

# run -> (configs, datalist id, preprocessing id)
RUNS = {
    "inference": (["inference.json"], "datalist", "preprocessing"),
    "evaluating": (["inference.json", "evaluate.json"], "datalist", "preprocessing"),
    "interpolating": (["inference.json", "evaluate.json", "interpolate.json"], "datalist", "preprocessing"),
    "measuring": (["inference.json", "measure.json"], "datalist", "preprocessing"),
    "sampling_plane": (["inference.json", "plane.json"], "datalist", "preprocessing"),
    "training": (["train.json"], "train#dataset#data", "train#preprocessing"),
    "validation": (["train.json"], "validate#dataset#data", "validate#preprocessing"),
    "localiser": (["train.json", "train_localiser.json"], "localiser#dataset#data", "localiser#preprocessing"),
}


def test_train_and_inference_share_their_common_ids_word_for_word() -> None:
    train, inference = (json.loads((CONFIGS / name).read_text()) for name in ("train.json", "inference.json"))
    for key in SHARED:
        assert train[key] == inference[key], f"{key} differs between train.json and inference.json"


@pytest.fixture(scope="module")
def cine_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a 2-frame 4D cine image with its 4D label, and a datalist listing it in every section."""
    folder = tmp_path_factory.mktemp("cine")
    frames = [generate_subject(3, phase, spacing=(4.0, 4.0, 10.0), shape=(24, 24, 4)) for phase in ("ED", "ES")]
    affine = frames[0][2]
    nib.save(nib.Nifti1Image(np.stack([f[0] for f in frames], -1), affine), str(folder / "cine.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([f[1] for f in frames], -1), affine), str(folder / "cine_gt.nii.gz"))
    entry = [{"image": "cine.nii.gz", "label": "cine_gt.nii.gz"}]
    (folder / "datalist.json").write_text(json.dumps({s: entry for s in ("training", "validation", "test")}))
    return folder


@pytest.mark.parametrize("run", RUNS)
def test_every_run_reads_a_cine_series_frame_by_frame(run: str, cine_data: Path, tmp_path: Path) -> None:
    configs, datalist_id, preprocessing_id = RUNS[run]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    parser["bundle_root"], parser["dataset_dir"] = str(tmp_path), str(cine_data)  # inference lists the folder
    if "datalist_file" in parser.config:  # evaluating, interpolating, measuring
        parser["datalist_file"] = str(cine_data / "datalist.json")
    elif "train" in parser.config:
        parser["datalist"] = str(cine_data / "datalist.json")
    items = parser.get_parsed_content(datalist_id)
    assert [item["frame"] for item in items] == [0, 1]
    preprocessing = parser.get_parsed_content(preprocessing_id)
    for item in items:
        out = preprocessing(dict(item))
        for sample in out if isinstance(out, list) else [out]:
            assert sample["image"].shape[0] == 1, run
            if "label" in sample:
                assert sample["label"].shape[0] == 1, run


@pytest.mark.parametrize("random_crop", [False, True])
def test_localiser_patches_are_centred_or_drawn_from_the_whole_slice(random_crop: bool, tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_localiser.json")])
    parser.update({"bundle_root": str(tmp_path), "localiser_random_crop": random_crop, "localiser_patch": [8, 8]})
    crop = Compose(parser.get_parsed_content("localiser#slicing")[3:5])  # the padding and the crop
    columns = torch.arange(24.0).reshape(1, 1, 24).expand(1, 20, 24)  # each pixel holds its column index
    slice_ = {"image": columns.clone(), "label": columns.clone()}
    starts = set()
    for seed in range(12):
        crop.set_random_state(seed)
        patch = crop(dict(slice_))
        assert patch["image"].shape == (1, 8, 8)
        assert torch.equal(patch["image"], patch["label"])  # image and label cut alike
        starts.add(int(patch["image"][0, 0, 0]))
    if random_crop:  # anywhere the patch fits: first columns 0 .. 16
        assert len(starts) > 3 and max(starts) <= 16
    else:  # the centre, as ResizeWithPadOrCropd gave before the setting
        assert starts == {8}


@pytest.mark.parametrize("power, expected", [(0.0, [1e-3] * 4), (1.0, [1e-3, 7.5e-4, 5e-4, 2.5e-4])])
def test_localiser_learning_rate_decays_by_its_power_over_the_epochs(power, expected, tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_localiser.json")])
    parser.update({"bundle_root": str(tmp_path), "localiser_epochs": 4, "localiser_lr_power": power})
    slices = {"image": torch.rand(2, 1, 32, 32), "label": torch.randint(0, 4, (2, 1, 32, 32))}
    parser["localiser#dataloader"] = [slices]  # one batch an epoch: what is scheduled, not what is learned
    parser["localiser#handlers"] = parser["localiser#handlers"][:1]  # the schedule alone
    trainer = parser.get_parsed_content("localiser#trainer")
    rates = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: rates.append(e.optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert rates == pytest.approx(expected)


@pytest.mark.parametrize("keep", [True, False])
def test_written_labels_keep_each_structures_largest_component(keep: bool, tmp_path: Path) -> None:
    from monai.data import MetaTensor
    from monai.transforms import KeepLargestConnectedComponentd

    for configs in (
        ["inference.json"],
        ["inference.json", "evaluate.json"],
        ["inference.json", "evaluate.json", "interpolate.json"],
    ):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / name) for name in configs])
        parser.update({"bundle_root": str(tmp_path), "keep_largest_component": keep})
        transforms = parser.get_parsed_content("postprocessing").transforms
        cleaners = [t for t in transforms if isinstance(t, KeepLargestConnectedComponentd)]
        assert len(cleaners) == int(keep), configs
        if configs == ["inference.json"]:
            probs = torch.zeros(4, 12, 10, 3)
            probs[0] = 1.0
            probs[:, 1:6, 1:6] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None, None]  # an LV of 75 voxels
            probs[:, 9:11, 7:9] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None, None]  # and a stray one of 12
            labels = Compose([transforms[0], *cleaners])({"pred": MetaTensor(probs)})["pred"]  # labels, cleanup
            assert int((labels == 1).sum()) == (75 if keep else 87)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(tmp_path), "keep_largest_component": keep, "target_spacing": [1.0, 1.0, 1.0]})
    streamed = parser.get_parsed_content("postprocessing").transforms
    assert not any(isinstance(t, KeepLargestConnectedComponentd) for t in streamed)  # the streaming saver's job
    saver = next(h for h in parser.get_parsed_content("handlers") if type(h).__name__ == "StreamingSegmentationSaver")
    assert (saver.cleaner is not None) == keep


# override file -> the configs it follows in --config_file
OVERRIDES = {
    "evaluate.json": ["inference.json"],
    "interpolate.json": ["inference.json", "evaluate.json"],
    "measure.json": ["inference.json"],
    "plane.json": ["inference.json"],
    "multi_gpu_inference.json": ["inference.json"],
    "multi_gpu_train.json": ["train.json"],
    "train_localiser.json": ["train.json"],
}


def _ids(config: dict, prefix: str = "") -> dict:
    """Every id of a config, nested ones as MONAI writes them (``a#b``), with its value."""
    found = {}
    for key, value in config.items():
        name = f"{prefix}#{key}" if prefix else key
        found[name] = value
        if isinstance(value, dict):
            found.update(_ids(value, name))
    return found


@pytest.mark.parametrize("override", sorted(OVERRIDES))
def test_no_override_file_repeats_what_its_base_says(override: str) -> None:
    """An override holds only what differs from the configs it follows: a repeated block would drift from its base."""
    base: dict = {}
    for name in OVERRIDES[override]:
        base.update(_ids(json.loads((CONFIGS / name).read_text())))
    config = json.loads((CONFIGS / override).read_text())
    repeated = [key for key, value in config.items() if key.lstrip("+") in base and base[key.lstrip("+")] == value]
    assert repeated == [], f"{override} repeats {repeated} of {OVERRIDES[override]}"


def test_every_override_file_is_checked() -> None:
    complete = {"train.json", "inference.json", "metadata.json"}
    assert sorted(p.name for p in CONFIGS.glob("*.json") if p.name not in complete) == sorted(OVERRIDES)
