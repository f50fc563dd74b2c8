"""Short-axis cine MRI as it leaves the scanner: DICOM files, grouped into scans and stacked into 3D or 4D volumes.

A cine stack is exported either as one series per slice position (each holding that slice's phases) or as one
series holding every slice and phase; folders may hold one scan each or several series side by side. ITK reads
the headers and pixels (GDCM); this module only decides which files form one volume:

- a **scan** is the files of one folder that share study, frame of reference, slice orientation and matrix size
  (so the series of a one-series-per-slice stack join, while a long-axis series beside them stays apart);
- a scan's **slices** are its distinct positions along the stack normal (``ImageOrientationPatient`` row x column,
  positions from ``ImagePositionPatient``), which must be evenly spaced;
- each slice's **phases** are ordered by ``TriggerTime`` (``InstanceNumber`` when trigger times are missing or
  repeat), and every slice must have the same number.

:func:`convert_dicom_scans` writes each scan as NIfTI (``(X, Y, Z)`` or ``(X, Y, Z, T)``) with the world affine
ITK derives from the headers, converted to MONAI's RAS convention by MONAI's own ``ITKReader``; everything
downstream then reads NIfTI as usual.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nisf_monai.errors import InvalidCaseError
from nisf_monai.io import atomic_write_text, save_nifti

# what a folder of DICOM files may also hold (NIfTI images, notes, records): never read as DICOM
NON_DICOM_SUFFIXES = (".nii.gz", ".nii", ".json", ".csv", ".txt", ".cfg", ".png", ".md", ".log", ".pt", ".yaml")

__all__ = ["DicomScan", "convert_dicom_scans", "find_dicom_scans", "read_dicom_scan", "write_dicom_cine"]

logger = logging.getLogger("nisf_monai")

_TAGS = {
    "study": "0020|000d",
    "series": "0020|000e",
    "series_number": "0020|0011",
    "frame_of_reference": "0020|0052",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "trigger_time": "0018|1060",
    "instance": "0020|0013",
    "frames": "0028|0008",
}
_POSITION_TOLERANCE_MM = 0.05
_SPACING_TOLERANCE = 0.05  # a gap may differ from the stack's typical step by this fraction


@dataclass
class DicomSlice:
    """What the headers of one DICOM file say about where it belongs."""

    path: str
    scan_key: tuple
    series: str
    orientation: np.ndarray
    position: np.ndarray
    trigger_time: float | None
    instance: int


@dataclass
class DicomScan:
    """One stack: ``files[t][z]`` is the file of phase ``t`` at the ``z``-th slice position along the normal."""

    name: str
    files: list[list[str]]
    slice_positions_mm: list[float] = field(default_factory=list)

    @property
    def num_phases(self) -> int:
        return len(self.files)


def _header(path: str) -> dict[str, str] | None:
    """The header values of :data:`_TAGS` of a DICOM file, or None when GDCM cannot read it as DICOM."""
    import itk

    io = itk.GDCMImageIO.New()
    if not io.CanReadFile(path):
        return None
    io.SetFileName(path)
    io.ReadImageInformation()
    tags = io.GetMetaDataDictionary()
    return {name: str(tags[tag]).strip() for name, tag in _TAGS.items() if tags.HasKey(tag)}


def _numbers(text: str | None, count: int, path: str, name: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in (text or "").split("\\")], dtype=np.float64)
    except ValueError:
        values = np.empty(0)
    if values.shape != (count,):
        raise InvalidCaseError(f"{path}: DICOM {name} is missing or unreadable ({text!r}); cannot place the slice.")
    return values


def _slice_of(path: str, folder: Path) -> DicomSlice | None:
    header = _header(path)
    if header is None:
        return None
    if int(float(header.get("frames", "1") or 1)) > 1:
        raise InvalidCaseError(f"{path}: multi-frame (enhanced) DICOM is not supported; export one image per file.")
    orientation = _numbers(header.get("orientation"), 6, path, "ImageOrientationPatient")
    position = _numbers(header.get("position"), 3, path, "ImagePositionPatient")
    trigger = header.get("trigger_time")
    key = (
        str(folder),
        header.get("study", ""),
        header.get("frame_of_reference", ""),
        tuple(np.round(orientation, 3)),
        header.get("rows"),
        header.get("columns"),
    )
    return DicomSlice(
        path=path,
        scan_key=key,
        series=header.get("series", ""),
        orientation=orientation,
        position=position,
        trigger_time=float(trigger) if trigger not in (None, "") else None,
        instance=int(float(header.get("instance") or 0)),
    )


def _phase_order(slices: Sequence[DicomSlice]) -> list[DicomSlice]:
    times = [s.trigger_time for s in slices]
    if None not in times and len(set(times)) == len(times):
        return sorted(slices, key=lambda s: s.trigger_time)
    return sorted(slices, key=lambda s: s.instance)


def _stack(slices: list[DicomSlice], name: str) -> DicomScan:
    """Order one scan's files into ``files[phase][slice]``, checking the stack can be built."""
    row, column = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, column)
    heights = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(heights, kind="stable")
    levels: list[list[DicomSlice]] = []
    level_heights: list[float] = []
    for i in order:
        if level_heights and heights[i] - level_heights[-1] <= _POSITION_TOLERANCE_MM:
            levels[-1].append(slices[i])
        else:
            levels.append([slices[i]])
            level_heights.append(float(heights[i]))
    counts = sorted({len(level) for level in levels})
    if len(counts) > 1:
        per_level = ", ".join(f"{h:.1f} mm: {len(level)}" for h, level in zip(level_heights, levels))
        raise InvalidCaseError(f"scan {name}: slices have differing phase counts ({per_level}); cannot stack.")
    if len(levels) > 2:
        gaps = np.diff(level_heights)
        step = float(np.median(gaps))
        if np.abs(gaps - step).max() > _SPACING_TOLERANCE * step + _POSITION_TOLERANCE_MM:
            raise InvalidCaseError(
                f"scan {name}: uneven slice positions (gaps {np.round(gaps, 2).tolist()} mm around a step of "
                f"{step:.2f} mm; a missing slice?); cannot stack."
            )
    phases = [_phase_order(level) for level in levels]
    files = [[phases[z][t].path for z in range(len(levels))] for t in range(counts[0])]
    return DicomScan(name=name, files=files, slice_positions_mm=level_heights)


