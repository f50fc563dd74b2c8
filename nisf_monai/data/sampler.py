"""Batches that keep a subject's frames together, for inference with one code per subject."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import Sampler

from nisf_monai.data.datalist import case_id
from nisf_monai.errors import InputDataError

__all__ = ["GroupBatchSampler"]


class GroupBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` for a ``DataLoader`` that yields the indices of ``groups_per_batch`` whole groups at a time,
    groups in order of first appearance and entries in datalist order within a group.

    The cine model fits one code to all frames of a subject, so those frames must reach the evaluator in one batch:
    ``group_key="subject"``. With ``group_key="case"`` (the per-frame model) every entry is its own group and the
    batches are those of ``batch_size=groups_per_batch`` without shuffling. An entry without ``group_key`` is grouped
    by its case ID (:func:`~nisf_monai.data.case_id`).

    Under ``torch.distributed`` each of ``num_replicas`` processes takes every ``num_replicas``-th share from its
    ``rank`` on (uneven shares, as an evaluation needs). A share is one group, or with ``shard_key`` all groups with
    the same value of that key: ``shard_key="subject"`` keeps a subject's frames, and the frames of one 4D cine
    file, on one process even when each frame is fitted alone (its outputs are joined by the process that wrote
    them).

    Args:
        data: the dataset's datalist entries (dicts).
        group_key: entry key that names each entry's group.
        groups_per_batch: groups per batch.
        num_replicas: processes sharing the groups.
        rank: this process's share.
        shard_key: entry key whose equal values go to one process (None: each group is a share).
        every_rank_busy: with several processes, require a share for each (an evaluation's metric all-gather
            waits for every process); False lets an inference run on more processes than shares.

    Raises:
        InputDataError: fewer shares than processes, when there are several and ``every_rank_busy``.
    """

    def __init__(
        self,
        data: Sequence[Mapping[Hashable, Any]],
        group_key: str = "subject",
        groups_per_batch: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        shard_key: str | None = None,
        every_rank_busy: bool = True,
    ) -> None:
        if groups_per_batch < 1:
            raise ValueError(f"groups_per_batch must be at least 1, got {groups_per_batch}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must lie in 0..{num_replicas - 1}.")
        groups: dict[str, list[int]] = {}
        for index, entry in enumerate(data):
            label = entry.get(group_key) if isinstance(entry, Mapping) else None
            name = str(label) if label is not None else case_id(entry) if isinstance(entry, Mapping) else str(index)
            groups.setdefault(name, []).append(index)
        shares: dict[str, list[list[int]]] = {}
        for name, group in groups.items():
            entry = data[group[0]]
            shard = entry.get(shard_key) if shard_key is not None and isinstance(entry, Mapping) else None
            shares.setdefault(name if shard is None else f"shard:{shard}", []).append(group)
        if num_replicas > 1 and every_rank_busy and len(shares) < num_replicas:
            raise InputDataError(
                f"{len(shares)} {shard_key or group_key} group(s) to share among {num_replicas} ranks: each rank "
                "needs at least one; add validation data or start fewer processes (torchrun --nproc_per_node)."
            )
        ordered = [group for share in list(shares.values())[rank::num_replicas] for group in share]
        self.batches = [
            [i for group in ordered[start : start + groups_per_batch] for i in group]
            for start in range(0, len(ordered), groups_per_batch)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(batch) for batch in self.batches])

    def __len__(self) -> int:
        return len(self.batches)
