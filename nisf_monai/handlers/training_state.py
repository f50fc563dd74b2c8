"""Saving and resuming NISF training: network, latent table, optimizers and epoch, written atomically."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim import Optimizer

from nisf_monai.distributed import all_ranks_agree, is_distributed, is_rank_zero, unwrap_network
from nisf_monai.errors import InputDataError
from nisf_monai.io import atomic_open, temporary_files
from nisf_monai.networks import LatentTable
from nisf_monai.networks.latent_table import saved_case_ids

__all__ = ["CheckpointError", "TrainingStateHandler", "atomic_save", "describe_state_mismatch"]

logger = logging.getLogger("nisf_monai")


class CheckpointError(InputDataError, RuntimeError):
    """A training state that cannot be resumed with this config (unreadable, or saved with another
    ``latent_dim``, class count, network size or case set); the message says which setting differs.
    A ``RuntimeError`` as before, and an ``InputDataError`` so the bundle prints it as one line."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`nisf_monai.io.atomic_open`: a process killed while saving leaves the
    previous file intact, never a truncated one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _num_layers(keys: Any) -> int:
    return len({m.group(1) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))})


def describe_state_mismatch(state: dict[str, Any], network: nn.Module, latent_table: LatentTable) -> str | None:
    """Which setting differs between a saved training state and the objects built from the config,
    as ``'<setting> <saved> in checkpoint vs <current> in config'``; None when the shapes agree.

    Checked in the order that explains the most: the code size (it also changes the network's input
    layer), the class count (rows of ``seg_head``), the hidden width, the layer count, then any other
    parameter whose shape or presence differs. The case set is left to the latent table, which maps
    codes by ID unless ``strict_cases`` is set."""
    saved_table = state.get("latent_table", {})
    saved_codes = saved_table.get("weight") if isinstance(saved_table, dict) else None
    if (
        isinstance(saved_codes, torch.Tensor)
        and saved_codes.ndim == 2
        and saved_codes.shape[1] != latent_table.latent_dim
    ):
        return f"latent_dim {saved_codes.shape[1]} in checkpoint vs {latent_table.latent_dim} in config"
    saved, current = _shapes(state.get("network", {})), _shapes(network.state_dict())
    head = "seg_head.weight"
    if head in saved and head in current:
        if saved[head][0] != current[head][0]:
            return (
                f"number of classes {saved[head][0]} in checkpoint vs {current[head][0]} in config "
                "(label_names, background included)"
            )
        if saved[head][1] != current[head][1]:
            return f"hidden_dim {saved[head][1]} in checkpoint vs {current[head][1]} in config"
    layers_saved, layers_now = _num_layers(saved), _num_layers(current)
    if layers_saved != layers_now:
        return f"num_layers {layers_saved} in checkpoint vs {layers_now} in config"
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        return (
            f"network parameters differ (missing from checkpoint: {missing[:3]}, not in config: {unexpected[:3]}); "
            "was it trained with another activation or network version?"
        )
    for key, shape in current.items():
        if saved[key] != shape:
            return f"network parameter {key} of shape {saved[key]} in checkpoint vs {shape} in config"
    return None


