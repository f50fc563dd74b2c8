"""Unit tests of ValidateCased on cases written as NIfTI files and loaded the way the bundle loads them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from nisf_monai.transforms import InvalidCaseError, ValidateCased, source_of

SHAPE = (6, 5, 4)
AFFINE = np.diag([1.5, 1.5, 8.0, 1.0])


def write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def good_image() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE).astype(np.float32)


def good_label() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:4, 1:4, 1:3] = 1
    label[2, 2, 1] = 2
    label[4, 3, 2] = 3
    return label


def load(tmp_path: Path, image: np.ndarray, label: np.ndarray | None = None, label_affine=AFFINE) -> dict:
    files = {"image": write(tmp_path / "case01.nii.gz", image)}
    if label is not None:
        files["label"] = write(tmp_path / "case01_gt.nii.gz", label, label_affine)
    return LoadImaged(list(files), ensure_channel_first=True, image_only=True)(files)


def test_good_case_passes_unchanged(tmp_path) -> None:
    """A valid case returns the same mapping with the same tensors."""
    data = load(tmp_path, good_image(), good_label())
    before = {k: v.clone() for k, v in data.items()}
    out = ValidateCased(num_classes=4)(data)
    assert set(out) == set(data)
    for k in data:
        assert out[k] is data[k]
        torch.testing.assert_close(out[k], before[k], rtol=0, atol=0)


def test_image_without_label_passes(tmp_path) -> None:
    """Inference cases have no label; that is allowed."""
    data = load(tmp_path, good_image())
    assert ValidateCased()(data) is data


def test_label_key_none_skips_label_checks(tmp_path) -> None:
    """label_key=None ignores a label even when it is invalid."""
    data = load(tmp_path, good_image(), good_label() + 10)
    ValidateCased(label_key=None)(data)


def test_shape_mismatch(tmp_path) -> None:
    """A label of another shape is rejected; the message names the label file and both shapes."""
    files = {
        "image": write(tmp_path / "case01.nii.gz", good_image()),
        "label": write(tmp_path / "case01_gt.nii.gz", np.zeros((6, 5, 3), np.uint8)),
    }
    data = LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True)(files)
    with pytest.raises(InvalidCaseError, match="case01_gt.nii.gz") as err:
        ValidateCased()(data)
    assert "(6, 5, 3)" in str(err.value) and "(6, 5, 4)" in str(err.value)


@pytest.mark.parametrize("bad_value", [4, 7, 255])
def test_label_value_too_large(tmp_path, bad_value: int) -> None:
    """A label value >= num_classes is rejected and reported."""
    label = good_label()
    label[0, 0, 0] = bad_value
    data = load(tmp_path, good_image(), label)
    with pytest.raises(InvalidCaseError, match="case01_gt.nii.gz") as err:
        ValidateCased(num_classes=4)(data)
    assert str(float(bad_value)) in str(err.value)


def test_negative_label(tmp_path) -> None:
    """A negative label value is rejected."""
    label = good_label().astype(np.int16)
    label[0, 0, 0] = -1
    with pytest.raises(InvalidCaseError, match="case01_gt.nii.gz"):
        ValidateCased(num_classes=4)(load(tmp_path, good_image(), label))


def test_num_classes_controls_range(tmp_path) -> None:
    """The same label (values up to 3) passes with 4 classes and fails with 3."""
    ValidateCased(num_classes=4)(load(tmp_path, good_image(), good_label()))
    with pytest.raises(InvalidCaseError, match="0..2"):
        ValidateCased(num_classes=3)(load(tmp_path, good_image(), good_label()))


def test_non_integer_label(tmp_path) -> None:
    """Fractional label values (e.g. an interpolated label) are rejected."""
    label = good_label().astype(np.float32)
    label[2, 2, 2] = 1.5
    with pytest.raises(InvalidCaseError, match="case01_gt.nii.gz") as err:
        ValidateCased(num_classes=4)(load(tmp_path, good_image(), label))
    assert "1.5" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_intensities(tmp_path, bad: float) -> None:
    """NaN or infinite intensities are rejected; the message names the image and counts the voxels."""
    image = good_image()
    image[0, 0, 0] = bad
    image[1, 1, 1] = bad
    with pytest.raises(InvalidCaseError, match="case01.nii.gz") as err:
        ValidateCased()(load(tmp_path, image, good_label()))
    assert "2 voxels" in str(err.value)


def test_two_dimensional_image(tmp_path) -> None:
    """A 2D image (loaded as (1, X, Y)) is rejected with its file name."""
    files = {"image": write(tmp_path / "slice.nii.gz", np.random.default_rng(1).random((6, 5)).astype(np.float32))}
    data = LoadImaged("image", ensure_channel_first=True, image_only=True)(files)
    assert data["image"].shape == (1, 6, 5)
    with pytest.raises(InvalidCaseError, match="slice.nii.gz") as err:
        ValidateCased()(data)
    assert "2D" in str(err.value)


def test_four_dimensional_image(tmp_path) -> None:
    """A cine series (X, Y, Z, T) loads with T channels and is rejected."""
    files = {"image": write(tmp_path / "cine.nii.gz", np.random.default_rng(2).random((6, 5, 4, 3)).astype(np.float32))}
    data = LoadImaged("image", ensure_channel_first=True, image_only=True)(files)
    with pytest.raises(InvalidCaseError, match="cine.nii.gz"):
        ValidateCased()(data)


def test_constant_image(tmp_path) -> None:
    """A constant image holds no anatomy and is rejected."""
    with pytest.raises(InvalidCaseError, match="case01.nii.gz") as err:
        ValidateCased()(load(tmp_path, np.full(SHAPE, 3.0, np.float32), good_label()))
    assert "constant" in str(err.value)


@pytest.mark.parametrize("change", ["origin", "spacing", "flip"])
def test_affine_mismatch(tmp_path, change: str) -> None:
    """A label with the image's shape but another affine (shifted, rescaled or flipped) is rejected."""
    label_affine = AFFINE.copy()
    if change == "origin":
        label_affine[0, 3] += 2.0
    elif change == "spacing":
        label_affine[2, 2] = 10.0
    else:
        label_affine[0, 0] = -1.5
    with pytest.raises(InvalidCaseError, match="case01_gt.nii.gz") as err:
        ValidateCased()(load(tmp_path, good_image(), good_label(), label_affine))
    assert "affine" in str(err.value)


