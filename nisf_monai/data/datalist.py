"""Datalists: MONAI's decathlon-style JSON, checked up front so a bad entry fails before training starts."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
from monai.data import load_decathlon_datalist

from nisf_monai.data.dicom import NON_DICOM_SUFFIXES, convert_dicom_scans
from nisf_monai.data.phases import CINE_LENGTH_KEY
from nisf_monai.errors import DatalistError, InputDataError, InvalidCaseError, MissingFileError

__all__ = [
    "load_datalist",
    "list_images",
    "case_id",
    "case_ids",
    "case_name",
    "expand_cine_datalist",
    "labelled_entries",
    "subject_of_case",
]

logger = logging.getLogger("nisf_monai")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_FRAME_SUFFIX = re.compile(r"^(?P<subject>.+?)_frame\d+$")


def subject_of_case(case: str) -> str:
    """The subject a case name belongs to by ACDC's pattern ``<subject>_frameKK`` (else the case itself), so that a
    folder of per-frame files groups into subjects: ``patient001_frame12 -> patient001``."""
    match = _FRAME_SUFFIX.match(case)
    return match.group("subject") if match else case


def case_name(path: str | os.PathLike) -> str:
    """File name without folder and NIfTI suffix: ``/d/patient001_frame01.nii.gz -> patient001_frame01``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def case_id(item: Mapping[Hashable, Any], case_key: str = "case", image_key: str = "image") -> str:
    """The case ID of one datalist entry: its ``case_key`` if set, else its image's file name without folder
    and NIfTI suffix (:func:`case_name`)."""
    if item.get(case_key) is not None:
        return str(item[case_key])
    if image_key not in item:
        raise DatalistError(f"datalist entry {dict(item)} has neither a {case_key!r} ID nor an {image_key!r} path.")
    return case_name(str(item[image_key]))


def case_ids(data: Sequence[Mapping[Hashable, Any]], case_key: str = "case", image_key: str = "image") -> list[str]:
    """The case ID of each entry (:func:`case_id`), as :func:`load_datalist` names cases.

    Sizing the latent table with this makes it follow whatever data list the config is given, including
    the one MONAI Label substitutes for ``train#dataset#data`` (its datastore's ``{"image", "label"}``
    pairs, which carry no case IDs).

    Raises:
        DatalistError: an ID taken from a file name names more than one entry (which would otherwise
            share one latent code silently).
    """
    ids = [case_id(item, case_key, image_key) for item in data]
    counts = Counter(ids)
    repeated = sorted({case for item, case in zip(data, ids) if item.get(case_key) is None and counts[case] > 1})
    if repeated:
        raise DatalistError(
            f"case ID {repeated[0]!r} (an image's file name) names more than one entry; case IDs key the latent "
            "codes, so list each image once, with a unique file name or its own 'case' entry."
        )
    return ids


def load_datalist(
    datalist: str | os.PathLike, section: str = "training", keys: tuple[str, ...] = ("image", "label")
) -> list[dict[str, Any]]:
    """Entries of one section of a MONAI datalist with paths resolved against the datalist's folder.

    Fails with one message naming the datalist and the entry when a file is missing or an image is
    listed twice; fills ``case`` (the image's file name) and ``subject`` (the patient, defaults to ``case``)
    when an entry lacks them: latent codes are looked up by case ID, and measures group cases by patient.
    """
    path = Path(datalist)
    if not path.is_file():
        raise MissingFileError(f"datalist {path} does not exist.")
    try:
        items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=section)
    except (ValueError, KeyError) as err:
        raise DatalistError(f"datalist {path}: {err}") from None
    if not items:
        raise DatalistError(f"datalist {path}: section {section!r} is empty.")
    for i, item in enumerate(items):
        for key in keys:
            if key not in item:
                raise DatalistError(f"datalist {path}: entry {i} of {section!r} has no {key!r} path.")
            if not os.path.exists(item[key]):
                raise MissingFileError(
                    f"datalist {path}: entry {i} of {section!r}: {key} file {item[key]} does not exist."
                )
        item.setdefault("case", case_name(item[keys[0]]))
        item.setdefault("subject", item["case"])
    # one cine file may be listed several times with disjoint "frames" (labelled frames apart from the others)
    repeated = [
        name for (name, _), n in Counter((str(item[keys[0]]), _frames(item)) for item in items).items() if n > 1
    ]
    if repeated:
        raise DatalistError(f"datalist {path}: {section!r} lists the same image more than once: {repeated[:3]}.")
    cases = [name for (name, _), n in Counter((item["case"], _frames(item)) for item in items).items() if n > 1]
    if cases:
        raise DatalistError(
            f"datalist {path}: {section!r} has duplicate case IDs {cases[:3]}; case IDs key the latent codes."
        )
    return items