class TrainingStateHandler:
    """Keeps two files in ``save_dir`` up to date and resumes from them.

    - ``model_filename`` (``model.pt``): the network's plain ``state_dict``, what MONAI Model Zoo tools,
      TorchScript export and MONAI Label load.
    - ``state_filename`` (``training_state.pt``): network, latent table (codes with their case IDs),
      both optimizers and the trainer's epoch and iteration, to resume after an interruption.

    Both are written at the end of every ``save_interval``-th epoch and of training, each atomically, so an
    interruption loses at most the epoch under way. With ``resume=True`` a run that finds ``state_filename``
    continues from it: codes are restored by case ID (new cases start fresh); the latent optimizer's
    row-wise moments are restored only when the case set is unchanged. States written before the rename of
    subject to case (IDs saved as ``subject_ids``) resume as well. A state that already reached
    ``max_epochs`` (a finished run) restores weights, codes and optimizers but not the epoch, so the new run
    trains ``max_epochs`` epochs from there rather than ending at once (MONAI Label sends every training
    request with the same ``max_epochs``; raise ``max_epochs`` to instead continue an unfinished count).
    Files hold tensors and plain types only, so they load with ``torch.load(weights_only=True)`` (and are
    read that way: a checkpoint cannot run code).

    A state saved with another ``latent_dim``, class count, network size or (with
    ``LatentTable.strict_cases``) case set raises :class:`CheckpointError` naming the setting, e.g.
    ``latent_dim 16 in checkpoint vs 32 in config``, already when the handler is attached (while the
    bundle builds the trainer). Temporary files of a save that was killed are removed when training starts.

    Under ``torch.distributed`` every rank attaches the handler: all ranks resume from the file (they must
    see the same one, e.g. ``save_dir`` on a file system shared by the nodes, or a ``CheckpointError`` says
    which did not), and rank 0 alone writes and tidies the files. A DDP-wrapped ``network`` is unwrapped,
    so the files hold the plain network's keys either way.

    Args:
        save_dir: folder of both files (the bundle's ``models``).
        network: the NISF network (or a DDP wrapper of it).
        latent_table: the training cases' codes.
        optimizer: the network's optimizer.
        latent_optimizer: the table's optimizer.
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
        self.network = unwrap_network(network)
        self.latent_table = latent_table
        self.optimizer = optimizer
        self.latent_optimizer = latent_optimizer
        self.model_path = self.save_dir / model_filename
        self.state_path = self.save_dir / state_filename
        self.save_interval = max(1, int(save_interval))
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        # an incompatible state fails here, while the trainer is built, rather than inside the run, where
        # ignite and StatsHandler would log a traceback around the one-line message
        if self.resume and self.state_path.exists():
            self.check(self._read())
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
        if not is_rank_zero():  # the other ranks hold the same state (DDP and the latent sync keep it so)
            return
        atomic_save(self.state_dict(engine), self.state_path)
        atomic_save(self.network.state_dict(), self.model_path)
        logger.info("epoch %d: saved %s and %s", engine.state.epoch, self.model_path, self.state_path)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files that a process killed inside :func:`atomic_save` left beside the two
        files (``.model.pt.*.tmp``); they are never read, only clutter. Returns what was removed."""
        removed = []
        for target in (self.model_path, self.state_path):
            for tmp in temporary_files(target):
                try:
                    tmp.unlink()
                    removed.append(tmp)
                except OSError:  # another process may have renamed it meanwhile
                    pass
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), self.save_dir)
        return removed

    def _fail(self, reason: str) -> CheckpointError:
        return CheckpointError(
            f"cannot resume from {self.state_path}: {reason}. Use the config it was trained with, or delete it "
            "(or set resume to false) to start afresh."
        )

    def _read(self) -> dict[str, Any]:
        """The saved training state, loaded with ``weights_only=True`` (tensors and plain types only)."""
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise self._fail(f"the file is unreadable ({type(err).__name__}: {first})") from err
        return state

    def check(self, state: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` naming the setting that differs if ``state`` cannot be resumed
        into this handler's network and latent table."""
        if not isinstance(state, dict):
            raise self._fail(f"it holds a {type(state).__name__}, not a training state")
        missing = [k for k in ("network", "latent_table", "optimizer", "latent_optimizer", "trainer") if k not in state]
        if missing:
            raise self._fail(f"it is not a training state (no {missing})")
        mismatch = describe_state_mismatch(state, self.network, self.latent_table)
        if mismatch:
            raise self._fail(mismatch)
        self._check_cases(state["latent_table"])

    def _check_cases(self, saved_table: dict[str, Any]) -> None:
        """With ``strict_cases``, the saved codes must be of the datalist's cases exactly."""
        if self.latent_table.strict_cases and not self.latent_table.same_cases(saved_table):
            saved = set(saved_case_ids(saved_table))
            current = set(self.latent_table.case_ids)
            raise self._fail(
                f"cases differ with strict_cases set: {len(current - saved)} in the datalist only "
                f"(e.g. {sorted(current - saved)[:3]}), {len(saved - current)} in the checkpoint only "
                f"(e.g. {sorted(saved - current)[:3]})"
            )

    def load(self, engine: Engine) -> None:
        if self.save_dir.is_dir() and is_rank_zero():  # elsewhere a temporary may be rank 0's save under way
            self.remove_stale_temporaries()
        if not self.resume:
            return
        found = self.state_path.exists()
        if found:
            self._restore(engine)
        if is_distributed():
            self._check_ranks_agree(engine, found)

    def _check_ranks_agree(self, engine: Engine, found: bool) -> None:
        """Under ``torch.distributed``: every rank resumed from the same epoch (or none found a state)."""
        position = [int(engine.state.epoch), int(engine.state.iteration)] if found else [-1, -1]
        if not all_ranks_agree(position):
            here = f"epoch {position[0]}" if found else "none"
            raise self._fail(
                f"the ranks found different training states (rank {torch.distributed.get_rank()}: {here}); "
                "with several nodes save_dir must be on a file system they all share"
            )

    def _restore(self, engine: Engine) -> None:
        state = self._read()
        self.check(state)
        self._restore_weights(state)
        self._restore_optimizers(state)
        self._restore_position(engine, state["trainer"])

    def _restore_weights(self, state: dict[str, Any]) -> None:
        """The network's weights and the latent table's codes (by case ID)."""
        try:
            self.network.load_state_dict(state["network"])
            self.latent_table.load_state_dict(state["latent_table"])
        except (RuntimeError, KeyError) as err:
            raise self._fail(str(err).replace("\n", " ").replace("\t", "")) from err

    def _restore_optimizers(self, state: dict[str, Any]) -> None:
        """The network's optimizer, and the latent optimizer's row-wise moments if the case set is unchanged."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.latent_table.same_cases(state["latent_table"]):
                self.latent_optimizer.load_state_dict(state["latent_optimizer"])
            else:
                logger.info("case set changed since %s: the latent optimizer starts afresh", self.state_path)
        except (ValueError, KeyError) as err:
            raise self._fail(f"the optimizer state does not fit ({err})") from err

    def _restore_position(self, engine: Engine, trainer: dict[str, Any]) -> None:
        """The trainer's epoch and iteration, unless the saved run had finished (see the class docstring)."""
        saved_epoch = int(trainer["epoch"])
        if engine.state.max_epochs is not None and saved_epoch >= engine.state.max_epochs:
            # a finished run: a new request (a rerun, MONAI Label's next training request) trains again from
            # the saved weights and codes instead of ending at once with nothing done
            logger.info(
                "%s finished at epoch %d (max_epochs %d): training %d more epochs from its weights and codes",
                self.state_path,
                saved_epoch,
                engine.state.max_epochs,
                engine.state.max_epochs,
            )
            return
        engine.state.epoch = saved_epoch
        engine.state.iteration = int(trainer["iteration"])
        logger.info("resumed from %s at epoch %d", self.state_path, engine.state.epoch)
