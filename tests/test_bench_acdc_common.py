"""The ACDC bench's shared helper (``benchmarks/acdc_common.py``) and its entry point (``benchmarks/acdc.py``): the
shared options parse the same way for every subcommand, Dice is MONAI's, and every subcommand names a module there."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import acdc  # noqa: E402
import acdc_common  # noqa: E402


def test_shared_options_parse_alike() -> None:
    parser = argparse.ArgumentParser()
    acdc_common.add_options(parser, "data", "frames", "offset", "steps", "tag", "set", "threads", frames=10)
    args = parser.parse_args(["--offset", "10", "--set", "num_points=4096", "--set", "heart_sigma_mm=null"])
    assert (args.frames, args.offset, args.threads, args.tag) == (10, 10, 1, "")
    assert acdc_common.steps_of(args.steps) == [0, 50, 100, 200, 400]
    assert acdc_common.parse_overrides(args.set) == {"num_points": 4096, "heart_sigma_mm": None}
    assert acdc_common.parse_overrides(['localiser_path="/a/b.pt"', "name=plain"]) == {
        "localiser_path": "/a/b.pt",
        "name": "plain",
    }


def test_dice_of_known_overlap() -> None:
    """LV: 2 voxels each, 1 shared (0.5); myocardium identical (1); RV absent from both (NaN: not scored)."""
    pred = torch.tensor([[1, 1, 2, 0], [0, 0, 2, 0]])
    label = torch.tensor([[1, 0, 2, 0], [1, 0, 2, 0]])
    dice = acdc_common.dice_of(pred, label)
    assert dice[:2] == pytest.approx([0.5, 1.0])
    assert np.isnan(dice[2])


def test_write_record_and_frames(tmp_path) -> None:
    path = acdc_common.write_record(tmp_path / "a" / "record.json", {"mean": 0.5})
    assert json.loads(path.read_text()) == {"mean": 0.5}
    for i in range(5):
        (tmp_path / f"{i}.nii.gz").touch()
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "validation": [
                    {"image": str(tmp_path / f"{i}.nii.gz"), "label": str(tmp_path / f"{i}.nii.gz"), "case": str(i)}
                    for i in range(5)
                ]
            }
        )
    )
    frames = acdc_common.frames_of(str(datalist), "validation", frames=2, offset=3)
    assert [f["case"] for f in frames] == ["3", "4"]


def test_every_subcommand_has_its_module() -> None:
    for name, (module, _, _) in acdc.SUBCOMMANDS.items():
        assert importlib.util.find_spec(module) is not None, f"{name}: no benchmarks/{module}.py"
        assert (REPO / "benchmarks" / f"{module}.py").is_file()


def test_older_fit_settings_become_the_inferers_parts() -> None:
    """``--set localiser_weight=3 --set heart_sigma_mm=25`` of older runs still configures the validation inferer."""
    from monai.bundle import ConfigParser

    from nisf_monai.inferers import HeartWeighting, IntensityTerm, LocaliserGuide

    overrides = acdc_common.fit_overrides(
        {"num_steps": 3, "localiser_weight": 3.0, "heart_sigma_mm": 25, "draw_near_heart": False}
    )
    assert set(overrides) == {"num_steps", "fit_terms", "fit_weighting"}
    parser = ConfigParser()
    parser.read_config(str(acdc_common.CONFIGS / "train.json"))
    for key, value in overrides.items():
        parser[f"validate#inferer#{key}"] = value
    inferer = parser.get_parsed_content("validate#inferer")
    assert inferer.num_steps == 3 and inferer.fit_terms == [IntensityTerm(), LocaliserGuide(3.0)]
    assert inferer.fit_weighting == HeartWeighting(25.0, draw=False)
    assert acdc_common.fit_overrides({"heart_sigma_mm": None})["fit_weighting"] is None
