"""ReleaseMemory hands freed heap back after every iteration of an inference run (glibc's malloc_trim)."""

from __future__ import annotations

import json

from helpers import CONFIGS
from ignite.engine import Engine

from nisf_monai.handlers import ReleaseMemory


def test_trims_once_per_iteration_and_inference_uses_it() -> None:
    handler = ReleaseMemory()
    calls = []
    handler._trim = lambda pad: calls.append(pad) or 1  # count what malloc_trim would be asked
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run([1, 2, 3], max_epochs=1)
    assert calls == [0, 0, 0]
    handlers = json.loads((CONFIGS / "inference.json").read_text())["handlers"]
    assert {"_target_": "nisf_monai.handlers.ReleaseMemory"} in handlers


def test_without_glibc_it_does_nothing() -> None:
    handler = ReleaseMemory()
    handler._trim = None
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run([1], max_epochs=1)  # no handler attached, nothing called
    handler()
