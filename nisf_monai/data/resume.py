"""Resuming a cohort run: the datalist entries whose outputs are not yet all written.

Inference writes a case's ``<case>_qc.json`` last (atomically, after its segmentation), so a case with that file
and a segmentation (its own ``<case>_seg.nii.gz``, or for a frame of a 4D cine the joined ``<name>_seg.nii.gz``)
is complete. A run stopped half-way and started again then fits only the cases still missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nisf_monai.data.datalist import case_name

__all__ = ["is_written", "pending_entries"]

logger = logging.getLogger("nisf_monai")


def is_written(entry: dict[str, Any], output_dir: str | os.PathLike, image_key: str = "image") -> bool:
    """Whether every output of one inference datalist entry is in ``output_dir``."""
    out = Path(output_dir)
    case = str(entry.get("case", case_name(entry[image_key])))
    if not (out / f"{case}_qc.json").is_file():
        return False
    names = {case, case_name(entry[image_key])}  # a frame's own file, or its cine's joined one
    return any((out / f"{name}_seg.nii.gz").is_file() for name in names)


def pending_entries(
    datalist: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    group_key: str = "case",
) -> list[dict[str, Any]]:
    """The entries of ``datalist`` to run: all with ``overwrite``, else those whose outputs are not all written.
    Entries are kept or skipped by ``group_key`` (``subject`` for the cine model), so that frames fitted with one
    code are fitted together again when any of them is missing."""
    if overwrite:
        return list(datalist)
    groups = [e.get(group_key, id(e)) for e in datalist]
    pending = {g for g, e in zip(groups, datalist) if not is_written(e, output_dir)}
    kept = [e for g, e in zip(groups, datalist) if g in pending]
    done = len(datalist) - len(kept)
    if done:
        logger.info(
            "%d of %d cases already written in %s: skipped (--overwrite True runs them again)",
            done,
            len(datalist),
            output_dir,
        )
    return kept