def _check_series_orientations(slices: Sequence[DicomSlice], folder: str) -> bool:
    """A series is one acquisition: files of one series in several orientations cannot be stacked (nor guessed
    apart into scans). True when none does."""
    orientations: dict[str, set] = defaultdict(set)
    for s in slices:
        orientations[s.series].add(tuple(np.round(s.orientation, 3)))
    for series, turned in orientations.items():
        if len(turned) > 1:
            raise InvalidCaseError(f"{folder}: series {series} mixes {len(turned)} slice orientations; cannot stack.")
    return True


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def find_dicom_scans(dataset_dir: str | os.PathLike, skipped: list[tuple[str, str]] | None = None) -> list[DicomScan]:
    """The DICOM scans in ``dataset_dir`` and its subfolders (files of any name; what GDCM cannot read is
    skipped). A folder holding one scan names it; several scans in one folder are named ``<folder>_<series
    number>``.

    What cannot be stacked raises :class:`~nisf_monai.errors.InvalidCaseError`, or, given a ``skipped`` list, is
    appended to it as ``(file, folder or scan, reason)`` pairs and left out, so that one broken scan does not stop
    a cohort."""
    root = Path(dataset_dir)
    scans: list[DicomScan] = []

    def attempt(source: str, make: Callable[..., Any], *args: Any) -> Any:
        try:
            return make(*args)
        except InvalidCaseError as error:
            if skipped is None:
                raise
            skipped.append((source, str(error)))
            return None

    for folder, _, names in sorted(os.walk(root)):
        paths = [os.path.join(folder, name) for name in sorted(names) if not name.endswith(NON_DICOM_SUFFIXES)]
        found = [s for path in paths for s in [attempt(path, _slice_of, path, Path(folder))] if s is not None]
        if attempt(folder, _check_series_orientations, found, folder) is None:
            continue
        groups: dict[tuple, list[DicomSlice]] = defaultdict(list)
        for s in found:
            groups[s.scan_key].append(s)
        base = _safe(Path(folder).name if Path(folder) != root else root.name)
        for n, slices in enumerate(groups.values()):
            name = base if len(groups) == 1 else f"{base}_{n + 1}"
            scan = attempt(os.path.join(folder, name), _stack, slices, name)
            if scan is not None:
                scans.append(scan)
    return scans


def read_dicom_scan(scan: DicomScan) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ``(X, Y, Z)`` (one phase) or ``(X, Y, Z, T)`` of a scan, float32 with the headers' rescale applied,
    and the RAS world affine (4 x 4) of MONAI's ``ITKReader``."""
    import itk
    from monai.data import ITKReader

    volumes, affine = [], None
    for t, files in enumerate(scan.files):
        reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(
            FileNames=files, ImageIO=itk.GDCMImageIO.New(), ForceOrthogonalDirection=False
        )
        reader.Update()
        array, meta = ITKReader().get_data(reader.GetOutput())
        if array.ndim == 2:  # a single slice position
            array = array[..., None]
        phase_affine = np.asarray(meta["affine"], dtype=np.float64)
        if affine is None:
            affine = phase_affine
        elif not np.allclose(affine, phase_affine, atol=1e-3):
            raise InvalidCaseError(f"scan {scan.name}: phase {t} lies elsewhere than phase 0; cannot stack.")
        volumes.append(np.asarray(array, dtype=np.float32))
    data = volumes[0] if len(volumes) == 1 else np.stack(volumes, axis=-1)
    return data, affine