def test_affine_within_tolerance_passes(tmp_path) -> None:
    """Affines that differ by less than affine_atol (float rounding in headers) are accepted."""
    label_affine = AFFINE.copy()
    label_affine[0, 3] += 1e-4
    ValidateCased(affine_atol=1e-3)(load(tmp_path, good_image(), good_label(), label_affine))


def test_in_memory_case_uses_case_name() -> None:
    """Without a file name, messages fall back to the case name."""
    data = {"image": torch.ones(1, 3, 3, 3), "case": "patient042"}
    with pytest.raises(InvalidCaseError, match="patient042"):
        ValidateCased()(data)


def test_invalid_case_error_is_value_error() -> None:
    """InvalidCaseError subclasses ValueError, so generic handlers still catch it."""
    assert issubclass(InvalidCaseError, ValueError)


def test_source_of() -> None:
    """source_of returns the MetaTensor's file name, else the fallback."""
    assert source_of(MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/d/a.nii.gz"})) == "/d/a.nii.gz"
    assert source_of(torch.zeros(1), "fallback") == "fallback"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64, torch.float64])
def test_label_dtypes(dtype) -> None:
    """Labels of integer or float dtype are accepted in range and rejected out of range."""
    image = torch.rand(1, 3, 3, 3)
    label = torch.zeros(1, 3, 3, 3, dtype=dtype)
    label[0, 1, 1, 1] = 3
    ValidateCased(num_classes=4)({"image": image, "label": label})
    label[0, 0, 0, 0] = 4
    with pytest.raises(InvalidCaseError, match="4.0"):
        ValidateCased(num_classes=4)({"image": image, "label": label})
