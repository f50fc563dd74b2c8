"""Loading image files with errors that name the file, naming a case, and picking one frame of a cine series.

MONAI's ``LoadImage`` lets a reader's exception escape as is (``EOFError`` for a truncated ``.nii.gz``,
``OSError`` for a short ``.nii``, a ``RuntimeError`` listing every reader's traceback when a reader is
forced); inside a ``CacheDataset`` and the bundle runner it ends up many layers deep without the file's
name. :class:`LoadCased` turns any such failure into one :class:`~nisf_monai.errors.InvalidCaseError`
(or :class:`~nisf_monai.errors.MissingFileError`) that names the file, which the bundle's exception hook
prints as one line. :class:`CaseIDd` gives an entry without a case ID the one its file name gives.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage, LoadImaged, MapTransform

from nisf_monai.data.datalist import case_id, case_name
from nisf_monai.errors import InputDataError, InvalidCaseError, MissingFileError
from nisf_monai.transforms.validation import source_of

__all__ = [
    "CINE_FRAME_KEY",
    "CaseIDd",
    "LoadCase",
    "LoadCased",
    "SelectFramed",
    "describe_read_error",
    "frame_case_name",
    "frame_name_formatter",
]

CINE_FRAME_KEY = "cine_frame"

_TRUNCATED_HINTS = ("ended before", "expected", "truncated", "unexpected end", "end of file", "eof")


def describe_read_error(error: BaseException) -> str:
    """One line saying why a reader failed: the innermost exception's type and first (or, for MONAI's
    multi-reader report, last) line, with 'the file is truncated' when the reader says it ended early."""
    inner = error
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    if isinstance(inner, RuntimeError) and any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]  # MONAI pasted the readers' tracebacks; their last line is the actual error
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    reason = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    if isinstance(inner, EOFError) or any(hint in text.lower() for hint in _TRUNCATED_HINTS):
        reason = f"the file is truncated ({reason})"
    return reason


class LoadCase(LoadImage):
    """``monai.transforms.LoadImage`` whose failures name the file: a missing file raises
    :class:`MissingFileError`, an unreadable, truncated or corrupt one :class:`InvalidCaseError`, each with
    a one-line message. Arguments as for ``LoadImage``."""

    def __call__(
        self, filename: Sequence[str | os.PathLike] | str | os.PathLike, reader: ImageReader | None = None
    ) -> Any:
        try:
            return super().__call__(filename, reader)
        except InputDataError:
            raise
        except Exception as err:
            names = [str(f) for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
            missing = [n for n in names if not os.path.exists(os.path.expanduser(n))]
            if missing:
                raise MissingFileError(f"{missing[0]}: image file does not exist.") from err
            raise InvalidCaseError(
                f"{', '.join(names)}: cannot read this image: {describe_read_error(err)}. "
                "Re-export or copy the file again (a .nii.gz must be a complete gzip of a NIfTI)."
            ) from err


class LoadCased(LoadImaged):
    """``monai.transforms.LoadImaged`` with :class:`LoadCase` as its loader, so a truncated or corrupt file
    stops training with one line naming it instead of a reader traceback. Drop-in replacement: same
    arguments as ``LoadImaged``."""

    def __init__(
        self,
        keys: KeysCollection,
        reader: type[ImageReader] | str | None = None,
        dtype: DtypeLike = np.float32,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = "meta_dict",
        overwriting: bool = False,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        simple_keys: bool = False,
        prune_meta_pattern: str | None = None,
        prune_meta_sep: str = ".",
        allow_missing_keys: bool = False,
        expanduser: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            keys,
            reader,
            dtype,
            meta_keys,
            meta_key_postfix,
            overwriting,
            image_only,
            ensure_channel_first,
            simple_keys,
            prune_meta_pattern,
            prune_meta_sep,
            allow_missing_keys,
            expanduser,
            *args,
            **kwargs,
        )
        self._loader = LoadCase(
            reader,
            image_only,
            dtype,
            ensure_channel_first,
            simple_keys,
            prune_meta_pattern,
            prune_meta_sep,
            expanduser,
            *args,
            **kwargs,
        )


class CaseIDd(MapTransform):
    """Sets ``case_key`` from the image's file name when an entry has none (see
    :func:`~nisf_monai.data.datalist.case_ids`); entries that carry an ID keep it. Put it first in the training
    preprocessing, before the image is loaded: MONAI Label's datastore entries carry no case IDs, while the
    latent codes are keyed by case ID.

    Args:
        keys: the image key whose path names the case.
        case_key: entry key of the case ID (the trainer's ``latent_key``).
    """

    def __init__(self, keys: KeysCollection = "image", case_key: str = "case") -> None:
        super().__init__(keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.case_key) is None:
            key = self.first_key(d)
            d[self.case_key] = case_id(d, self.case_key, str(key))
        return d


class SelectFramed(MapTransform):
    """Keeps one time frame of a cine series, so a 4D ``(X, Y, Z, T)`` NIfTI trains as 3D volumes.

    Use after ``LoadImaged(..., ensure_channel_first=True)``, which loads a 4D NIfTI as ``(T, X, Y, Z)``
    (time becomes the channel axis), with datalist entries from
    :func:`nisf_monai.data.datalist.expand_cine_datalist` that carry the frame index in ``frame_key``.
    Channel ``t`` of each key is kept as ``(1, X, Y, Z)`` with its affine. A key with one channel (a 3D
    volume, e.g. the label of that one frame) and entries without ``frame_key`` pass unchanged, so the
    transform is harmless in a pipeline of 3D data.

    Args:
        keys: the cine images (and 4D labels) to slice.
        frame_key: entry key holding the frame index.
    """

    def __init__(self, keys: KeysCollection, frame_key: str = "frame", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame_key = frame_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = d.get(self.frame_key)
        if frame is None:
            return d
        t = int(frame)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] == 1:
                continue
            if not 0 <= t < img.shape[0]:
                raise InvalidCaseError(
                    f"{source_of(img, str(key))}: frame {t} requested but the series has {img.shape[0]} frames "
                    f"(array shape {tuple(img.shape)})."
                )
            d[key] = img[t : t + 1] if isinstance(img, torch.Tensor) else np.asarray(img)[t : t + 1]
            if isinstance(d[key], MetaTensor):
                d[key].meta[CINE_FRAME_KEY] = t  # so outputs of each frame get their own file name
        return d


def frame_name_formatter(metadict: dict | None, saver: Any) -> dict[str, Any]:
    """``output_name_formatter`` for MONAI ``SaveImage``: like its default, with ``_tNN`` added to the
    name of a frame cut from a cine series by :class:`SelectFramed`, so frames do not overwrite each
    other (``cine_t03_seg.nii.gz``)."""
    metadict = metadict or {}
    subject = str(metadict.get("filename_or_obj", getattr(saver, "_data_index", 0)))
    frame = metadict.get(CINE_FRAME_KEY)
    if frame is not None:
        name = Path(subject).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        subject = str(Path(subject).with_name(f"{stem}_t{int(frame):02d}.nii.gz"))
    return {"subject": subject, "idx": metadict.get("patch_index")}


def frame_case_name(img: Any, fallback: str) -> str:
    """The name of an image's case in reports and figures: its file name without the suffix (``fallback`` for an
    image not read from a file), with ``_tNN`` for a frame cut from a cine series by :class:`SelectFramed`, as
    :func:`frame_name_formatter` names output files."""
    name = case_name(source_of(img, fallback))
    frame = img.meta.get(CINE_FRAME_KEY) if isinstance(img, MetaTensor) else None
    return name if frame is None else f"{name}_t{int(frame):02d}"
