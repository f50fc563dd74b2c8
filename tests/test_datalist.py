"""Unit tests of datalist loading and image listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nisf_monai.data import case_name, list_images, load_datalist


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_datalist(folder: Path, content: dict, name: str = "datalist.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """A folder holding data/ with two image/label pairs."""
    for case in ("patient001_frame01", "patient002_frame01"):
        touch(tmp_path / "data" / f"{case}.nii.gz")
        touch(tmp_path / "data" / f"{case}_gt.nii.gz")
    return tmp_path


def entry(name: str, **extra) -> dict:
    return {"image": f"data/{name}.nii.gz", "label": f"data/{name}_gt.nii.gz", **extra}


def test_relative_paths_resolved_and_ids_filled(cohort: Path, monkeypatch) -> None:
    """Relative paths resolve against the datalist's folder (not the working directory); case is the
    image's file name and subject defaults to case."""
    path = write_datalist(cohort, {"training": [entry("patient001_frame01"), entry("patient002_frame01")]})
    monkeypatch.chdir(cohort / "data")  # a working directory where the relative paths would not exist
    items = load_datalist(path)
    assert [Path(i["image"]) for i in items] == [
        cohort / "data" / "patient001_frame01.nii.gz",
        cohort / "data" / "patient002_frame01.nii.gz",
    ]
    assert Path(items[0]["label"]) == cohort / "data" / "patient001_frame01_gt.nii.gz"
    assert [i["case"] for i in items] == ["patient001_frame01", "patient002_frame01"]
    assert [i["subject"] for i in items] == ["patient001_frame01", "patient002_frame01"]


def test_explicit_case_and_subject_kept(cohort: Path) -> None:
    """case and subject given in the datalist are kept (frames of one subject can share a code)."""
    path = write_datalist(
        cohort,
        {"training": [entry("patient001_frame01", subject="p1"), entry("patient002_frame01", case="c2", subject="p1")]},
    )
    items = load_datalist(path)
    assert [(i["case"], i["subject"]) for i in items] == [("patient001_frame01", "p1"), ("c2", "p1")]


def test_other_section_and_keys(cohort: Path) -> None:
    """Another section can be read with image-only keys (inference lists)."""
    path = write_datalist(
        cohort, {"training": [entry("patient001_frame01")], "testing": [{"image": "data/patient002_frame01.nii.gz"}]}
    )
    items = load_datalist(path, section="testing", keys=("image",))
    assert len(items) == 1 and items[0]["case"] == "patient002_frame01"


def test_missing_datalist(tmp_path: Path) -> None:
    """A datalist that does not exist raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_datalist(tmp_path / "nope.json")


@pytest.mark.parametrize("missing_key", ["image", "label"])
def test_missing_file_named(cohort: Path, missing_key: str) -> None:
    """A listed file that does not exist raises FileNotFoundError naming the file and the datalist."""
    bad = entry("patient002_frame01")
    bad[missing_key] = "data/ghost.nii.gz"
    path = write_datalist(cohort, {"training": [entry("patient001_frame01"), bad]})
    with pytest.raises(FileNotFoundError) as err:
        load_datalist(path)
    assert "ghost.nii.gz" in str(err.value) and "datalist.json" in str(err.value)
    assert "entry 1" in str(err.value)


def test_entry_without_label_key(cohort: Path) -> None:
    """A training entry lacking its label raises ValueError naming the key."""
    path = write_datalist(cohort, {"training": [{"image": "data/patient001_frame01.nii.gz"}]})
    with pytest.raises(ValueError, match="'label'"):
        load_datalist(path)


def test_duplicate_image(cohort: Path) -> None:
    """The same image listed twice (even spelled differently) raises ValueError naming the datalist."""
    dup = entry("patient001_frame01")
    dup["image"] = "./data/../data/patient001_frame01.nii.gz"
    path = write_datalist(cohort, {"training": [entry("patient001_frame01"), dup]})
    with pytest.raises(ValueError, match="more than once") as err:
        load_datalist(path)
    assert "datalist.json" in str(err.value)


def test_duplicate_case(cohort: Path) -> None:
    """Two images with the same file name in different folders share a case ID: ValueError."""
    touch(cohort / "other" / "patient001_frame01.nii.gz")
    other = {"image": "other/patient001_frame01.nii.gz", "label": "data/patient002_frame01_gt.nii.gz"}
    path = write_datalist(cohort, {"training": [entry("patient001_frame01"), other]})
    with pytest.raises(ValueError, match="duplicate case IDs") as err:
        load_datalist(path)
    assert "patient001_frame01" in str(err.value)


def test_duplicate_explicit_case(cohort: Path) -> None:
    """Explicit case fields that collide are rejected too."""
    path = write_datalist(
        cohort, {"training": [entry("patient001_frame01", case="x"), entry("patient002_frame01", case="x")]}
    )
    with pytest.raises(ValueError, match="duplicate case IDs"):
        load_datalist(path)


def test_empty_section(cohort: Path) -> None:
    """An empty section raises ValueError naming the section."""
    path = write_datalist(cohort, {"training": [entry("patient001_frame01")], "validation": []})
    with pytest.raises(ValueError, match="'validation' is empty"):
        load_datalist(path, section="validation")


def test_absent_section(cohort: Path) -> None:
    """A section that is not in the file raises ValueError naming the datalist."""
    path = write_datalist(cohort, {"training": [entry("patient001_frame01")]})
    with pytest.raises(ValueError, match="datalist.json"):
        load_datalist(path, section="validation")


# ---------------------------------------------------------------------------------------------- list_images


def test_list_images_skips_labels_and_sorts(tmp_path: Path) -> None:
    """list_images returns NIfTI images sorted by name, skipping *_gt labels and other files."""
    for name in ("b.nii.gz", "a.nii", "a_gt.nii", "c_gt.nii.gz", "notes.txt", "c.nii.gz.bak"):
        touch(tmp_path / name)
    items = list_images(tmp_path)
    assert [i["case"] for i in items] == ["a", "b"]
    assert [Path(i["image"]) for i in items] == [tmp_path / "a.nii", tmp_path / "b.nii.gz"]


def test_list_images_empty_folder(tmp_path: Path) -> None:
    """A folder without images raises FileNotFoundError naming it."""
    touch(tmp_path / "only_gt.nii.gz")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_images(tmp_path)


def test_list_images_missing_folder(tmp_path: Path) -> None:
    """A folder that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize(
    "path,name",
    [("/d/patient001_frame01.nii.gz", "patient001_frame01"), ("x/a.b.nii", "a.b"), ("scan.mha", "scan")],
)
def test_case_name(path: str, name: str) -> None:
    """case_name strips the folder and the NIfTI suffix (.nii.gz counts as one suffix)."""
    assert case_name(path) == name


def test_read_label_mapping_reports_bad_datalists_in_one_line(tmp_path) -> None:
    from nisf_monai.data import read_label_mapping
    from nisf_monai.errors import DatalistError, MissingFileError

    with pytest.raises(MissingFileError, match="does not exist"):
        read_label_mapping(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"label_mapping": {"one": 3}}')
    with pytest.raises(DatalistError, match="cannot read its label_mapping"):
        read_label_mapping(broken)
    broken.write_text("not json")
    with pytest.raises(DatalistError, match="cannot read its label_mapping"):
        read_label_mapping(broken)
