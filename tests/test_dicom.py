"""DICOM cine in: files grouped into scans, stacked by position and phase, geometry kept through ITK round trip."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import oblique_affine

from nisf_monai.data import list_images
from nisf_monai.data.dicom import convert_dicom_scans, find_dicom_scans, read_dicom_scan, write_dicom_cine
from nisf_monai.errors import InvalidCaseError

SHAPE = (12, 10, 4, 3)


def _cine(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2000, SHAPE).astype(np.float32)


def _short_axis(turn: float = 0.7, tilt: float = 0.9, flip: int | None = None) -> np.ndarray:
    """An oblique short-axis geometry as scanners write it: turned and tilted, 8 mm slices, far from the origin."""
    return oblique_affine((1.4, 1.6, 8.0), (-40.0, 85.0, 120.0), turn, tilt, flip_voxel_axis=flip)


@pytest.mark.parametrize("one_series", [False, True], ids=["series_per_slice", "one_series"])
@pytest.mark.parametrize("flip", [None, 2], ids=["right_handed", "slices_reversed"])
def test_dicom_cine_round_trip_keeps_voxels_and_world_geometry(tmp_path: Path, one_series: bool, flip) -> None:
    volume, affine = _cine(), _short_axis(flip=flip)
    write_dicom_cine(volume, affine, tmp_path / "scan", one_series=one_series)
    (scan,) = find_dicom_scans(tmp_path)
    assert scan.name == "scan" and scan.num_phases == SHAPE[3] and len(scan.files[0]) == SHAPE[2]
    data, read_affine = read_dicom_scan(scan)
    # the same world point for every voxel: the stack may come back in the other slice order, the geometry may not
    index = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE[:3]], indexing="ij"), -1).reshape(-1, 3)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    back = np.rint((world - read_affine[:3, 3]) @ np.linalg.inv(read_affine[:3, :3]).T).astype(int)
    np.testing.assert_allclose(back @ read_affine[:3, :3].T + read_affine[:3, 3], world, atol=1e-3)
    assert data.shape == SHAPE
    np.testing.assert_array_equal(data[back[:, 0], back[:, 1], back[:, 2]], volume.reshape(-1, SHAPE[3]))


def test_phases_follow_trigger_time_not_file_order(tmp_path: Path) -> None:
    volume = _cine()
    files = write_dicom_cine(volume, _short_axis(), tmp_path / "scan")
    for path in files:  # file names no longer in phase order: IM_zzz_ttt -> reversed t in the name
        z, t = path[-11:-8], int(path[-7:-4])
        os.replace(path, path.replace(f"_{z}_{t:03d}", f"_{z}_x{SHAPE[3] - 1 - t:03d}"))
    data, _ = read_dicom_scan(find_dicom_scans(tmp_path)[0])
    np.testing.assert_array_equal(data, volume)


def test_series_side_by_side_split_into_scans_by_orientation(tmp_path: Path) -> None:
    write_dicom_cine(_cine(0), _short_axis(), tmp_path / "study")
    long_axis = _cine(1)[:, :, :1]
    for path in write_dicom_cine(long_axis, _short_axis(turn=0.1, tilt=2.0), tmp_path / "tmp", study_uid="1.2.3"):
        os.replace(path, tmp_path / "study" / ("la_" + Path(path).name))
    scans = find_dicom_scans(tmp_path)
    shapes = sorted((len(s.files[0]), s.num_phases) for s in scans)
    assert [s.name for s in scans] == ["study_1", "study_2"] and shapes == [(1, 3), (4, 3)]


def test_a_missing_slice_is_one_clear_error(tmp_path: Path) -> None:
    for path in write_dicom_cine(_cine(), _short_axis(), tmp_path / "scan"):
        if "IM_002_" in path:
            os.remove(path)
    with pytest.raises(InvalidCaseError, match="uneven slice positions"):
        find_dicom_scans(tmp_path)


def test_differing_phase_counts_are_one_clear_error(tmp_path: Path) -> None:
    os.remove(write_dicom_cine(_cine(), _short_axis(), tmp_path / "scan")[-1])
    with pytest.raises(InvalidCaseError, match="differing phase counts"):
        find_dicom_scans(tmp_path)


def test_a_series_mixing_orientations_is_one_clear_error(tmp_path: Path) -> None:
    write_dicom_cine(_cine()[:, :, :2], _short_axis(), tmp_path / "scan", one_series=True)
    other = write_dicom_cine(_cine()[:, :, :1, :1], _short_axis(tilt=0.2), tmp_path / "tmp", one_series=True)
    os.replace(other[0], tmp_path / "scan" / "odd.dcm")  # same study and series, another orientation
    with pytest.raises(InvalidCaseError, match="mixes 2 slice orientations"):
        find_dicom_scans(tmp_path)


def test_list_images_converts_dicom_once_beside_nifti(tmp_path: Path) -> None:
    data = tmp_path / "data"
    volume, affine = _cine(), _short_axis()
    write_dicom_cine(volume, affine, data / "patient7")
    nib.save(nib.Nifti1Image(volume[..., 0], affine), str(data / "other.nii.gz"))
    entries = list_images(data, tmp_path / "converted")
    assert [e["case"] for e in entries] == ["other", "patient7"]
    converted = nib.load(entries[1]["image"])
    assert converted.shape == SHAPE
    written = os.path.getmtime(entries[1]["image"])
    assert list_images(data, tmp_path / "converted") == entries  # listed again, not converted again
    assert os.path.getmtime(entries[1]["image"]) == written
    assert convert_dicom_scans(tmp_path / "converted", tmp_path / "none") == []  # NIfTI is never taken for DICOM


def test_a_broken_scan_is_skipped_and_listed_while_the_others_convert(tmp_path: Path, caplog) -> None:
    """A cohort folder with one scan missing a slice: the others are converted, the broken one gets one error line
    and a line in skipped_scans.txt; once it is repaired the list is removed."""
    data, out = tmp_path / "data", tmp_path / "converted"
    write_dicom_cine(_cine(0), _short_axis(), data / "good")
    broken = write_dicom_cine(_cine(1), _short_axis(turn=0.2), data / "broken", study_uid="1.2.3")
    missing = [path for path in broken if "IM_001_" in path]
    saved = {path: Path(path).read_bytes() for path in missing}
    for path in missing:
        os.remove(path)
    with caplog.at_level("ERROR", logger="nisf_monai"):
        entries = list_images(data, out)
    assert [e["case"] for e in entries] == ["good"]
    listed = (out / "skipped_scans.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(data / "broken" / "broken")) and "uneven" in listed[0]
    assert "DICOM" in caplog.text and "skipped: scan broken: uneven slice positions" in caplog.text
    for path, content in saved.items():
        Path(path).write_bytes(content)
    assert [e["case"] for e in list_images(data, out)] == ["broken", "good"]
    assert not (out / "skipped_scans.txt").exists()
