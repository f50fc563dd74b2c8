"""Bad inputs fail with one message naming the file; odd but valid inputs (flipped, oblique, cine) work;
training and inference repeat exactly with the same seed.

Where possible the cases go through the bundle's own training pipeline, built from
``bundle/configs/train.json`` with ``monai.bundle.ConfigParser``, so the tests follow the config.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, TINY_NET_ARGS, run_bundle
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from monai.transforms import LoadImaged

from nisf_monai.data import load_datalist
from nisf_monai.data.datalist import expand_cine_datalist
from nisf_monai.data.synthetic import generate_cohort
from nisf_monai.errors import DatalistError, InputDataError, InvalidCaseError, MissingFileError, find_input_error
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.transforms import CoordinateGridd, CoordinateMapping, LoadCased, SelectFramed, ValidateCased

AFFINE = np.diag([2.0, 2.0, 8.0, 1.0])
SHAPE = (12, 10, 4)
LOADER = "nisf_monai.transforms.LoadCased"


def write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def label(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 2:6, 1:3] = 1
    lab[6:8, 2:6, 1:3] = 2
    lab[8:10, 2:6, 1:3] = 3
    return lab


def truncate(path: str, keep: float = 0.5) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


def train_parser(root: Path, datalist: str | os.PathLike, **overrides: Any) -> ConfigParser:
    """The bundle's training config with a tiny network, its file loader swapped for LoadCased (the config
    change this work proposes; a no-op once the config has it)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    transforms = parser["loading_transforms"]  # the loading steps train#preprocessing starts with
    loader = next(t for t in transforms if t["_target_"] in ("LoadImaged", LOADER))
    loader["_target_"] = LOADER
    settings = {
        "bundle_root": str(root),
        "datalist": str(datalist),
        "max_epochs": 2,
        "num_points": 64,
        "batch_size": 2,
        "hidden_dim": 16,
        "latent_dim": 8,
        "num_layers": 2,
        "resume": False,
    }
    if parser.get("val_interval") is not None:
        settings["val_interval"] = 0  # no validation: these datalists need no validation section
    settings.update(overrides)
    for key, value in settings.items():
        parser[key] = value
    return parser


def write_datalist(folder: Path, entries: list[dict], name: str = "datalist.json", **sections: list) -> Path:
    path = folder / name
    path.write_text(json.dumps({"training": entries, **sections}))
    return path


# ---------------------------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_names_file(tmp_path: Path, suffix: str) -> None:
    """A truncated file fails with one InvalidCaseError line that names it and says it is truncated."""
    path = truncate(write(tmp_path / f"cut{suffix}", image()))
    with pytest.raises(InvalidCaseError) as err:
        LoadCased("image", image_only=True, ensure_channel_first=True)({"image": path})
    message = str(err.value)
    assert message.startswith(f"{path}: cannot read this image") and "truncated" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 30])
@pytest.mark.parametrize("reader", [None, "NibabelReader"])
def test_corrupt_nifti_names_file(tmp_path: Path, content: bytes, reader: str | None) -> None:
    """An empty or garbage file fails with one line naming it, also when a reader is forced (then MONAI
    would raise a RuntimeError pasting each reader's traceback)."""
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(content)
    with pytest.raises(InvalidCaseError, match="broken.nii.gz: cannot read this image") as err:
        LoadCased("image", reader=reader, image_only=True, ensure_channel_first=True)({"image": str(path)})
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_missing_image_file(tmp_path: Path) -> None:
    """A path that does not exist raises MissingFileError naming it."""
    with pytest.raises(MissingFileError, match="gone.nii.gz"):
        LoadCased("image")({"image": str(tmp_path / "gone.nii.gz")})


