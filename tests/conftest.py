"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SYNTHETIC_MODEL = Path(__file__).resolve().parent / "data" / "synthetic_model"
# the settings the synthetic model was trained with (the bundle's defaults now describe the ACDC model)
SYNTHETIC_MODEL_SETTINGS = {"heart_frame": False, "extent_mm": 400.0}


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: one intra-op thread is faster than two there and immune to a busy second
    core. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
