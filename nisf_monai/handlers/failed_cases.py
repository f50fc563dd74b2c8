"""Ignite handler that lists the cases a run could not use in a file beside its outputs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nisf_monai.data.dataset import write_failed_cases
from nisf_monai.distributed import is_distributed

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["FailedCasesHandler"]


class FailedCasesHandler:
    """At the end of a :class:`~nisf_monai.engines.LatentOptimisationEvaluator` run, writes the cases it skipped
    (``engine.state.failed_cases``) to ``output_dir/failed_cases.txt``, one ``<source>\\t<reason>`` line each, or
    removes such a file of an earlier run when none failed. The evaluator's last log line names the file.

    Args:
        output_dir: the run's output folder.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if is_distributed():
            return  # under torchrun the ranks' failures are merged into one file by run_shard
        engine.state.failed_cases_file = write_failed_cases(self.output_dir, getattr(engine.state, "failed_cases", []))