def test_load_cased_is_a_drop_in_for_load_imaged(tmp_path: Path) -> None:
    """A readable case loads exactly as LoadImaged loads it (data, affine, file name)."""
    files = {"image": write(tmp_path / "a.nii.gz", image()), "label": write(tmp_path / "a_gt.nii.gz", label())}
    ours = LoadCased(["image", "label"], image_only=True, ensure_channel_first=True)(files)
    theirs = LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True)(files)
    for key in files:
        assert torch.equal(ours[key].as_tensor(), theirs[key].as_tensor())
        assert torch.equal(ours[key].affine, theirs[key].affine)
        assert ours[key].meta["filename_or_obj"] == theirs[key].meta["filename_or_obj"]


# ---------------------------------------------------------------------------------------------- through the config

BAD_CASES = {
    "truncated image": (
        lambda d: (truncate(write(d / "bad.nii.gz", image(1))), write(d / "bad_gt.nii.gz", label())),
        "bad.nii.gz: cannot read this image: the file is truncated",
    ),
    "truncated label": (
        lambda d: (write(d / "bad.nii.gz", image(1)), truncate(write(d / "bad_gt.nii.gz", label()), 0.3)),
        "bad_gt.nii.gz: cannot read this image",
    ),
    "shape mismatch": (
        lambda d: (write(d / "bad.nii.gz", image(1)), write(d / "bad_gt.nii.gz", label((12, 10, 5)))),
        "bad_gt.nii.gz: label shape (12, 10, 5) differs from image shape (12, 10, 4)",
    ),
    "affine mismatch": (
        lambda d: (
            write(d / "bad.nii.gz", image(1)),
            write(d / "bad_gt.nii.gz", label(), np.diag([2.0, 2.0, 10.0, 1.0])),
        ),
        "bad_gt.nii.gz: label affine differs",
    ),
    "label outside classes": (
        lambda d: (write(d / "bad.nii.gz", image(1)), write(d / "bad_gt.nii.gz", label() * 2)),
        "bad_gt.nii.gz: label values [4.0, 6.0] are not classes 0..3",
    ),
    "NaN": (
        lambda d: (
            write(d / "bad.nii.gz", np.where(image(1) > 0.9, np.nan, image(1))),
            write(d / "bad_gt.nii.gz", label()),
        ),
        "voxels are NaN or infinite",
    ),
    "Inf": (
        lambda d: (
            write(d / "bad.nii.gz", np.where(image(1) > 0.9, np.inf, image(1))),
            write(d / "bad_gt.nii.gz", label()),
        ),
        "voxels are NaN or infinite",
    ),
    "constant image": (
        lambda d: (write(d / "bad.nii.gz", np.full(SHAPE, 7.0, np.float32)), write(d / "bad_gt.nii.gz", label())),
        "bad.nii.gz: the image is constant",
    ),
    "2D image": (
        lambda d: (write(d / "bad.nii.gz", image(1, (12, 10))), write(d / "bad_gt.nii.gz", label((12, 10, 1))[..., 0])),
        "bad.nii.gz: expected one 3D volume",
    ),
    "4D cine image with a 3D label": (
        lambda d: (write(d / "bad.nii.gz", image(1, (*SHAPE, 3))), write(d / "bad_gt.nii.gz", label())),
        "say which frame it labels",
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD_CASES))
def test_bad_case_in_training_pipeline_names_file(tmp_path: Path, problem: str) -> None:
    """Building the training dataset of train.json over a datalist with one bad case fails; the error
    chain holds one InputDataError whose one-line message names the bad file and the problem."""
    good = {"image": write(tmp_path / "good.nii.gz", image(0)), "label": write(tmp_path / "good_gt.nii.gz", label())}
    bad_image, bad_label = BAD_CASES[problem][0](tmp_path)
    datalist = write_datalist(tmp_path, [good, {"image": bad_image, "label": bad_label}])
    parser = train_parser(tmp_path, datalist)
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("train#dataset")
    found = find_input_error(err.value)
    assert found is not None, f"no InputDataError in {err.value!r}"
    assert BAD_CASES[problem][1] in str(found) and "\n" not in str(found)
    assert str(found).startswith(str(tmp_path / "bad")), str(found)  # names the bad file first


