"""Held-out slice interpolation: NISF against label-interpolation baselines on slices hidden from the fit.

NISF's latent code is fitted to some slices of a stack (``SliceMaskd``) and the network then segments the
hidden slices between them (the paper's Fig. 5). Two classical baselines see the *ground-truth labels* of the
kept slices, which is more than NISF gets (it sees only their intensities):

- :func:`nearest_slice_labels`: each hidden slice copies the labels of the nearest kept slice (ties: the
  lower slice);
- :func:`shape_based_labels`: shape-based interpolation (Raya & Udupa 1990; Herman et al. 1992): per class,
  the signed distance maps of the two kept slices around a hidden slice are blended linearly by the slice's
  position between them, and each voxel takes the class that it lies deepest inside.

:class:`HiddenSliceReport` scores all three on the hidden slices with MONAI's ``DiceMetric`` and writes CSV,
JSON and a PNG of example slices.
"""

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
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.metrics import DiceMetric

from nisf_monai.data.datalist import case_name
from nisf_monai.io import atomic_open, atomic_write_json, json_safe
from nisf_monai.plotting import draw_outlines, pyplot, save_figure
from nisf_monai.spatial import affine_array, voxel_sizes
from nisf_monai.transforms.masks import kept_slices
from nisf_monai.transforms.validation import source_of

__all__ = [
    "HiddenSliceReport",
    "hidden_slice_dice",
    "nearest_slice_labels",
    "scored_slices",
    "shape_based_labels",
    "signed_distance",
]

logger = logging.getLogger("nisf_monai")

METHODS = ("nisf", "nearest", "shape_based")
_FAR = 1e6  # mm; stands for "no boundary in this slice"


def _kept_indices(kept: Sequence[int] | np.ndarray, num_slices: int) -> np.ndarray:
    kept = np.asarray(kept)
    index = np.flatnonzero(kept) if kept.dtype == bool else np.unique(kept.astype(int))
    if index.size == 0 or index.min() < 0 or index.max() >= num_slices:
        raise ValueError(f"kept slices must be a non-empty selection of {num_slices} slices, got {kept.tolist()}.")
    return index


def scored_slices(kept: Sequence[int] | np.ndarray, num_slices: int, include_extrapolated: bool = False) -> np.ndarray:
    """Hidden slices to score: those not kept, by default only those with kept slices on both sides
    (interpolation; beyond the last kept slice the baselines can only copy it)."""
    index = _kept_indices(kept, num_slices)
    hidden = np.setdiff1d(np.arange(num_slices), index)
    if include_extrapolated:
        return hidden
    return hidden[(hidden > index.min()) & (hidden < index.max())]


def nearest_slice_labels(label: np.ndarray, kept: Sequence[int] | np.ndarray, axis: int = -1) -> np.ndarray:
    """``label`` with every slice not in ``kept`` (indices or a boolean per slice) replaced by the labels of
    the nearest kept slice along ``axis``; on a tie (midway) the lower slice wins."""
    label = np.asarray(label)
    moved = np.moveaxis(label, axis, -1)
    index = _kept_indices(kept, moved.shape[-1])
    nearest = index[np.argmin(np.abs(np.arange(moved.shape[-1])[:, None] - index[None, :]), axis=1)]  # first minimum: lower
    return np.moveaxis(moved[..., nearest], -1, axis)


def signed_distance(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Signed Euclidean distance (mm) of a 2D mask's pixels to its boundary: negative inside (minus the
    distance to the nearest outside pixel), positive outside (the distance to the nearest inside pixel),
    so the zero level lies midway between inside and outside pixel centres. ``spacing`` is per array
    axis. An empty mask is ``+1e6`` everywhere, a full one ``-1e6``. Exact (separable, see :func:`_distance_to`)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"signed_distance expects a 2D mask, got shape {mask.shape}.")
    if not mask.any():
        return np.full(mask.shape, _FAR, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -_FAR, dtype=np.float32)
    return (_distance_to(mask, spacing) - _distance_to(~mask, spacing)).astype(np.float32)