def labelled_entries(items: Sequence[Mapping[Hashable, Any]], label_key: str = "label") -> list[dict[str, Any]]:
    """The entries that have a label, e.g. to score a section whose cines hold unlabelled frames too (how many were
    left out is logged)."""
    kept = [dict(item) for item in items if item.get(label_key) is not None]
    if len(kept) < len(items):
        logger.info("%d of %d frames have no label and are left out of scoring", len(items) - len(kept), len(items))
    if not kept:
        raise DatalistError(f"none of the {len(items)} entries has a {label_key!r}: there is nothing to score.")
    return kept


def _frames(item: Mapping[Hashable, Any]) -> tuple[int, ...] | None:
    """The frames an entry takes from its (cine) image, or None for all of them."""
    frames = item.get("frames")
    return None if frames is None else tuple(int(t) for t in frames)


def list_images(
    dataset_dir: str | os.PathLike, dicom_output_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Every NIfTI image in a folder (labels named ``*_gt.nii.gz`` are skipped), sorted by name, as
    datalist entries ``{"image": path, "case": name, "subject": ...}`` for inference; the subject comes from the
    file name (:func:`subject_of_case`), so the cine model fits one code to ``patient001_frame01`` and
    ``patient001_frame12`` together.

    DICOM in the folder or its subfolders is grouped into scans and written as NIfTI into ``dicom_output_dir``
    first (:func:`nisf_monai.data.dicom.convert_dicom_scans`; a temporary folder when not given), then listed
    with the rest."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise MissingFileError(f"dataset_dir {folder} is not a folder.")
    images = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not case_name(p).endswith("_gt"))
    if _may_hold_dicom(folder):
        if dicom_output_dir is None:
            dicom_output_dir = tempfile.mkdtemp(prefix="nisf_dicom_")
        converted = convert_dicom_scans(folder, dicom_output_dir)
        if converted:
            logger.info("%d DICOM scan(s) in %s, as NIfTI in %s", len(converted), folder, dicom_output_dir)
        images = sorted(images + converted, key=lambda p: p.name)
    if not images:
        raise MissingFileError(f"dataset_dir {folder} holds no images (NIfTI *.nii.gz, *.nii, or DICOM).")
    return [{"image": str(p), "case": case_name(p), "subject": subject_of_case(case_name(p))} for p in images]


def _may_hold_dicom(folder: Path) -> bool:
    """Whether any file under ``folder`` could be DICOM (a name that is not one of the kinds written here)."""
    for _, _, names in os.walk(folder):
        if any(not name.endswith(NON_DICOM_SUFFIXES) for name in names):
            return True
    return False


def _num_frames(path: str) -> int | None:
    """Frames of a 4D ``(X, Y, Z, T)`` image from its header alone (None for a 3D image)."""
    try:
        shape = nib.load(path).shape  # reads the header only
    except FileNotFoundError:
        raise MissingFileError(f"{path}: image file does not exist.") from None
    except Exception as err:
        raise InvalidCaseError(f"{path}: cannot read the image header ({type(err).__name__}: {err}).") from err
    if len(shape) == 4 and shape[3] > 1:
        return int(shape[3])
    return None