def test_truncated_file_stops_bundle_with_one_line(tmp_path: Path) -> None:
    """Run as a user runs it: a truncated image stops training with one 'ERROR:' line naming it and no
    traceback."""
    good = {"image": write(tmp_path / "good.nii.gz", image(0)), "label": write(tmp_path / "good_gt.nii.gz", label())}
    bad = {
        "image": truncate(write(tmp_path / "cut.nii.gz", image(1))),
        "label": write(tmp_path / "cut_gt.nii.gz", label()),
    }
    datalist = write_datalist(tmp_path, [good, bad])
    result = run_bundle(
        "training",
        "train.json",
        tmp_path,
        "--datalist",
        str(datalist),
        "--max_epochs",
        "1",
        *TINY_NET_ARGS,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"{tmp_path / 'cut.nii.gz'}: cannot read this image: the file is truncated" in errors[0]


# ---------------------------------------------------------------------------------------------- datalists


@pytest.fixture
def two_cases(tmp_path: Path) -> list[dict]:
    return [
        {"image": write(tmp_path / f"c{i}.nii.gz", image(i)), "label": write(tmp_path / f"c{i}_gt.nii.gz", label())}
        for i in range(2)
    ]


def test_empty_validation_section(tmp_path: Path, two_cases: list[dict]) -> None:
    """A validation section that exists but is empty is a DatalistError naming the file and the section;
    the training section of the same file still loads."""
    path = write_datalist(tmp_path, two_cases, validation=[])
    assert len(load_datalist(path, "training")) == 2
    with pytest.raises(DatalistError, match=f"{path}: section 'validation' is empty"):
        load_datalist(path, "validation")


def test_duplicate_case_ids(tmp_path: Path, two_cases: list[dict]) -> None:
    """Two entries with one case ID (the latent table's key) are a DatalistError naming the ID."""
    entries = [dict(two_cases[0], case="p1"), dict(two_cases[1], case="p1")]
    with pytest.raises(DatalistError, match=r"duplicate case IDs \['p1'\]"):
        load_datalist(write_datalist(tmp_path, entries))


def test_missing_file_in_datalist(tmp_path: Path, two_cases: list[dict]) -> None:
    """An entry pointing to nothing is a MissingFileError (a DatalistError) naming the file."""
    entries = [two_cases[0], {"image": "nowhere.nii.gz", "label": two_cases[1]["label"]}]
    with pytest.raises(MissingFileError, match="nowhere.nii.gz does not exist") as err:
        load_datalist(write_datalist(tmp_path, entries))
    assert isinstance(err.value, DatalistError) and isinstance(err.value, InputDataError)


def test_malformed_datalist_json(tmp_path: Path) -> None:
    """A datalist that is not valid JSON is a DatalistError naming it."""
    path = tmp_path / "datalist.json"
    path.write_text('{"training": [')
    with pytest.raises(DatalistError, match="datalist.json"):
        load_datalist(path)


# ---------------------------------------------------------------------------------------------- orientation


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def load_coords(path: str, extent_mm: float = 400.0) -> tuple[MetaTensor, torch.Tensor]:
    d = LoadCased("image", image_only=True, ensure_channel_first=True)({"image": path})
    d = CoordinateGridd("image", extent_mm=extent_mm)(d)
    return d["image"], d["coords"].as_tensor()


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 2)])
def test_flipped_file_gives_same_world_coordinates(tmp_path: Path, axes: tuple[int, ...]) -> None:
    """A volume stored flipped (array reversed along axes, affine adjusted, as a scanner may store it)
    and loaded from NIfTI gives every voxel the coordinates, hence the world position, of the same voxel
    in the original; the intensities follow."""
    affine = np.array([[0.0, -1.5, 0.0, 40.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 8.0, 7.0], [0, 0, 0, 1]])
    data = image(3)
    flip = np.eye(4)
    for a in axes:
        flip[a, a], flip[a, 3] = -1.0, SHAPE[a] - 1
    img, coords = load_coords(write(tmp_path / "a.nii.gz", data, affine))
    img_f, coords_f = load_coords(write(tmp_path / "a_flipped.nii.gz", np.flip(data, axes).copy(), affine @ flip))
    back = [a + 1 for a in axes]  # channel-first
    torch.testing.assert_close(coords_f.flip(back), coords, rtol=0, atol=1e-6)
    torch.testing.assert_close(img_f.as_tensor().flip(back), img.as_tensor(), rtol=0, atol=0)
    # world positions of the flipped file's voxels: its own affine @ index, recovered from the coordinates
    mapping = CoordinateMapping(img_f.affine, SHAPE)
    world = coords_f.reshape(3, -1).T.double() * 400.0 + mapping.centre
    index = np.stack(np.unravel_index(np.arange(np.prod(SHAPE)), SHAPE), -1)
    np.testing.assert_allclose(world.numpy(), index @ (affine @ flip)[:3, :3].T + (affine @ flip)[:3, 3], atol=1e-3)
    assert (coords_f - coords).abs().max() > 1e-3  # the files really differ