SKIPPED_SCANS_FILENAME = "skipped_scans.txt"


def convert_dicom_scans(dataset_dir: str | os.PathLike, output_dir: str | os.PathLike) -> list[Path]:
    """Every DICOM scan under ``dataset_dir`` as ``<output_dir>/<scan>.nii.gz`` (written atomically; a scan whose
    NIfTI is newer than all its files is not converted again). Returns the NIfTI paths, sorted. A scan that cannot
    be stacked or read is left out with one error line, and listed with its reason in
    ``<output_dir>/skipped_scans.txt`` (removed when none was skipped)."""
    skipped: list[tuple[str, str]] = []
    scans = find_dicom_scans(dataset_dir, skipped)
    paths = []
    for scan in scans:
        path = Path(output_dir) / f"{scan.name}.nii.gz"
        newest = max(os.path.getmtime(f) for phase in scan.files for f in phase)
        if not path.is_file() or path.stat().st_mtime < newest:
            try:
                data, affine = read_dicom_scan(scan)
            except (InvalidCaseError, RuntimeError) as error:  # ITK raises RuntimeError on files it cannot read
                skipped.append((scan.name, str(error).strip().splitlines()[0] if str(error).strip() else repr(error)))
                continue
            partial = path.with_name(f".{scan.name}.{os.getpid()}.partial.nii.gz")  # renamed when complete
            save_nifti(data, affine, partial, time_unit="msec" if data.ndim == 4 else None)
            os.replace(partial, path)
            logger.info("DICOM scan %s (%s, %d phases) written as %s", scan.name, data.shape[:3], scan.num_phases, path)
        paths.append(path)
    listing = Path(output_dir) / SKIPPED_SCANS_FILENAME
    for source, reason in skipped:
        logger.error("DICOM %s skipped: %s", source, reason)
    if skipped:
        atomic_write_text(listing, "".join(f"{source}\t{' '.join(reason.split())}\n" for source, reason in skipped))
    elif listing.is_file():
        listing.unlink()
    return sorted(paths)


def write_dicom_cine(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    one_series: bool = False,
    trigger_step_ms: float = 40.0,
    study_uid: str = "1.2.826.0.1.3680043.2.1125.1",
) -> list[str]:
    """Write ``volume`` ``(X, Y, Z)`` or ``(X, Y, Z, T)`` with RAS ``affine`` as a DICOM cine the way scanners
    export it: one file per slice and phase, one series per slice position (or one series for all with
    ``one_series``), positions and orientation in the headers, phases in ``TriggerTime``. For tests and demos of
    the DICOM input; voxels are stored as int16 (round them first if they matter exactly)."""
    import itk

    data = volume if volume.ndim == 4 else volume[..., None]
    if data.min() < -32768 or data.max() > 32767:
        raise ValueError(
            f"write_dicom_cine stores int16: scale the volume into [-32768, 32767] (it spans "
            f"[{data.min():g}, {data.max():g}])."
        )
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for z in range(data.shape[2]):
        origin = lps[:3, :3] @ np.array([0.0, 0.0, z]) + lps[:3, 3]
        series = f"{study_uid}.{1 if one_series else z + 2}"
        for t in range(data.shape[3]):
            pixels = np.ascontiguousarray(np.round(data[:, :, z, t]).T[None].astype(np.int16))
            image = itk.image_from_array(pixels)
            image.SetOrigin([float(v) for v in origin])
            image.SetSpacing([float(v) for v in spacing])
            image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
            tags = image.GetMetaDataDictionary()
            for tag, value in {
                "0008|0060": "MR",
                "0020|000d": study_uid,
                "0020|000e": series,
                "0020|0011": str(1 if one_series else z + 2),
                "0020|0052": f"{study_uid}.0",
                "0018|1060": f"{t * trigger_step_ms:.1f}",
                "0020|0013": str(z * data.shape[3] + t + 1 if one_series else t + 1),
            }.items():
                tags[tag] = value
            io = itk.GDCMImageIO.New()
            io.KeepOriginalUIDOn()
            path = str(out / f"IM_{z:03d}_{t:03d}.dcm")
            itk.ImageFileWriter[itk.Image[itk.SS, 3]].New(Input=image, FileName=path, ImageIO=io).Update()
            written.append(path)
    return written
