"""The cardiac cycle read from one cine code: volume curves over the phases, and end-diastole and end-systole
found on them.

A cine network's code describes the subject's whole cycle, so its segmentation can be read at any phase ``t`` in
[0, 1), between the acquired frames too. :func:`volume_curve` measures the structures at evenly spread phases; the
clinical end-diastole and end-systole are the phases of the largest and smallest LV blood pool
(:func:`cycle_extremes`), used when the data does not name its ED and ES frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nisf_monai.geometry.fields import Field
from nisf_monai.geometry.grids import footprint_grid, roi_slices, sub_grid
from nisf_monai.geometry.measures import STRUCTURES, class_volumes
from nisf_monai.plotting import CLASS_COLOURS, pyplot, save_figure
from nisf_monai.spatial import voxel_volume_ml
from nisf_monai.transforms.coordinates import world_grid

__all__ = ["VolumeCurve", "curve_phases", "cycle_extremes", "volume_curve", "volume_curve_figure"]


@dataclass
class VolumeCurve:
    """Structure volumes (ml) at phases of the cycle: ``volumes[name][i]`` at ``phases[i]``."""

    phases: list[float]
    volumes: dict[str, list[float]] = field(default_factory=dict)

    def rows(self, subject: str) -> list[dict[str, Any]]:
        """One row per phase, for a CSV."""
        return [
            {"subject": subject, "phase": phase, **{f"{name}_ml": v[i] for name, v in self.volumes.items()}}
            for i, phase in enumerate(self.phases)
        ]


def curve_phases(num_phases: int) -> list[float]:
    """``num_phases`` evenly spread phases ``k / num_phases`` of the cycle (the first is end-diastole, 0)."""
    if num_phases < 2:
        raise ValueError(f"a volume curve needs at least 2 phases, got {num_phases}.")
    return [k / num_phases for k in range(num_phases)]


def volume_curve(
    field_at: Callable[[float], Field],
    phases: Sequence[float],
    image_affine: Any,
    image_shape: Sequence[int],
    spacing: float | Sequence[float] = 3.0,
    roi_margin_mm: float | None = 10.0,
    roi_phase: float | None = None,
    roi_spacing: float = 4.0,
    mode: str = "label",
    structures: Mapping[str, int] = STRUCTURES,
    heart_centre_mm: Sequence[float] | None = None,
    heart_radius_mm: float = 80.0,
) -> VolumeCurve:
    """Volumes of ``structures`` at each of ``phases``, read from ``field_at(phase)`` at ``spacing`` mm over the
    image's slab (nested in its voxels, :func:`~nisf_monai.geometry.footprint_grid`). With ``roi_margin_mm`` only the
    box around the heart at ``roi_phase`` (default: the first phase, end-diastole, when the heart is largest), found
    by one coarse pass at ``roi_spacing`` mm and widened by the margin, is read at every phase; with
    ``heart_centre_mm`` (world mm, e.g. the heart frame's origin) that pass ignores foreground farther than
    ``heart_radius_mm``, so a stray blob at the field of view's edge does not stretch the box over every phase."""
    grid_affine, grid_shape = footprint_grid(image_affine, image_shape, spacing)
    lower, upper = [0, 0, 0], list(grid_shape)
    if roi_margin_mm is not None:
        coarse_affine, coarse_shape = footprint_grid(image_affine, image_shape, roi_spacing)
        coarse, _ = field_at(phases[0] if roi_phase is None else roi_phase).sample(coarse_affine, coarse_shape)
        foreground = coarse.argmax(axis=0) > 0
        if heart_centre_mm is not None:
            world = world_grid(coarse_affine, coarse_shape).numpy().reshape(*coarse_shape, 3)
            foreground &= np.linalg.norm(world - np.asarray(heart_centre_mm), axis=-1) <= heart_radius_mm
        bounds = roi_slices(foreground, coarse_affine, grid_affine, grid_shape, roi_margin_mm)
        if bounds is not None:
            lower, upper = bounds
    roi_affine, roi_shape = sub_grid(grid_affine, lower, upper)
    voxel_ml = voxel_volume_ml(roi_affine)
    curve = VolumeCurve([float(p) for p in phases], {name: [] for name in structures})
    for phase in curve.phases:
        probabilities, _ = field_at(phase).sample(roi_affine, roi_shape)
        volumes = class_volumes(probabilities, voxel_ml, structures, mode)
        for name in structures:
            curve.volumes[name].append(float(volumes[name]))
    return curve


def cycle_extremes(curve: VolumeCurve, structure: str = "lv_blood_pool") -> tuple[float, float]:
    """The phases of end-diastole and end-systole: the largest and the smallest volume of ``structure`` (the LV
    blood pool, the clinical definition); the first such phase on a tie."""
    volumes = np.asarray(curve.volumes[structure], dtype=float)
    return curve.phases[int(np.argmax(volumes))], curve.phases[int(np.argmin(volumes))]


def volume_curve_figure(
    path: str | os.PathLike,
    curve: VolumeCurve,
    title: str = "",
    acquired: Mapping[float, Mapping[str, float]] | None = None,
    manual: Mapping[float, Mapping[str, float]] | None = None,
    ed_es: tuple[float, float] | None = None,
    shown: Sequence[str] = ("lv_blood_pool", "rv_blood_pool", "lv_myocardium"),
) -> str:
    """LV and RV blood pool (and LV myocardium) volumes against the phase: the curve, the acquired frames as read
    from the same code (dots) and their manual labels (crosses), with ED and ES marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in shown:
        colour = CLASS_COLOURS[STRUCTURES[name]]
        ax.plot(curve.phases, curve.volumes[name], "-", color=colour, label=name.replace("_", " "))
        for marks, style in ((acquired, "o"), (manual, "x")):
            if marks:
                phases = sorted(marks)
                ax.plot(phases, [marks[p][name] for p in phases], style, color=colour, markersize=6)
    if ed_es is not None:
        for phase, name in zip(ed_es, ("ED", "ES")):
            ax.axvline(phase, color="grey", linestyle="--", linewidth=1)
            ax.text(phase, ax.get_ylim()[1], f" {name}", fontsize=8, va="top")
    ax.set_xlabel("cardiac phase (fraction of the cycle)", fontsize=9)
    ax.set_ylabel("volume (ml)", fontsize=9)
    ax.set_xlim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{title}\nlines: the code over the cycle; dots: acquired frames; crosses: manual labels", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
