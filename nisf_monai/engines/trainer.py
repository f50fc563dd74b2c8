"""Auto-decoder training: the network and the per-case latent codes are optimised together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from nisf_monai.denormals import flush_denormal
from nisf_monai.distributed import NISFHeads, broadcast_latent_table, is_distributed, sync_latent_gradients
from nisf_monai.losses import NISFLoss
from nisf_monai.networks import LatentTable, NISFNet

__all__ = ["NISFTrainer"]


class NISFTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` for NISF: each batch holds point sets of several frames; their codes
    come from ``latent_table`` by case ID, and one iteration steps both the network's optimizer and the
    table's own (``SparseAdam`` by default, so only the batch's codes move).

    Batch keys (from ``CoordinateGridd`` + ``RandPointSampled``): ``coords (B, 3, N)`` (``(B, 4, N)`` with the
    cardiac phase for the cine model), ``image (B, 1, N)``
    intensities in [0, 1], ``label (B, 1, N)`` class indices and ``latent_key`` (case IDs). The engine's
    output holds ``pred`` (segmentation logits), ``label``, ``loss`` and the loss terms.

    Under ``torch.distributed`` (``multi_gpu_train.json``) ``network`` is the DDP wrapper of
    :func:`nisf_monai.distributed.data_parallel`. The table is not wrapped: every rank holds all of it (a
    ``DistributedSampler`` moves cases between ranks from epoch to epoch), and after each backward its
    gradient is averaged over the ranks by :func:`~nisf_monai.distributed.sync_latent_gradients`, the way
    DDP averages the network's. ``R`` ranks with batch ``B`` then step as one process with batch ``R * B``,
    and the table and its optimizer state stay identical on every rank. At the start of a run rank 0's
    codes are broadcast (after any resume).

    Args:
        device, max_epochs, train_data_loader, optimizer: as for ``SupervisedTrainer``.
        network: the :class:`NISFNet`, or under ``torch.distributed`` its :func:`data_parallel` wrapper.
        latent_table: the codes of the training cases.
        latent_optimizer: optimizer over ``latent_table.parameters()``.
        loss_function: a :class:`NISFLoss`.
        latent_key: batch key of the case IDs that index the table.
        coords_key, image_key, label_key: batch keys of the point sets.
        labelled_key: batch key of the per-sample flag "has a manual label"
            (:class:`~nisf_monai.transforms.FlagLabelledd`; absent: every sample is labelled); unlabelled samples train
            the intensity head only.
        kwargs: passed to ``SupervisedTrainer`` (handlers, amp, postprocessing, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: NISFNet | DistributedDataParallel,
        optimizer: Optimizer,
        latent_table: LatentTable,
        latent_optimizer: Optimizer,
        loss_function: NISFLoss,
        latent_key: str = "case",
        coords_key: str = "coords",
        image_key: str = "image",
        label_key: str = "label",
        labelled_key: str = "labelled",
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            train_handlers=train_handlers,
            **kwargs,
        )
        self.latent_table = latent_table
        self.latent_optimizer = latent_optimizer
        self.latent_key = latent_key
        self.coords_key = coords_key
        self.image_key = image_key
        self.label_key = label_key
        self.labelled_key = labelled_key
        if isinstance(network, DistributedDataParallel) and not isinstance(network.module, NISFHeads):
            raise ValueError(
                "NISFTrainer needs both network heads through DDP: wrap the network with "
                "nisf_monai.distributed.data_parallel(network), not DistributedDataParallel(network)."
            )
        # registered after the train handlers, so a resumed table is what gets broadcast
        self.add_event_handler(Events.STARTED, self._start_ranks)

    def run(self) -> None:  # type: ignore[override]
        """Train with subnormal floats flushed to zero on every compute thread (the Gabor activation's
        Gaussian produces many, and several CPUs compute on them very slowly); the caller's setting is
        restored afterwards."""
        with flush_denormal():
            super().run()

    def _start_ranks(self, engine: NISFTrainer) -> None:
        if not is_distributed():
            return
        if not isinstance(engine.network, DistributedDataParallel):
            raise ValueError(
                "torch.distributed is initialised with several ranks but the network is not wrapped in "
                "DistributedDataParallel: the ranks would train apart. Use nisf_monai.distributed.data_parallel "
                "(see bundle/configs/multi_gpu_train.json)."
            )
        broadcast_latent_table(self.latent_table)

    @staticmethod
    def _heads(network: nn.Module) -> Any:
        """What returns both heads: DDP's forward (over :class:`NISFHeads`), so that DDP sees the pass, or
        the plain network's ``forward_heads``."""
        return network if isinstance(network, DistributedDataParallel) else network.forward_heads

    def _iteration(self, engine: NISFTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device, non_blocking = engine.state.device, engine.non_blocking
        coords = torch.as_tensor(batchdata[self.coords_key]).to(device, non_blocking=non_blocking)
        intensity = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking)
        label = torch.as_tensor(batchdata[self.label_key]).to(device, non_blocking=non_blocking)
        case_ids = _as_list(batchdata[self.latent_key])
        labelled = batchdata.get(self.labelled_key)  # cine frames without a label: intensity only

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        self.latent_optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device_type=torch.device(device).type, enabled=bool(engine.amp), **engine.amp_kwargs)
        with autocast:
            latents = self.latent_table(case_ids)
            seg_logits, intensity_logit = self._heads(engine.network)(coords, latents)
            engine.state.output = {Keys.IMAGE: coords, Keys.LABEL: label, Keys.PRED: seg_logits}
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(seg_logits, intensity_logit, label, intensity, latents, labelled)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.scaler is not None and engine.amp:
            engine.scaler.scale(loss).backward()
            sync_latent_gradients(self.latent_table)  # DDP has averaged the network's during backward
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.step(self.latent_optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            sync_latent_gradients(self.latent_table)  # DDP has averaged the network's during backward
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
            self.latent_optimizer.step()
        engine.state.output.update(getattr(engine.loss_function, "terms", {}))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _as_list(ids: Any) -> list[str]:
    if isinstance(ids, str):
        return [ids]
    return [str(i) for i in ids]
