"""The bound on oneDNN's primitive cache: set after torch is imported, it still bounds what convolutions keep; a
capacity the user gives in the environment wins; inference sets it before anything convolves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import CONFIGS

from nisf_monai.onednn import CAPACITY_VARIABLE, limit_primitive_cache

# a 2D UNet (the localiser's kind) run on 12 slice shapes: how much resident memory the kept primitives add
GROWTH = """
import torch
from nisf_monai.onednn import limit_primitive_cache
limit_primitive_cache(2)
from monai.networks.nets import UNet
torch.set_num_threads(1)
net = UNet(2, 1, 4, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
with torch.no_grad():
    net(torch.rand(2, 1, 64, 64))
    start = rss()
    for i in range(12):
        net(torch.rand(2, 1, 80 + 16 * i, 80 + 16 * i))
print(rss() - start)
"""


def growth_mb(**env: str) -> float:
    environment = {k: v for k, v in os.environ.items() if k != CAPACITY_VARIABLE}
    result = subprocess.run(
        [sys.executable, "-c", GROWTH], env={**environment, **env}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_the_bound_keeps_convolutions_from_piling_up_primitives() -> None:
    bounded = growth_mb()
    unbounded = growth_mb(**{CAPACITY_VARIABLE: "1024"})  # the user's setting wins over the call's 2
    assert bounded < unbounded - 15, (bounded, unbounded)


def test_a_capacity_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CAPACITY_VARIABLE, raising=False)
    assert limit_primitive_cache(16) == 16 and os.environ[CAPACITY_VARIABLE] == "16"
    monkeypatch.setenv(CAPACITY_VARIABLE, "64")
    assert limit_primitive_cache(16) == 64 and os.environ[CAPACITY_VARIABLE] == "64"
    with pytest.raises(ValueError, match=">= 0"):
        limit_primitive_cache(-1)


def test_inference_bounds_the_cache_before_anything_runs() -> None:
    for name in ("inference.json", "multi_gpu_inference.json"):
        steps = json.loads((CONFIGS / name).read_text())["initialize"]
        assert "$nisf_monai.onednn.limit_primitive_cache(@onednn_primitive_cache)" in steps, name
