"""A dataset for inference that reports a bad case and goes on with the others, and how a run over many cases
accounts for the ones that failed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset

from nisf_monai.errors import NoUsableCaseError, find_input_error
from nisf_monai.io import atomic_write_text

__all__ = ["FAILED_CASES_FILENAME", "SKIPPED_KEY", "SkippingDataset", "report_failed_cases", "write_failed_cases"]

logger = logging.getLogger("nisf_monai")

SKIPPED_KEY = "skipped"
FAILED_CASES_FILENAME = "failed_cases.txt"
MAX_NAMED = 5  # failed cases named in the last log line; the file lists all of them


class SkippingDataset(Dataset):
    """``monai.data.Dataset`` whose items that fail with a user-data error (an unreadable file, a NaN image,
    ...: :class:`~nisf_monai.errors.InputDataError`) come back as ``{"skipped": message, ...}`` instead of
    stopping the run, and are logged. Running unattended over thousands of scans, one bad file should
    cost its own output only. Other exceptions (bugs) still propagate.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:
            found = find_input_error(err)
            if found is None:
                raise
            logger.error("skipping case %d: %s", index, found)
            item = self.data[index]
            source = item.get("image", index) if isinstance(item, dict) else index
            return {SKIPPED_KEY: str(found), "source": str(source)}


def _reason(source: str, message: str) -> str:
    """The error message without the file name it starts with (the file's line names it already)."""
    prefix = f"{source}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def write_failed_cases(output_dir: str | os.PathLike, failed: Sequence[tuple[str, str]]) -> str | None:
    """Write ``output_dir/failed_cases.txt``: one line ``<source>\\t<reason>`` per failed case, so an unattended
    run's failures can be found (and rerun) without reading its log. With no failure, a list left there by an
    earlier run is removed, so the file always describes the last run. Returns the path written, or None."""
    path = Path(output_dir) / FAILED_CASES_FILENAME
    if not failed:
        if path.is_file():
            path.unlink()
            logger.info("removed %s of an earlier run: no case failed this time", path)
        return None
    lines = [f"{source}\t{' '.join(_reason(source, message).split())}" for source, message in failed]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def report_failed_cases(failed: Sequence[tuple[str, str]], num_done: int, listed_in: str | None = None) -> None:
    """End a run over many cases: raise :class:`~nisf_monai.errors.NoUsableCaseError` if every case failed
    (the run produced nothing and must not look successful), else, if some failed, log how many as the run's
    last line. ``failed`` holds ``(source, reason)`` pairs; ``listed_in`` is the file that lists them."""
    if not failed:
        return
    where = f"listed in {listed_in}" if listed_in else "see the errors above"
    if num_done == 0:
        raise NoUsableCaseError(f"all {len(failed)} case(s) failed, nothing was produced ({where}).")
    names = ", ".join(source for source, _ in failed[:MAX_NAMED]) + (", ..." if len(failed) > MAX_NAMED else "")
    logger.warning("%d case(s) were skipped and %d done (%s): %s", len(failed), num_done, where, names)
