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


@pytest.fixture
def fused_weight_flags(monkeypatch) -> list[bool]:
    """``requires_grad`` of every weight the fused Gabor network receives, recorded call by call: a latent fit
    should hand it weights that do not require grad (so no weight gradient is computed)."""
    from nisf_monai.networks import fused

    flags: list[bool] = []
    apply = fused._GaborNetwork.apply

    def spy(points, weight_t, frame_bias, residual, *params):
        flags.extend(t.requires_grad for t in (weight_t, *params))
        return apply(points, weight_t, frame_bias, residual, *params)

    monkeypatch.setattr(fused._GaborNetwork, "apply", spy)
    return flags
