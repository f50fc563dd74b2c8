"""Saving and resuming NISF training: network, latent table, optimisers and epoch, written atomically."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim import Optimizer

from nisf_monai.networks import LatentTable

__all__ = ["TrainingStateHandler", "atomic_save"]

logger = logging.getLogger("nisf_monai")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it: a process killed while
    saving leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TrainingStateHandler:
    """Keeps two files in ``save_dir`` up to date and resumes from them.

    - ``model_filename`` (``model.pt``): the network's plain ``state_dict``, what MONAI Model Zoo tools,
      TorchScript export and MONAI Label load.
    - ``state_filename`` (``training_state.pt``): network, latent table (codes with their subject IDs),
      both optimisers and the trainer's epoch and iteration, to resume after an interruption.

    Both are written at the end of every ``save_interval``-th epoch and of training, each atomically, so an
    interruption loses at most the epoch under way. With ``resume=True`` a run that finds ``state_filename`` continues from it:
    codes are restored by subject ID (new subjects start fresh); the latent optimiser's row-wise moments
    are restored only when the subject set is unchanged. Files hold tensors and plain types only, so they
    load with ``torch.load(weights_only=True)``.

    Args:
        save_dir: folder of both files (the bundle's ``models``).
        network: the NISF network.
        latent_table: the training subjects' codes.
        optimizer: the network's optimiser.
        latent_optimizer: the table's optimiser.
        save_interval: epochs between saves.
        resume: continue from an existing ``state_filename``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: nn.Module,
        latent_table: LatentTable,
        optimizer: Optimizer,
        latent_optimizer: Optimizer,
        model_filename: str = "model.pt",
        state_filename: str = "training_state.pt",
        save_interval: int = 1,
        resume: bool = True,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.latent_table = latent_table
        self.optimizer = optimizer
        self.latent_optimizer = latent_optimizer
        self.model_path = self.save_dir / model_filename
        self.state_path = self.save_dir / state_filename
        self.save_interval = max(1, int(save_interval))
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "latent_table": self.latent_table.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "latent_optimizer": self.latent_optimizer.state_dict(),
            "trainer": {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)},
        }

    def save(self, engine: Engine) -> None:
        atomic_save(self.state_dict(engine), self.state_path)
        atomic_save(self.network.state_dict(), self.model_path)
        logger.info("epoch %d: saved %s and %s", engine.state.epoch, self.model_path, self.state_path)

    def load(self, engine: Engine) -> None:
        if not (self.resume and self.state_path.exists()):
            return
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            self.network.load_state_dict(state["network"])
            self.latent_table.load_state_dict(state["latent_table"])
        except (RuntimeError, KeyError, OSError, EOFError) as err:
            raise RuntimeError(
                f"cannot resume from {self.state_path}: {err}. Delete it (or set resume to false) to start afresh."
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        if self.latent_table.same_subjects(state["latent_table"]):
            self.latent_optimizer.load_state_dict(state["latent_optimizer"])
        else:
            logger.info("subject set changed since %s: the latent optimiser starts afresh", self.state_path)
        engine.state.epoch = int(state["trainer"]["epoch"])
        engine.state.iteration = int(state["trainer"]["iteration"])
        logger.info("resumed from %s at epoch %d", self.state_path, engine.state.epoch)
