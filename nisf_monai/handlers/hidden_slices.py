"""Ignite handler that scores the segmentation of slices hidden from the latent fit next to the label-interpolation
baselines of :mod:`nisf_monai.baselines`, and writes CSV, JSON and a PNG of example slices."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch

from nisf_monai.baselines import hidden_slice_dice, nearest_slice_labels, scored_slices, shape_based_labels
from nisf_monai.io import atomic_open, atomic_write_json, json_safe
from nisf_monai.plotting import draw_outlines, pyplot, save_figure
from nisf_monai.spatial import affine_array, voxel_sizes
from nisf_monai.transforms.loading import frame_case_name
from nisf_monai.transforms.masks import kept_slices

__all__ = ["HiddenSliceReport"]

logger = logging.getLogger("nisf_monai")

METHODS = ("nisf", "nearest", "shape_based")


def _array(x: Any) -> np.ndarray:
    """A ``(1, X, Y, Z)`` tensor or array as a numpy ``(X, Y, Z)`` array."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return np.asarray(t.detach().cpu())[0]


def _in_plane_spacing(image: Any, axis: int) -> list[float]:
    """Spacing (mm) of the two in-plane array axes, from the image affine (1 mm without one)."""
    if not isinstance(image, MetaTensor):
        return [1.0, 1.0]
    spacing = voxel_sizes(affine_array(image))
    return [float(s) for a, s in enumerate(spacing) if a != axis % 3]


def _heart_box(label: np.ndarray, margin: float = 0.4) -> tuple[slice, ...]:
    """The labelled part of a 2D slice with a margin (a share of its size, at least 8 pixels), for figures."""
    if not label.any():
        return (slice(None), slice(None))
    box = []
    for axis in range(2):
        present = np.flatnonzero(label.any(axis=1 - axis))
        pad = max(8, int(margin * (present[-1] - present[0] + 1)))
        box.append(slice(max(0, present[0] - pad), present[-1] + pad + 1))
    return tuple(box)


