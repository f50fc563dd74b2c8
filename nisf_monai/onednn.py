"""A bound on oneDNN's primitive cache, for long runs over scans of many sizes.

PyTorch's CPU convolutions run through oneDNN, which keeps every primitive it creates (1024 by default), one set per
input shape along with its buffers. The heart localiser meets new slice shapes with almost every scan of a cohort,
so the kept primitives grew one inference process by about 150 MB over 20 ACDC frames, while recreating them costs
no measurable time (``benchmarks/cohort_memory.py``). oneDNN reads its capacity once, when it creates its first
primitive, so the bound must be set before the process's first convolution: ``inference.json`` sets it in
``initialize``.
"""

from __future__ import annotations

import logging
import os

__all__ = ["CAPACITY_VARIABLE", "limit_primitive_cache"]

CAPACITY_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"

logger = logging.getLogger("nisf_monai")


def limit_primitive_cache(capacity: int = 16) -> int:
    """Keep at most ``capacity`` oneDNN primitives, unless the environment already sets a capacity (which wins).
    Returns the capacity in force. Without effect once the process has created a oneDNN primitive."""
    if capacity < 0:
        raise ValueError(f"the oneDNN primitive cache capacity must be >= 0, got {capacity}.")
    given = os.environ.get(CAPACITY_VARIABLE)
    if given is not None:
        logger.debug("%s=%s given: kept", CAPACITY_VARIABLE, given)
        return int(given)
    os.environ[CAPACITY_VARIABLE] = str(int(capacity))
    return int(capacity)
