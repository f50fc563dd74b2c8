"""Multi-GPU / multi-node training with ``torch.distributed`` (``bundle/configs/multi_gpu_train.json``).

The network is synchronised by ``DistributedDataParallel``; the latent table is not wrapped in DDP but
held whole on every rank and its gradient combined here, because a ``DistributedSampler`` moves a case
from rank to rank between epochs and the table's gradients are sparse (one row per frame of the batch).
Everything here is a no-op in a single process, so the same trainer and handlers serve both cases.
"""

from __future__ import annotations

import os
from collections.abc import Sized

import torch
import torch.distributed as dist
from monai.data import DistributedSampler
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from nisf_monai.errors import InputDataError
from nisf_monai.networks import LatentTable, NISFNet

__all__ = [
    "NISFHeads",
    "all_ranks_agree",
    "broadcast_latent_table",
    "data_parallel",
    "distributed_sampler",
    "is_distributed",
    "is_rank_zero",
    "local_device",
    "shutdown",
    "shutdown_and_exit",
    "sync_latent_gradients",
    "unwrap_network",
    "world_size",
]


def is_distributed() -> bool:
    """A process group of more than one rank is initialised (the state in which ranks must be synchronised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group``.

    Rank 0 works on after the last collective (checkpoints, step selection, logs) while the other ranks have
    nothing left to do. A rank that tore its Gloo group down and exited meanwhile sometimes aborted with
    ``terminate called without an active exception`` (SIGABRT, about 1 run in 10 of the 2-process torchrun
    test with the cores oversubscribed; ``benchmarks/torchrun_loop.py``). After the barrier no rank has
    communication left in flight when any rank destroys its group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def shutdown_and_exit() -> None:
    """End a torchrun process once its work is done: :func:`shutdown`, flush the logs and standard streams, then
    leave with exit code 0 without running the interpreter's teardown.

    Even after the barrier and ``destroy_process_group``, a rank still aborted at interpreter exit now and then
    with ``terminate called without an active exception`` (a C++ thread object destroyed while joinable during
    teardown, after every file was written: 1 run in 12 of the 2-process training test). Skipping the teardown
    skips what aborts; everything the run writes is closed (and synced) before this. The bundle's multi-process
    configs call it as their last step; a single process, or a process that raised, exits as usual."""
    import logging
    import sys

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    shutdown()
    if not distributed:
        return
    _close_summary_writers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _close_summary_writers() -> None:
    """Close every TensorBoard ``SummaryWriter`` the run opened (MONAI's stats handlers do not), so their last
    events reach the disk before :func:`shutdown_and_exit` skips the teardown."""
    import gc
    import sys

    module = sys.modules.get("torch.utils.tensorboard")
    if module is None:
        return
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks a weakref proxy for its class, which raises once its referent died
        if issubclass(type(obj), module.SummaryWriter):
            obj.close()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    """True in a single process and on global rank 0: the one process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present (one GPU per process, as torchrun starts them), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class NISFHeads(nn.Module):
    """``forward`` = ``network.forward_heads``. DDP synchronises gradients only for what runs through its
    own ``forward``, and ``NISFNet.forward`` returns the segmentation head alone (the form MONAI's tools
    expect), so training wraps this view, which returns both heads and shares the network's parameters."""

    def __init__(self, network: NISFNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, coords: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.forward_heads(coords, latent)


def data_parallel(network: NISFNet, device: str | torch.device | None = None, **kwargs) -> DistributedDataParallel:
    """``DistributedDataParallel`` over :class:`NISFHeads` of ``network``, for :class:`NISFTrainer`.

    ``network`` itself stays unwrapped for the optimizer, the evaluator and the checkpoints (its parameters
    are the ones DDP broadcasts from rank 0 and keeps in step). ``kwargs`` go to DDP."""
    device = torch.device(device) if device is not None else next(network.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(NISFHeads(network), device_ids=device_ids, **kwargs)


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network inside ``DistributedDataParallel`` / ``DataParallel`` / :class:`NISFHeads`, so that
    state dicts carry no ``module.`` prefix and load into an unwrapped network."""
    while isinstance(network, (DistributedDataParallel, DataParallel, NISFHeads)):
        network = network.network if isinstance(network, NISFHeads) else network.module
    return network


def sync_latent_gradients(table: LatentTable) -> None:
    """Replace the table's local gradient by the mean over ranks, as DDP does for the network.

    Each rank's loss is a mean over its own batch of ``B`` frames, so the mean over ``R`` ranks equals the
    gradient of one process with the ``R * B`` frames. A sparse gradient becomes sparse again over the rows
    touched on any rank (a row touched only with a zero gradient still counts, as in one process, so
    ``SparseAdam`` moves exactly the rows it would move there); every rank then steps identically and the
    table and its optimizer state stay the same on all ranks. Communication: one all-reduce of the row
    count plus one of the touched rows (at most ``R * B`` x ``latent_dim``). No-op in a single process.
    """
    if not is_distributed():
        return
    weight = table.weight
    grad = weight.grad
    ranks = dist.get_world_size()
    if grad is None:
        # this rank looked nothing up (e.g. an empty batch); it still has to join the collectives
        grad = (
            torch.sparse_coo_tensor(
                torch.empty(1, 0, dtype=torch.long, device=weight.device),
                weight.new_empty(0, weight.shape[1]),
                tuple(weight.shape),
                check_invariants=True,
            )
            if table.sparse
            else torch.zeros_like(weight)
        )
    if not grad.is_sparse:
        grad = grad.clone()
        dist.all_reduce(grad)
        weight.grad = grad.div_(ranks)
        return
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    touched = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    touched[rows] = 1
    dist.all_reduce(touched)
    union = torch.nonzero(touched).squeeze(1)  # sorted, and the same on every rank
    summed = values.new_zeros(union.numel(), weight.shape[1])
    summed[torch.searchsorted(union, rows)] = values
    dist.all_reduce(summed)
    weight.grad = torch.sparse_coo_tensor(
        union[None], summed.div_(ranks), tuple(weight.shape), is_coalesced=True, check_invariants=True
    )


@torch.no_grad()
def broadcast_latent_table(table: LatentTable, src: int = 0) -> None:
    """Copy rank ``src``'s codes to every rank (DDP does the same for the network when it wraps it), so the
    ranks start from one table even if their random seeds differ. No-op in a single process."""
    if not is_distributed():
        return
    ids = [list(table.case_ids)]
    dist.broadcast_object_list(ids, src=src, device=_collective_device())
    if ids[0] != table.case_ids:
        raise ValueError(
            f"the latent table of rank {dist.get_rank()} holds other cases than rank {src} "
            f"({len(table)} vs {len(ids[0])}): every rank must build it from the same datalist."
        )
    codes = table.weight.detach().clone()
    dist.broadcast(codes, src=src)
    table.weight.copy_(codes)


def all_ranks_agree(values: list[int]) -> bool:
    """Whether every rank passed the same integers (True in a single process). A collective: all ranks call it."""
    if not is_distributed():
        return True
    local = torch.as_tensor(values, dtype=torch.long, device=_collective_device())
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def distributed_sampler(
    dataset: Sized, shuffle: bool = True, even_divisible: bool = True, name: str = "training", **kwargs
) -> DistributedSampler:
    """MONAI ``DistributedSampler`` over ``dataset`` after checking that every rank gets at least one item.

    With ``even_divisible=False`` (validation: each item once, no padding) a rank without items would leave
    the evaluator with an empty loader and the metric all-gather waiting for it; with padding every rank
    would train or validate on copies. Either way a set smaller than the number of ranks is a setup error.

    Raises:
        InputDataError: fewer items than ranks.
    """
    ranks = int(kwargs.get("num_replicas") or world_size())
    if len(dataset) < ranks:
        raise InputDataError(
            f"the {name} set has {len(dataset)} item(s) but training runs on {ranks} ranks: each rank needs at "
            f"least one; add {name} data or start fewer processes (torchrun --nproc_per_node)."
        )
    return DistributedSampler(dataset, shuffle=shuffle, even_divisible=even_divisible, **kwargs)