def _distance_to(mask: np.ndarray, spacing: Sequence[float], chunk: int = 16) -> np.ndarray:
    """Exact Euclidean distance (mm) from each pixel to the nearest pixel of a non-empty 2D ``mask`` (0 on
    it), separably: the distance along axis 1 to the mask within each row, then, per pixel, the minimum
    over rows ``x'`` of ``((x - x') s0)^2 + (that distance in row x')^2`` (a min-plus product, in chunks)."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    index = torch.arange(m.shape[1], dtype=torch.float64).expand_as(m)
    inf = torch.full_like(index, float("inf"))
    before = torch.cummax(torch.where(m, index, -inf), dim=1).values  # last mask pixel at or before y
    after = torch.cummin(torch.where(m, index, inf).flip(1), dim=1).values.flip(1)  # first at or after y
    along = torch.minimum(index - before, after - index) * float(spacing[1])  # (X, Y), inf in empty rows
    rows = torch.arange(m.shape[0], dtype=torch.float64) * float(spacing[0])
    squared = along.square()
    out = torch.empty_like(squared)
    for start in range(0, m.shape[0], chunk):
        across = (rows[start : start + chunk, None] - rows[None, :]).square()  # (c, X')
        out[start : start + chunk] = (across[:, :, None] + squared[None]).min(dim=1).values
    return out.sqrt().numpy()


def shape_based_labels(
    label: np.ndarray, kept: Sequence[int] | np.ndarray, num_classes: int, axis: int = -1, spacing: Sequence[float] = (1.0, 1.0)
) -> np.ndarray:
    """Shape-based interpolation of the slices not in ``kept`` from the kept slices' labels.

    For a hidden slice at ``z`` between kept slices ``z0 < z < z1`` (weight ``w = (z - z0) / (z1 - z0)``, the
    slices of a grid being evenly spaced): per foreground class, ``d = (1 - w) d0 + w d1`` with ``d0, d1``
    the in-plane signed distance maps (:func:`signed_distance`, ``spacing`` in mm of the two in-plane
    axes in array order); the voxel takes the class with the lowest ``d`` if that is negative (inside),
    else background. A class present in only one of the two slices tapers to nothing at the other: its
    missing map is the present one shifted by its deepest inside distance, i.e. the shape erodes linearly.
    Slices outside the kept range copy the nearest kept slice. Kept slices are returned unchanged.
    """
    label = np.asarray(label)
    moved = np.moveaxis(label, axis, -1)
    num_slices = moved.shape[-1]
    index = _kept_indices(kept, num_slices)
    out = nearest_slice_labels(moved, index, axis=-1).copy()
    maps: dict[int, list[np.ndarray | None]] = {}  # kept slice -> per-class distance map (None: class absent)
    for z in scored_slices(index, num_slices):
        z0, z1 = index[index < z].max(), index[index > z].min()
        for k in (z0, z1):
            if k not in maps:
                maps[k] = [signed_distance(moved[..., k] == c, spacing) if (moved[..., k] == c).any() else None for c in range(1, num_classes)]
        w = (z - z0) / (z1 - z0)
        blended = np.full((num_classes - 1, *moved.shape[:-1]), _FAR, dtype=np.float64)
        for c in range(num_classes - 1):
            d0, d1 = maps[z0][c], maps[z1][c]
            if d0 is None and d1 is None:
                continue
            if d0 is None:
                d0 = d1 - d1.min()  # vanishes at z0: min over the slice is 0, nothing strictly inside
            if d1 is None:
                d1 = d0 - d0.min()
            blended[c] = (1.0 - w) * d0 + w * d1
        best = np.argmin(blended, axis=0)  # first minimum: the lower class on a tie
        inside = np.take_along_axis(blended, best[None], axis=0)[0] < 0
        out[..., z] = np.where(inside, best + 1, 0).astype(out.dtype)
    return np.moveaxis(out, -1, axis)


def hidden_slice_dice(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, slices: Sequence[int], num_classes: int, axis: int = -1) -> np.ndarray:
    """Dice per foreground class over the given slices together (one 3D stack of them), by MONAI's
    ``DiceMetric`` on one-hot ``[1, C, ...]`` (background excluded; NaN where the class is absent from the
    ground truth of those slices)."""
    slices = torch.as_tensor(np.asarray(slices, dtype=np.int64))
    p = torch.as_tensor(np.asarray(pred)).long().movedim(axis, -1)[..., slices]
    g = torch.as_tensor(np.asarray(label)).long().movedim(axis, -1)[..., slices]
    onehot = lambda x: F.one_hot(x, num_classes).movedim(-1, 0)[None].float()  # noqa: E731
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    return metric(onehot(p), onehot(g))[0].numpy().astype(np.float64)


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
        name = case_name(source_of(image, f"case{len(self.cases)}"))
        if pred.shape != label.shape:
            raise ValueError(f"{name}: prediction {pred.shape} is not on the label grid {label.shape}; score hidden slices with target_spacing null.")
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
            "dice": {"nisf_all_slices": hidden_slice_dice(pred, label, range(num_slices), self.num_classes, self.axis).tolist()},
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

    def _example(self, name: str, image: np.ndarray, label: np.ndarray, segs: dict[str, np.ndarray], hidden: np.ndarray) -> dict[str, Any]:
        take = lambda a, z: np.take(a, z, axis=self.axis)  # noqa: E731
        lv = [(take(label, z) == 1).sum() for z in hidden]
        z = int(hidden[int(np.argmax(lv))])
        crop = _heart_box(take(label, z))
        return {"case": name, "slice": z, "image": take(image, z)[crop], "ground truth": take(label, z)[crop], **{m: take(s, z)[crop] for m, s in segs.items()}}

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """Mean and std over cases per method: per class and of the per-case class mean (NaN-aware)."""
        out: dict[str, dict[str, list[float]]] = {}
        methods = [m for m in (*METHODS, "nisf_all_slices") if any(m in c["dice"] for c in self.cases)]
        for method in methods:
            dice = np.asarray([c["dice"][method] for c in self.cases if method in c["dice"]], dtype=float)
            with _quiet():
                stats = {n: [json_safe(np.nanmean(dice[:, k])), json_safe(np.nanstd(dice[:, k]))] for k, n in enumerate(self.class_names[1:])}
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
            logger.info("hidden-slice report: %s mean Dice %s over %d cases (%s)", method, _fmt(stats["mean"][0]), len(self.cases),
                        ", ".join(f"{n} {_fmt(stats[n][0])}" for n in names))
        if engine is not None:
            for method, stats in summary.items():
                engine.state.metrics[f"{self.prefix}_{method}"] = stats["mean"][0]
        if self._examples:
            self._plot()

    def _plot(self) -> None:
        plt = pyplot()
        columns = ["image", "ground truth", "nisf", "nearest", "shape_based"]
        titles = {"image": "image (hidden)", "ground truth": "ground truth", "nisf": "NISF", "nearest": "nearest slice", "shape_based": "shape-based"}
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
