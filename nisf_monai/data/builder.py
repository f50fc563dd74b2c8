"""Datalists from a folder of image / ``*_gt`` label pairs (the ACDC layout), split by subject."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from nisf_monai.classes import DATALIST_LABELS
from nisf_monai.data.datalist import _num_frames, case_name, subject_of_case
from nisf_monai.data.phases import CINE_LENGTH_KEY, assign_cardiac_phases
from nisf_monai.errors import DatalistError, MissingFileError
from nisf_monai.io import atomic_write_json

__all__ = ["ACDC_LABEL_MAPPING", "build_datalist", "cine_length_of", "read_label_mapping", "split_of"]

logger = logging.getLogger("nisf_monai")

# ACDC labels 1 RV blood pool, 2 LV myocardium, 3 LV blood pool -> the bundle's classes
ACDC_LABEL_MAPPING = {1: 3, 2: 2, 3: 1}
_NUMBER = re.compile(r"(\d+)$")


def split_of(number: int) -> str:
    """The split of the ACDC data README, by subject number: test if ``n % 5 == 4``, validation if
    ``n % 10 == 2``, training otherwise (keeps every pathology group in every part)."""
    if number % 5 == 4:
        return "test"
    if number % 10 == 2:
        return "validation"
    return "training"


def _subject_of(label_path: Path, data_dir: Path) -> str:
    case = case_name(label_path)[: -len("_gt")]
    if subject_of_case(case) != case:
        return subject_of_case(case)
    return label_path.parent.name if label_path.parent != data_dir else case


def cine_length_of(folder: Path) -> int | None:
    """The number of frames of the cine the files in ``folder`` were cut from, when the folder says: ACDC's
    ``Info.cfg`` (``NbFrame: 30``), else the header of a ``*_4d.nii.gz`` beside them; None otherwise."""
    info = folder / "Info.cfg"
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "nbframe" and value.strip().isdigit():
                return int(value.strip())
    for cine in sorted(folder.glob("*_4d.nii*")):
        length = _num_frames(str(cine))
        if length:
            return length
    return None


def build_datalist(
    data_dir: str,
    output: str | None = None,
    label_mapping: str | dict[int, int] | None = "acdc",
) -> str:
    """Write a MONAI datalist of every ``NAME_gt.nii.gz`` label under ``data_dir`` with its image
    ``NAME.nii.gz``, split by subject into ``training`` / ``validation`` / ``test``.

    Each entry records its cardiac phase and how it was found (``cardiac_phase``, ``phase_source``; see
    :mod:`nisf_monai.data.phases`), with the cine's length from ACDC's ``Info.cfg`` when the folder has one.

    Subjects are the part before ``_frameNN`` (ACDC), else the containing folder, else the case name. A
    subject ending in digits is split by that number as in the ACDC README (:func:`split_of`); the others by
    their rank in sorted order, with the same rule, so the split never depends on directory order.

    Args:
        data_dir: folder to search (recursively).
        output: datalist path; default ``data_dir/datalist_nisf.json``. Paths in it are relative to it.
        label_mapping: ``"acdc"`` (ACDC values to the bundle's classes), a dict ``{file value: class}``,
            or None (labels already use the bundle's classes). Stored in the datalist as
            ``label_mapping``, which the bundle's configs apply with ``MapLabelValued``.

    Returns:
        the datalist path.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise MissingFileError(f"data_dir {root} is not a folder.")
    out = Path(output) if output else root / "datalist_nisf.json"
    mapping = _mapping(label_mapping)
    entries: list[dict[str, Any]] = []
    for label in sorted(root.rglob("*_gt.nii*")):
        suffix = ".nii.gz" if label.name.endswith(".nii.gz") else ".nii"
        image = label.with_name(label.name[: -len("_gt" + suffix)] + suffix)
        if not image.is_file():
            raise MissingFileError(f"{label}: no image {image.name} beside it.")
        entry = {
            "image": os.path.relpath(image, out.parent),
            "label": os.path.relpath(label, out.parent),
            "case": case_name(image),
            "subject": _subject_of(label, root),
        }
        length = cine_length_of(label.parent)
        if length is not None:
            entry[CINE_LENGTH_KEY] = length
        entries.append(entry)
    if not entries:
        raise MissingFileError(f"data_dir {root} holds no *_gt.nii.gz labels.")
    subjects = sorted({e["subject"] for e in entries})
    numbered = all(_NUMBER.search(s) for s in subjects)
    number = {s: int(_NUMBER.search(s).group(1)) if numbered else rank for rank, s in enumerate(subjects)}
    datalist: dict[str, Any] = {
        "labels": DATALIST_LABELS,
        "label_mapping": {str(k): int(v) for k, v in mapping.items()},
        "training": [],
        "validation": [],
        "test": [],
    }
    for entry in assign_cardiac_phases(sorted(entries, key=lambda e: (e["subject"], e["case"]))):
        datalist[split_of(number[entry["subject"]])].append(entry)
    atomic_write_json(out, datalist)
    counts = {part: len({e["subject"] for e in datalist[part]}) for part in ("training", "validation", "test")}
    logger.info("wrote %s: %s subjects (training/validation/test)", out, counts)
    return str(out)


def _mapping(label_mapping: str | dict[int, int] | None) -> dict[int, int]:
    if label_mapping is None:
        return {}
    if isinstance(label_mapping, str):
        if label_mapping.lower() == "acdc":
            return dict(ACDC_LABEL_MAPPING)
        raise DatalistError(f"unknown label_mapping {label_mapping!r}: use 'acdc', a dict or None.")
    return {int(k): int(v) for k, v in dict(label_mapping).items()}


def read_label_mapping(datalist: str | os.PathLike) -> dict[int, int]:
    """The ``label_mapping`` stored in a datalist (``{}`` when there is none: labels are already the
    bundle's classes)."""
    path = Path(datalist)
    if not path.is_file():
        raise MissingFileError(f"datalist {path} does not exist.")
    try:
        data = json.loads(path.read_text())
        return {int(k): int(v) for k, v in data.get("label_mapping", {}).items()}
    except (ValueError, AttributeError, TypeError) as err:
        raise DatalistError(f"datalist {path}: cannot read its label_mapping ({err}).") from None