def test_oblique_file_gives_rotated_coordinates(tmp_path: Path) -> None:
    """A volume on an oblique grid (axes rotated by R) gets the coordinates of the axis-aligned grid of the
    same spacing rotated by R; an oblique file is not treated as axis-aligned."""
    spacing = np.diag([1.5, 1.25, 8.0])
    r = rotation((0.3, -0.5, 1.1))
    straight = np.eye(4)
    straight[:3, :3], straight[:3, 3] = spacing, [10.0, -5.0, 3.0]
    oblique = np.eye(4)
    oblique[:3, :3], oblique[:3, 3] = r @ spacing, [-30.0, 12.0, 50.0]
    _, c_straight = load_coords(write(tmp_path / "straight.nii.gz", image(4), straight))
    _, c_oblique = load_coords(write(tmp_path / "oblique.nii.gz", image(4), oblique))
    rotated = torch.einsum("ij,j...->i...", torch.as_tensor(r, dtype=torch.float32), c_straight)
    torch.testing.assert_close(c_oblique, rotated, rtol=0, atol=1e-6)
    # and by hand: R @ spacing @ (index - centre index) / extent
    i, j, k = (5, 7, 2)
    expected = r @ spacing @ (np.array([i, j, k]) - (np.array(SHAPE) - 1) / 2) / 400.0
    np.testing.assert_allclose(c_oblique[:, i, j, k].numpy(), expected, atol=1e-6)
    assert (c_oblique - c_straight).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- cine


@pytest.fixture
def cine(tmp_path: Path) -> dict[str, Any]:
    """A 4D cine image of 3 frames with a 4D label, a 4D image labelled at one frame (3D label), and a
    3D case."""
    series = np.stack([image(10 + t) for t in range(3)], axis=-1)
    labels = np.stack([np.roll(label(), t, axis=0) for t in range(3)], axis=-1)
    return {
        "series": series,
        "labels": labels,
        "full": {"image": write(tmp_path / "cine.nii.gz", series), "label": write(tmp_path / "cine_gt.nii.gz", labels)},
        "one": {
            "image": write(tmp_path / "cine2.nii.gz", series),
            "label": write(tmp_path / "cine2_ed_gt.nii.gz", labels[..., 1]),
            "frames": [1],
        },
        "flat": {
            "image": write(tmp_path / "flat.nii.gz", image(20)),
            "label": write(tmp_path / "flat_gt.nii.gz", label()),
        },
    }