def expand_cine_datalist(
    items: list[dict[str, Any]],
    image_key: str = "image",
    label_key: str = "label",
    frame_key: str = "frame",
    frames_key: str = "frames",
    keep_unreadable: bool = False,
) -> list[dict[str, Any]]:
    """One entry per time frame for every 4D cine image ``(X, Y, Z, T)`` of a datalist.

    NISF learns from 3D frames. Instead of writing each frame to its own file, a cine entry becomes
    ``T`` entries that point to the same file and say which frame to keep; add
    :class:`nisf_monai.transforms.SelectFramed` after loading to cut it out. Each frame gets its own case
    ID ``<case>_tNN`` (hence its own latent code when codes are keyed by case) and keeps the entry's
    ``subject`` and records the series' length in ``cine_length`` (frame ``t`` lies at cardiac phase
    ``t / cine_length``, see :mod:`nisf_monai.data.phases`). A 3D entry is a series of one frame: it keeps its case
    ID, gets ``frame`` 0 and keeps its ``cine_length`` (0 when not given), so that every entry has the same keys
    and a batch mixing 3D and cine frames collates.
    Only headers are read.

    An entry may list the frames to use in ``frames_key`` (e.g. ``"frames": [0, 11]`` for ED and ES). Its
    label is either 4D with the image's frames (the same frame is cut from both) or 3D, the label of one
    frame, in which case ``frames`` must name exactly that frame.

    Example (bundle config)::

        "data": "$nisf_monai.data.datalist.expand_cine_datalist(nisf_monai.data.load_datalist(@datalist))"

    ``keep_unreadable=True`` keeps an entry whose header cannot be read as a single frame instead of
    raising, so that inference can report and skip that one case when it is loaded.

    Raises:
        DatalistError: a frame index outside the series, a 3D label without its one frame, or a 4D label
            with another number of frames, naming the file.
    """
    expanded: list[dict[str, Any]] = []
    for item in items:
        image = str(item[image_key])
        try:
            num_frames = _num_frames(image) or 1
        except InputDataError:
            if not keep_unreadable:
                raise
            num_frames = 1  # left for the loader to report, e.g. by a dataset that skips bad cases
        frames = [int(t) for t in item.get(frames_key, range(num_frames))]
        bad = [t for t in frames if not 0 <= t < num_frames]
        if bad or not frames:
            raise DatalistError(
                f"{image}: frames {bad or frames} requested, the series has frames 0..{num_frames - 1}."
            )
        if num_frames > 1 and item.get(label_key) is not None:
            label_frames = _num_frames(str(item[label_key]))
            if label_frames is None and len(frames) != 1:
                raise DatalistError(
                    f"{item[label_key]}: a 3D label for the cine series {image} of {num_frames} frames; say which "
                    f"frame it labels with '{frames_key}': [t] in its datalist entry."
                )
            if label_frames is not None and label_frames != num_frames:
                raise DatalistError(
                    f"{item[label_key]}: label has {label_frames} frames, its image {image} has {num_frames}."
                )
        case = str(item.get("case", case_name(image)))
        for t in frames:
            entry = {k: v for k, v in item.items() if k != frames_key}
            entry.update(
                {
                    frame_key: t,
                    "case": f"{case}_t{t:02d}" if num_frames > 1 else case,
                    "subject": str(item.get("subject", case)),
                }
            )
            # the cycle's frame count (frame t lies at phase t / num_frames); 0 when a 3D entry does not say
            # (the key is on every entry, so batches mixing 3D and 4D entries collate)
            entry[CINE_LENGTH_KEY] = num_frames if num_frames > 1 else int(item.get(CINE_LENGTH_KEY) or 0)
            expanded.append(entry)
    repeated = [name for name, n in Counter(e["case"] for e in expanded).items() if n > 1]
    if repeated:
        raise DatalistError(
            f"expanding cine series gave duplicate case IDs {repeated[:3]}; case IDs key the latent codes."
        )
    return expanded
