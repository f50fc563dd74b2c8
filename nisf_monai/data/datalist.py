"""Datalists: MONAI's decathlon-style JSON, checked up front so a bad entry fails before training starts."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from nisf_monai.errors import DatalistError, MissingFileError

__all__ = ["load_datalist", "list_images", "case_name"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def case_name(path: str | os.PathLike) -> str:
    """File name without folder and NIfTI suffix: ``/d/patient001_frame01.nii.gz -> patient001_frame01``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def load_datalist(datalist: str | os.PathLike, section: str = "training", keys: tuple[str, ...] = ("image", "label")) -> list[dict[str, Any]]:
    """Entries of one section of a MONAI datalist with paths resolved against the datalist's folder.

    Fails with one message naming the datalist and the entry when a file is missing or an image is
    listed twice; fills ``case`` (the image's file name) and ``subject`` (defaults to ``case``) when an
    entry lacks them, since latent codes are looked up by these IDs.
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
                raise MissingFileError(f"datalist {path}: entry {i} of {section!r}: {key} file {item[key]} does not exist.")
        item.setdefault("case", case_name(item[keys[0]]))
        item.setdefault("subject", item["case"])
    repeated = [name for name, n in Counter(str(item[keys[0]]) for item in items).items() if n > 1]
    if repeated:
        raise DatalistError(f"datalist {path}: {section!r} lists the same image more than once: {repeated[:3]}.")
    cases = [name for name, n in Counter(item["case"] for item in items).items() if n > 1]
    if cases:
        raise DatalistError(f"datalist {path}: {section!r} has duplicate case IDs {cases[:3]}; case IDs key the latent codes.")
    return items


def list_images(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every NIfTI image in a folder (labels named ``*_gt.nii.gz`` are skipped), sorted by name, as
    datalist entries ``{"image": path, "case": name}`` for inference."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise MissingFileError(f"dataset_dir {folder} is not a folder.")
    images = sorted(
        p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not case_name(p).endswith("_gt")
    )
    if not images:
        raise MissingFileError(f"dataset_dir {folder} holds no NIfTI images (*.nii.gz or *.nii).")
    return [{"image": str(p), "case": case_name(p)} for p in images]
