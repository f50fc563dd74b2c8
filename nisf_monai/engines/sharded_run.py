"""Inference and evaluation spread over processes (``torchrun ... run inference`` with
``bundle/configs/multi_gpu_inference.json``): each rank fits its own share of the cases, then rank 0 writes what
covers them all.

Every case is fitted from its own seeded generator, so which rank fits it does not change its outputs; the
evaluator's sampler (:class:`~nisf_monai.data.GroupBatchSampler` with ``shard_key="subject"``) keeps a subject's
frames on one rank. A rank whose every case failed is not an error while others produced outputs: the failures
of all ranks are merged into one ``failed_cases.txt`` and the run fails only when no rank produced anything.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from nisf_monai.data.dataset import report_failed_cases, write_failed_cases
from nisf_monai.distributed import is_distributed, is_rank_zero
from nisf_monai.errors import NoUsableCaseError

__all__ = ["run_shard"]


def run_shard(evaluator: Any, output_dir: str | os.PathLike, quality_control: Any | None = None) -> None:
    """Run this process's share with ``evaluator``, then on rank 0 write the merged failed-cases list and (with
    ``quality_control``, a :class:`~nisf_monai.handlers.QualityControlHandler`) the cohort's ``qc_summary.csv``.

    Raises:
        NoUsableCaseError: on every rank, when the cases of all ranks failed.
    """
    try:
        evaluator.run()
    except NoUsableCaseError:
        pass  # this rank's cases all failed; counted with the others' below
    state = evaluator.state
    local = (int(getattr(state, "num_cases_done", 0)), list(getattr(state, "failed_cases", [])))
    shares = [local]
    if is_distributed():
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, local)
    done = sum(count for count, _ in shares)
    failed = [case for _, cases in shares for case in cases]
    rank_zero = is_rank_zero()
    listed = None
    if rank_zero:
        listed = write_failed_cases(output_dir, failed)
        if quality_control is not None:
            quality_control.write_summary()
    if is_distributed():
        dist.barrier()  # the merged files are written before any rank reports or leaves
    if rank_zero or done == 0:
        report_failed_cases(failed, done, listed)
