"""A transform that writes PNG figures of segmentations for a quick look at evaluation results."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform

from nisf_monai.plotting import draw_outlines, pyplot, save_figure
from nisf_monai.transforms.loading import frame_case_name

__all__ = ["OverlayFigured", "mid_ventricular_slice"]


def mid_ventricular_slice(label: np.ndarray, lv_class: int = 1) -> int:
    """Index of the short-axis slice (last axis) with the most LV blood pool, or the middle slice."""
    area = (label == lv_class).reshape(-1, label.shape[-1]).sum(axis=0)
    return int(np.argmax(area)) if area.max() > 0 else label.shape[-1] // 2


class OverlayFigured(Transform):
    """Writes ``<case>_overlay.png`` for the first ``max_figures`` cases it sees: the mid-ventricular slice
    of the image with the ground-truth and predicted label contours side by side (a frame cut from a cine
    series by :class:`~nisf_monai.transforms.SelectFramed` is ``<case>_tNN``). Data pass through
    unchanged. ``pred`` must be a label map on the image grid (evaluate at the input grid).

    Args:
        output_dir: folder of the PNGs.
        max_figures: how many cases get a figure.
        image_key, label_key, pred_key: keys of the image ``(1, X, Y, Z)`` and label maps.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        max_figures: int = 4,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_figures = max_figures
        self.image_key, self.label_key, self.pred_key = image_key, label_key, pred_key
        self.written = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        if self.written >= self.max_figures or self.label_key not in data:
            return data
        plt = pyplot()
        image = np.asarray(torch.as_tensor(data[self.image_key]).cpu())[0]
        label = np.asarray(torch.as_tensor(data[self.label_key]).cpu())[0]
        pred = np.asarray(torch.as_tensor(data[self.pred_key]).cpu())[0]
        if pred.shape != label.shape:
            return data
        z = mid_ventricular_slice(label)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, seg, title in ((axes[0], label, "ground truth"), (axes[1], pred, "NISF")):
            ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
            draw_outlines(ax, seg[:, :, z])
            ax.set_title(title)
            ax.axis("off")
        name = frame_case_name(data[self.image_key], f"case{self.written}")
        fig.suptitle(f"{name}, slice {z} (red LV, green myocardium, blue RV)")
        fig.tight_layout()
        save_figure(fig, self.output_dir / f"{name}_overlay.png", dpi=90)
        self.written += 1
        return data