def test_expand_cine_datalist(cine: dict[str, Any]) -> None:
    """Each frame of a 4D entry becomes an entry with its frame index and case ID; the subject is shared;
    a 3D label needs its one frame; a 3D entry keeps its case as frame 0. All entries get the same keys,
    so batches mixing them collate."""
    items = expand_cine_datalist([dict(cine["full"], subject="p1"), cine["one"], cine["flat"]])
    assert [(i["frame"], i["case"]) for i in items] == [
        (0, "cine_t00"),
        (1, "cine_t01"),
        (2, "cine_t02"),
        (1, "cine2_t01"),
        (0, "flat"),
    ]
    assert (
        {i["subject"] for i in items[:3]} == {"p1"} and items[3]["subject"] == "cine2" and items[4]["subject"] == "flat"
    )
    assert len({frozenset(i) for i in items}) == 1, [sorted(i) for i in items]
    assert items[4]["image"] == cine["flat"]["image"] and items[4]["label"] == cine["flat"]["label"]
    load = LoadCased(["image", "label"], image_only=True, ensure_channel_first=True)
    batch = list_data_collate([SelectFramed(["image", "label"])(load(items[k])) for k in (4, 1)])  # 3D with cine
    assert batch["image"].shape == (2, 1, *SHAPE) and batch["frame"].tolist() == [0, 1]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"frames": [3]}, r"frames \[3\] requested, the series has frames 0..2"),
        ({"image": "flat", "frames": [1]}, r"frames \[1\] requested, the series has frames 0..0"),
        ({"frames": [0, 1], "label": "3d"}, "say which frame it labels"),
        ({"label": "4d_other"}, "label has 2 frames, its image"),
    ],
)
def test_expand_cine_datalist_errors(cine: dict[str, Any], tmp_path: Path, change: dict, message: str) -> None:
    """Impossible frame requests are DatalistErrors naming the file."""
    entry = dict(cine["full"], **change)
    if change.get("image") == "flat":
        entry = dict(cine["flat"], frames=change["frames"])
    if change.get("label") == "3d":
        entry["label"] = cine["one"]["label"]
    elif change.get("label") == "4d_other":
        entry["label"] = write(tmp_path / "short_gt.nii.gz", cine["labels"][..., :2])
    with pytest.raises(DatalistError, match=message):
        expand_cine_datalist([entry])


def test_training_config_trains_on_cine_series(cine: dict[str, Any], tmp_path: Path) -> None:
    """train.json expands a 4D cine entry into one sample per frame, each (1, X, Y, Z) with its own case ID."""
    datalist = write_datalist(tmp_path, [cine["full"], cine["flat"]])
    dataset = train_parser(tmp_path, datalist).get_parsed_content("train#dataset")
    assert sorted(item["case"] for item in dataset.data) == ["cine_t00", "cine_t01", "cine_t02", "flat"]
    for sample in dataset:
        assert sample["coords"].shape[0] == 3 and sample["image"].shape[0] == 1 and sample["label"].shape[0] == 1


def test_cine_frames_load_as_3d_volumes(cine: dict[str, Any]) -> None:
    """LoadCased + SelectFramed + ValidateCased turns each expanded entry into (1, X, Y, Z) holding that
    frame of image and label, with the file's affine; unexpanded, the 4D file is rejected."""
    load = LoadCased(["image", "label"], image_only=True, ensure_channel_first=True)
    select, validate = SelectFramed(["image", "label"]), ValidateCased(num_classes=4)
    for item in expand_cine_datalist([cine["full"], cine["one"]]):
        d = validate(select(load(item)))
        t = item["frame"]
        assert d["image"].shape == (1, *SHAPE) and d["label"].shape == (1, *SHAPE)
        np.testing.assert_array_equal(d["image"][0].numpy(), cine["series"][..., t])
        np.testing.assert_array_equal(d["label"][0].numpy(), cine["labels"][..., t])
        np.testing.assert_allclose(d["image"].affine.numpy(), AFFINE)
    with pytest.raises(InvalidCaseError, match="cine.nii.gz.*4D cine series of 3 frames"):
        validate(load(cine["full"]))
    with pytest.raises(InvalidCaseError, match="frame 5 requested but the series has 3 frames"):
        select(load(dict(cine["full"], frame=5)))


