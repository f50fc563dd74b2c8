"""What every figure of the package shares: pyplot on the Agg backend, the class colours, label outlines, and
saving a figure all-or-nothing."""

from __future__ import annotations

import os
from typing import Any

import matplotlib
import numpy as np

from nisf_monai.io import atomic_save_figure

__all__ = ["CLASS_COLOURS", "draw_outlines", "pyplot", "save_figure"]

CLASS_COLOURS = {1: (0.89, 0.10, 0.11), 2: (0.20, 0.63, 0.17), 3: (0.12, 0.47, 0.71)}  # LV red, myo green, RV blue


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend: the package writes figures to files and never opens a window."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` all-or-nothing (:func:`~nisf_monai.io.atomic_save_figure`) and close it."""
    try:
        return atomic_save_figure(fig, path, dpi=dpi)
    finally:
        pyplot().close(fig)


def draw_outlines(ax: Any, labels: np.ndarray) -> None:
    """The outline of each class of a 2D label map ``(X, Y)`` in its colour, over an image drawn as
    ``imshow(image.T, origin="lower")``. The LV blood pool comes last: its outline is the myocardium's inner one."""
    for value, colour in reversed(CLASS_COLOURS.items()):
        if (labels == value).any():
            ax.contour((labels == value).T.astype(float), levels=[0.5], colors=[colour], linewidths=1)
