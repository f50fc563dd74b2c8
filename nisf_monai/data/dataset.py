"""A dataset for inference that reports a bad case and goes on with the others."""

from __future__ import annotations

import logging
from typing import Any

from monai.data import Dataset

from nisf_monai.errors import find_input_error

__all__ = ["SKIPPED_KEY", "SkippingDataset"]

logger = logging.getLogger("nisf_monai")

SKIPPED_KEY = "skipped"


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