class HiddenSliceReport:
    """Scores the segmentation of slices hidden from the latent optimisation, next to the baselines.

    For each case of the evaluator's output (``image``, ``label``, ``pred`` on the image grid and the
    ``mask`` that restricted the fit), the hidden slices are those the mask keeps no voxel of; those
    between kept slices (all of them with ``include_extrapolated``) are scored. Per case and class it
    records Dice of NISF, :func:`nearest_slice_labels` and :func:`shape_based_labels` (both interpolating
    the kept slices' ground truth) on those slices, and NISF's Dice on the whole volume
    (``nisf_all_slices``; the only score when no slice is hidden, e.g. for sparse points). At the end it
    writes ``<prefix>.csv`` (one row per case and method), ``<prefix>.json`` (settings, cases, mean and
    std per method and class) and ``<prefix>_examples.png`` (for up to ``max_figures`` cases, the hidden
    slice with the most LV blood pool: image, ground truth, NISF, nearest, shape-based) to ``output_dir``.

    Args:
        output_dir: folder of the outputs.
        class_names: class names, background first.
        max_figures: cases shown in the PNG.
        include_extrapolated: also score hidden slices beyond the first or last kept slice.
        axis: spatial axis of the slices (-1: last).
        prefix: file name stem of the outputs.
        settings: recorded in the JSON (e.g. the kept slices and the model).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        max_figures: int = 4,
        include_extrapolated: bool = False,
        axis: int = -1,
        prefix: str = "hidden_slice_dice",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.max_figures = int(max_figures)
        self.include_extrapolated = include_extrapolated
        self.axis = int(axis) % 3 - 3  # negative: the same axis of (X, Y, Z) labels and (1, X, Y, Z) masks
        self.prefix = prefix
        self.settings = dict(settings or {})
        self.cases: list[dict[str, Any]] = []
        self._examples: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.cases, self._examples = [], []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else decollate_batch(output)
        for item in items:
            self.score(item)

    def score(self, item: dict[str, Any]) -> dict[str, Any]:
        """Score one case (a dict as above) and keep its record."""
        image, label, pred = item["image"], _array(item["label"]), _array(item["pred"])
        name = frame_case_name(image, f"case{len(self.cases)}")
        if pred.shape != label.shape:
            raise ValueError(
                f"{name}: prediction {pred.shape} is not on the label grid {label.shape}; "
                "score hidden slices with target_spacing null."
            )
        mask = item.get("mask")
        num_slices = label.shape[self.axis]
        kept = kept_slices(mask, self.axis) if mask is not None else np.ones(num_slices, dtype=bool)
        hidden = scored_slices(kept, num_slices, self.include_extrapolated)
        record: dict[str, Any] = {
            "case": name,
            "num_slices": int(num_slices),
            "kept_slices": np.flatnonzero(kept).tolist(),
            "scored_slices": hidden.tolist(),
            "kept_voxel_fraction": float(np.mean(_array(mask) != 0)) if mask is not None else 1.0,
            "dice": {
                "nisf_all_slices": hidden_slice_dice(
                    pred, label, range(num_slices), self.num_classes, self.axis
                ).tolist()
            },
        }
        if hidden.size:
            spacing = _in_plane_spacing(image, self.axis)
            baselines = {
                "nisf": pred,
                "nearest": nearest_slice_labels(label, kept, self.axis),
                "shape_based": shape_based_labels(label, kept, self.num_classes, self.axis, spacing),
            }
            for method, seg in baselines.items():
                record["dice"][method] = hidden_slice_dice(seg, label, hidden, self.num_classes, self.axis).tolist()
            if len(self._examples) < self.max_figures:
                self._examples.append(self._example(name, _array(image), label, baselines, hidden))
        self.cases.append(record)
        return record

    def _example(
        self, name: str, image: np.ndarray, label: np.ndarray, segs: dict[str, np.ndarray], hidden: np.ndarray
    ) -> dict[str, Any]:
        take = lambda a, z: np.take(a, z, axis=self.axis)  # noqa: E731
        lv = [(take(label, z) == 1).sum() for z in hidden]
        z = int(hidden[int(np.argmax(lv))])
        crop = _heart_box(take(label, z))
        return {
            "case": name,
            "slice": z,
            "image": take(image, z)[crop],
            "ground truth": take(label, z)[crop],
            **{m: take(s, z)[crop] for m, s in segs.items()},
        }

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """Mean and std over cases per method: per class and of the per-case class mean (NaN-aware)."""
        out: dict[str, dict[str, list[float]]] = {}
        methods = [m for m in (*METHODS, "nisf_all_slices") if any(m in c["dice"] for c in self.cases)]
        for method in methods:
            dice = np.asarray([c["dice"][method] for c in self.cases if method in c["dice"]], dtype=float)
            with _quiet():
                stats = {
                    n: [json_safe(np.nanmean(dice[:, k])), json_safe(np.nanstd(dice[:, k]))]
                    for k, n in enumerate(self.class_names[1:])
                }
                means = np.nanmean(dice, axis=1)
                stats["mean"] = [json_safe(np.nanmean(means)), json_safe(np.nanstd(means))]
            out[method] = stats
        return out

    def _write(self, engine: Engine | None = None) -> None:
        if not self.cases:
            logger.warning("hidden-slice report: no cases were scored")
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = self.class_names[1:]
        with atomic_open(self.output_dir / f"{self.prefix}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "method", *names, "mean", "scored_slices"])
            for c in self.cases:
                for method, dice in c["dice"].items():
                    with _quiet():
                        mean = np.nanmean(np.asarray(dice, dtype=float))
                    scored = c["num_slices"] if method == "nisf_all_slices" else len(c["scored_slices"])
                    writer.writerow([c["case"], method, *[_fmt(v) for v in dice], _fmt(mean), scored])
        summary = self.summary()
        record = {
            "settings": {**self.settings, "include_extrapolated": self.include_extrapolated, "axis": self.axis},
            "classes": names,
            "num_cases": len(self.cases),
            "num_scored_slices": int(sum(len(c["scored_slices"]) for c in self.cases)),
            "summary": summary,
            "cases": [{**c, "dice": {m: json_safe(d) for m, d in c["dice"].items()}} for c in self.cases],
        }
        atomic_write_json(self.output_dir / f"{self.prefix}.json", record)
        for method, stats in summary.items():
            logger.info(
                "hidden-slice report: %s mean Dice %s over %d cases (%s)",
                method,
                _fmt(stats["mean"][0]),
                len(self.cases),
                ", ".join(f"{n} {_fmt(stats[n][0])}" for n in names),
            )
        if engine is not None:
            for method, stats in summary.items():
                engine.state.metrics[f"{self.prefix}_{method}"] = stats["mean"][0]
        if self._examples:
            self._plot()

    def _plot(self) -> None:
        plt = pyplot()
        columns = ["image", "ground truth", "nisf", "nearest", "shape_based"]
        titles = {
            "image": "image (hidden)",
            "ground truth": "ground truth",
            "nisf": "NISF",
            "nearest": "nearest slice",
            "shape_based": "shape-based",
        }
        rows = len(self._examples)
        fig, axes = plt.subplots(rows, len(columns), figsize=(2.4 * len(columns), 2.6 * rows), squeeze=False)
        for r, ex in enumerate(self._examples):
            for k, col in enumerate(columns):
                ax = axes[r, k]
                ax.imshow(ex["image"].T, cmap="gray", origin="lower")
                if col != "image":
                    draw_outlines(ax, ex[col])
                ax.set_title(titles[col] if r == 0 else "", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r, 0].set_ylabel(f"{ex['case']}\nslice {ex['slice']}", fontsize=8)
        fig.suptitle("slices hidden from the latent fit (red LV, green myocardium, blue RV)", fontsize=10)
        fig.tight_layout()
        save_figure(fig, self.output_dir / f"{self.prefix}_examples.png", dpi=90)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences numpy's NaN warnings: a class absent from every case has a NaN mean."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _fmt(value: float | None) -> str:
    return "nan" if value is None or np.isnan(float(value)) else f"{float(value):.4f}"