def test_cine_trains_through_bundle_config(cine: dict[str, Any], tmp_path: Path) -> None:
    """train.json with the two proposed cine lines (expand the datalist, select the frame) trains one
    code per frame of a 4D series."""
    datalist = write_datalist(tmp_path, [cine["full"], cine["one"], cine["flat"]])
    parser = train_parser(tmp_path / "bundle", datalist, max_epochs=1)
    parser["train"]["dataset"]["data"] = (
        "$nisf_monai.data.datalist.expand_cine_datalist(nisf_monai.data.load_datalist(@datalist, 'training'))"
    )
    transforms = parser["loading_transforms"]
    index = next(i for i, t in enumerate(transforms) if t["_target_"] == LOADER)
    transforms.insert(index + 1, {"_target_": "nisf_monai.transforms.SelectFramed", "keys": ["image", "label"]})
    parser.get_parsed_content("train#trainer").run()
    table = parser.get_parsed_content("train#latents")
    assert table.case_ids == ["cine2_t01", "cine_t00", "cine_t01", "cine_t02", "flat"]
    assert torch.load(tmp_path / "bundle" / "models" / "training_state.pt", weights_only=True)["trainer"]["epoch"] == 1


# ---------------------------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> str:
    return generate_cohort(
        str(tmp_path_factory.mktemp("cohort")),
        num_subjects=3,
        shape=(24, 24, 4),
        spacing=(4.0, 4.0, 10.0),
        num_validation=1,
    )


def train_in_process(
    root: Path, datalist: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.nn.Module]:
    """Two epochs of the bundle's trainer, built from train.json as ``monai.bundle run`` builds it
    (``initialize`` first, which seeds everything); returns the codes and the network."""
    monkeypatch.setenv("CI", "true")  # no progress bar
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # `initialize` installs a hook; restore it after
    parser = train_parser(root, datalist, seed=seed)
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("train#trainer").run()
    return parser.get_parsed_content("train#latents").weight.detach().clone(), parser.get_parsed_content("network")


def test_same_seed_same_training_and_segmentation(cohort: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed: the same latent table after 2 epochs and the same segmentation (and fitted code) from
    LatentOptimisationInferer; another seed gives another table, so the comparison is not vacuous."""
    codes_a, net_a = train_in_process(tmp_path / "a", cohort, 0, monkeypatch)
    codes_b, net_b = train_in_process(tmp_path / "b", cohort, 0, monkeypatch)
    codes_c, _ = train_in_process(tmp_path / "c", cohort, 1, monkeypatch)
    torch.testing.assert_close(codes_a, codes_b, rtol=0, atol=0)
    for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(codes_a, codes_c)

    entry = load_datalist(cohort, "validation")[0]
    loaded = LoadCased("image", image_only=True, ensure_channel_first=True)({"image": entry["image"]})["image"]
    scaled = (loaded - loaded.min()) / (loaded.max() - loaded.min())
    batch = scaled[None]
    outputs = []
    for net in (net_a, net_b):  # global RNGs are not reset in between: the inferer must not depend on them
        inferer = LatentOptimisationInferer(num_steps=5, num_points=64, seed=0, log_every=0)
        outputs.append(inferer.fit_and_sample(copy.deepcopy(batch), net))
    torch.testing.assert_close(outputs[0]["latent"], outputs[1]["latent"], rtol=0, atol=0)
    assert torch.equal(outputs[0]["pred"].as_tensor(), outputs[1]["pred"].as_tensor())
    assert torch.equal(outputs[0]["recon"].as_tensor(), outputs[1]["recon"].as_tensor())
