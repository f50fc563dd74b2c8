"""Choosing the number of latent-optimisation steps on validation data (NISF's early stopping)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from ignite.engine import Engine, Events

from nisf_monai.distributed import is_distributed, is_rank_zero
from nisf_monai.io import atomic_write_json, json_safe
from nisf_monai.plotting import pyplot, save_figure

__all__ = ["StepSelectionHandler", "select_step", "selected_inference_steps"]

logger = logging.getLogger("nisf_monai")

STEPS_FILENAME = "inference_steps.json"


def select_step(steps: list[int], dice: np.ndarray) -> tuple[int, np.ndarray]:
    """The step with the best mean Dice and the mean curve.

    ``dice`` is ``(cases, len(steps), classes)`` with NaN where a class is absent from a case; classes are
    averaged first (ignoring NaN), then cases. Ties go to the earliest step (cheaper inference).
    """
    dice = np.asarray(dice, dtype=float)
    if dice.ndim != 3 or dice.shape[1] != len(steps):
        raise ValueError(f"expected Dice of shape (cases, {len(steps)}, classes), got {dice.shape}.")
    with np.errstate(invalid="ignore"):
        per_case = np.nanmean(dice, axis=2)
        curve = np.nanmean(per_case, axis=0)
    if np.all(np.isnan(curve)):
        raise ValueError("no Dice values recorded: do the validation labels hold any foreground?")
    best = int(np.nanargmax(curve))
    return int(steps[best]), curve


def selected_inference_steps(ckpt_dir: str | os.PathLike, default: int) -> int:
    """The step count saved by :class:`StepSelectionHandler` in ``ckpt_dir``, or ``default``."""
    path = Path(ckpt_dir) / STEPS_FILENAME
    if not path.is_file():
        return int(default)
    return int(json.loads(path.read_text())["inference_steps"])


class StepSelectionHandler:
    """Collects the evaluator's per-case ``dice_curve`` outputs and, when the evaluation ends, writes the
    best step count to ``save_dir/inference_steps.json`` (where ``inference.json`` reads it), with the mean
    curves, and a PNG of Dice against the step (the NISF paper's Fig. 3).

    Args:
        save_dir: folder of the JSON (the bundle's ``models``).
        figure_path: PNG path, or None for no figure.
        class_names: foreground class names for the figure and JSON.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        figure_path: str | os.PathLike | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.figure_path = None if figure_path is None else Path(figure_path)
        self.class_names = class_names
        self._steps: list[int] | None = None
        self._curves: list[list[list[float]]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._select)  # on every rank: it gathers

    def _reset(self, engine: Engine) -> None:
        self._steps, self._curves = None, []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            curve = output.get("dice_curve") if isinstance(output, dict) else None
            if curve is None:
                continue
            self._steps = list(curve["steps"])
            self._curves.append(curve["dice"])

    def _gather(self) -> None:
        """Under torch.distributed each rank validated its own share of the cases: pool every rank's curves
        so the selection is over all of them, as in one process."""
        if not is_distributed():
            return
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (self._steps, self._curves))
        self._steps = next((steps for steps, _ in shares if steps is not None), None)
        self._curves = [curve for _, curves in shares for curve in curves]

    def _select(self, engine: Engine) -> None:
        self._gather()
        if not is_rank_zero():  # the others hold the same pooled curves; one process writes
            return
        if not self._curves or self._steps is None:
            logger.warning("step selection: no Dice curves were recorded (set monitor_every > 0 and provide labels)")
            return
        dice = np.asarray(self._curves, dtype=float)
        best, curve = select_step(self._steps, dice)
        with np.errstate(invalid="ignore"):
            per_class = np.nanmean(dice, axis=0)  # (steps, classes)
        names = self.class_names or [f"class_{c + 1}" for c in range(dice.shape[2])]
        record: dict[str, Any] = {
            "inference_steps": best,
            "mean_dice_at_best": float(curve[self._steps.index(best)]),
            "num_cases": int(dice.shape[0]),
            "steps": self._steps,
            "mean_dice": json_safe(curve),
            "per_class_dice": {n: json_safe(per_class[:, c]) for c, n in enumerate(names)},
        }
        atomic_write_json(self.save_dir / STEPS_FILENAME, record)
        engine.state.metrics["selected_inference_steps"] = best
        logger.info(
            "step selection: best mean Dice %.4f at %d latent steps over %d cases",
            record["mean_dice_at_best"],
            best,
            dice.shape[0],
        )
        if self.figure_path is not None:
            self._plot(self._steps, curve, per_class, names, best)

    def _plot(self, steps: list[int], curve: np.ndarray, per_class: np.ndarray, names: list[str], best: int) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for c, name in enumerate(names):
            ax.plot(steps, per_class[:, c], label=name, alpha=0.7)
        ax.plot(steps, curve, "k-", linewidth=2, label="mean")
        ax.axvline(best, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel("latent optimisation step")
        ax.set_ylabel("Dice (validation)")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right")
        ax.set_title(f"Dice against latent step; best at {best}")
        fig.tight_layout()
        save_figure(fig, self.figure_path, dpi=100)
