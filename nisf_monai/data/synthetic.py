"""A synthetic short-axis (SAX) cardiac cine cohort, so the bundle can be trained and tested without patient data.

The heart is defined analytically in world coordinates (millimetres) and rasterised on the voxel centres of a
NIfTI grid, so labels, images and affines are consistent by construction:

- LV: a truncated "bullet" (a cylinder at the base continuing into a half-ellipsoid towards the apex) for both the
  endocardium (blood pool) and the epicardium; the long axis is parallel to world z, base towards +z, apex towards -z.
- RV: a crescent, the part of an ellipse on the septal side that lies outside the (slightly dilated) LV epicardium;
  it is shorter than the LV, so apical slices show LV myocardium only.
- ES: the cavity shrinks (ejection fraction 50-65 %), the base descends towards the fixed apex, the wall thickens so
  that the myocardial volume stays constant, and the RV crescent narrows.
- A whole cycle (:func:`generate_cine`): every frame is the heart at a contraction between ED (0) and ES (1), rising
  smoothly from frame 0 (ED) to the subject's ES frame (at 30-40 % of the cycle) and relaxing back by the cycle's
  end, so the LV volume curve has its maximum at frame 0 and its minimum at the ES frame.

The anatomy depends on the seed only, never on the grid: the same seed sampled at another spacing, shape or
orientation (``oblique=True``) gives the same heart, which makes high-resolution reference segmentations possible.

Reference volumes (``info["*_ml"]``) follow the disc-summation (Simpson) definition used clinically: the area of the
continuous cross-section in each slice plane, integrated numerically on a ``5 x 5`` sub-voxel grid, times the slice
thickness (voxels further than one voxel from a label boundary count as uniform). They are what a perfect
segmentation of the image stack measures, and match voxel counts of the label map to about 1 %; the same sub-voxel
fractions model the partial-volume effect in the image. ``info["lv_*_continuous_ml"]`` are the closed-form volumes
of the whole continuous LV shapes, the limit for ever thinner slices when the heart lies inside the field of view.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nisf_monai.classes import DATALIST_LABELS, LABELS, STRUCTURES
from nisf_monai.io import atomic_write_json, save_nifti
from nisf_monai.spatial import index_to_world, voxel_volume_ml

__all__ = [
    "LABELS",
    "PHASES",
    "DATALIST_NAME",
    "generate_subject",
    "generate_cine",
    "generate_cohort",
    "contraction_at",
    "ensure_synthetic_cohort",
    "main",
]

PHASES = ("ED", "ES")
DATALIST_NAME = "datalist.json"

_SUBSAMPLES = 5  # sub-voxel samples per in-plane axis for volumes and partial volume (odd: includes the centre)
_BOUNDARY_MARGIN = 1  # in-plane distance (voxels) from a label boundary within which voxels are sub-sampled

logger = logging.getLogger("nisf_monai")


@dataclass(frozen=True)
class _Heart:
    """Geometry of one cardiac phase in mm; long-axis positions are world z relative to ``center[2]``."""

    center: np.ndarray  # world point on the LV long axis (mid-ventricle at ED)
    rotation: float  # radians, orientation of the (slightly elliptical) LV cross-section
    ellipticity: float  # minor / major axis of the LV cross-section
    base: float  # long-axis position of the basal plane (heart lies below it)
    cylinder: float  # length of the cylindrical basal part of the LV
    endo_radius: float
    epi_radius: float
    endo_length: float  # base-to-apex length of the cavity
    epi_length: float  # base-to-apex length of the epicardium
    rv_angle: float  # radians, direction from the LV axis towards the RV
    rv_offset: float  # distance of the RV ellipse centre from the LV axis at the base
    rv_radial: float  # RV ellipse semi-axis along ``rv_angle``
    rv_tangential: float  # RV ellipse semi-axis across ``rv_angle``
    rv_length: float
    rv_cylinder: float
    rv_gap: float  # dilation of the epicardium cut out of the RV ellipse


def _bullet_factor(length: float, cylinder: float) -> float:
    """Volume of a unit-area bullet of this length: cylinder plus half-ellipsoid cap (2/3 of its cylinder)."""
    return cylinder + 2.0 / 3.0 * (length - cylinder)


def _draw_parameters(seed: int) -> dict[str, Any]:
    """All random subject parameters, drawn in a fixed order so that no option changes the subject."""
    rng = np.random.default_rng(seed)
    u = rng.uniform
    p: dict[str, Any] = {}
    # pose: the field-of-view centre and the LV axis in world coordinates
    p["fov_center"] = u(-5.0, 5.0, size=3)
    off_r, off_a, off_z = u(3.0, 10.0), u(0.0, 2 * math.pi), u(-3.0, 3.0)
    p["lv_center"] = p["fov_center"] + np.array([off_r * math.cos(off_a), off_r * math.sin(off_a), off_z])
    p["rotation"] = math.radians(u(-30.0, 30.0))
    p["rv_angle"] = math.pi + p["rotation"] + math.radians(u(-20.0, 20.0))
    # LV at end-diastole
    p["ellipticity"] = u(0.88, 1.0)
    p["endo_radius"] = u(22.0, 28.0)
    p["wall"] = u(7.0, 12.0)
    p["apex_wall"] = u(6.0, 9.0)
    p["epi_length"] = u(60.0, 68.0)
    p["cylinder_fraction"] = u(0.35, 0.5)
    # contraction
    p["ejection_fraction"] = u(0.5, 0.65)
    p["long_axis_shortening"] = u(0.88, 0.95)
    p["apex_thickening"] = u(1.2, 1.4)
    # RV at end-diastole, relative to the LV epicardium
    p["rv_width"] = u(16.0, 24.0)
    p["rv_radial_fraction"] = u(0.75, 0.9)
    p["rv_tangential_fraction"] = u(1.25, 1.5)
    p["rv_length_fraction"] = u(0.75, 0.85)
    p["rv_contraction"] = u(0.4, 0.55)
    p["rv_gap"] = u(0.5, 1.5)
    # appearance (bSSFP-like, relative intensities before scaling)
    p["blood"] = u(0.85, 1.0)
    p["myocardium"] = u(0.25, 0.32)
    p["tissue"] = u(0.4, 0.5)
    n_waves = 20  # smooth texture: random plane waves with 20-80 mm wavelengths
    directions = rng.normal(size=(n_waves, 3)) * np.array([1.0, 1.0, 0.5])
    wavelengths = u(20.0, 80.0, n_waves)
    p["wave_vectors"] = 2 * math.pi * directions / (np.linalg.norm(directions, axis=1) * wavelengths)[:, None]
    p["wave_phases"] = u(0.0, 2 * math.pi, n_waves)
    p["wave_amplitudes"] = u(0.01, 0.04, n_waves)
    p["lung_centers"] = np.array([[-u(48, 58), u(0, 20)], [u(48, 58), u(0, 20)]])
    p["lung_axes"] = np.column_stack([u(14, 20, 2), u(30, 40, 2)])
    p["lung"] = u(0.04, 0.1)
    p["body_center"] = u(-4.0, 4.0, size=2)
    p["body_axes"] = np.array([u(66.0, 74.0), u(56.0, 64.0)])
    p["fat_thickness"] = u(3.0, 6.0)
    p["fat"] = u(0.7, 0.85)
    p["bias_amplitude"] = u(0.1, 0.2)
    p["bias_coefficients"] = u(-1.0, 1.0, size=6)
    p["blur_sigma"] = u(0.4, 0.6)  # voxels, in-plane point-spread function
    p["noise_std"] = u(0.03, 0.05)
    p["intensity_scale"] = float(np.exp(u(math.log(200.0), math.log(2000.0))))
    # oblique slice orientation, used only when asked for
    p["oblique_inplane"] = u(-math.pi, math.pi)
    p["oblique_tilt"] = math.radians(u(5.0, 15.0))
    p["oblique_tilt_axis"] = u(-math.pi, math.pi)
    # the cycle (drawn last, so that the draws above, and every subject's ED and ES, stay as they were)
    p["es_phase"] = u(0.3, 0.4)
    return p


def _heart(p: dict[str, Any], phase: str | float) -> _Heart:
    """Phase geometry at a contraction ``s`` in [0, 1] (``"ED"`` is 0, ``"ES"`` 1): the apex stays fixed, the cavity
    ejects ``s`` times the subject's ejection fraction, the long axis and the RV shorten by ``s`` times their ES
    change, and the myocardial volume is conserved at every ``s``."""
    s = {"ED": 0.0, "ES": 1.0}[phase] if isinstance(phase, str) else float(phase)
    epi_r_ed = p["endo_radius"] + p["wall"]
    epi_l_ed = p["epi_length"]
    cyl_ed = p["cylinder_fraction"] * epi_l_ed
    endo_l_ed = epi_l_ed - p["apex_wall"]
    rv_radial_ed = p["rv_radial_fraction"] * epi_r_ed
    rv_tangential_ed = p["rv_tangential_fraction"] * epi_r_ed
    rv_l_ed = p["rv_length_fraction"] * epi_l_ed
    base_ed = epi_l_ed / 2.0
    if s == 0.0:
        endo_r, epi_r, epi_l, cyl, endo_l = p["endo_radius"], epi_r_ed, epi_l_ed, cyl_ed, endo_l_ed
        rv_width, rv_radial, rv_tangential, rv_l, base = p["rv_width"], rv_radial_ed, rv_tangential_ed, rv_l_ed, base_ed
    else:
        shortening = 1.0 - s * (1.0 - p["long_axis_shortening"])
        epi_l, cyl, rv_l = epi_l_ed * shortening, cyl_ed * shortening, rv_l_ed * shortening
        endo_l = epi_l - p["apex_wall"] * (1.0 + s * (p["apex_thickening"] - 1.0))
        base = base_ed - epi_l_ed + epi_l  # the apex stays where it is
        k_endo_ed, k_endo = _bullet_factor(endo_l_ed, cyl_ed), _bullet_factor(endo_l, cyl)
        endo_r = p["endo_radius"] * math.sqrt((1.0 - s * p["ejection_fraction"]) * k_endo_ed / k_endo)
        myo = epi_r_ed**2 * _bullet_factor(epi_l_ed, cyl_ed) - p["endo_radius"] ** 2 * k_endo_ed
        epi_r = math.sqrt((myo + endo_r**2 * k_endo) / _bullet_factor(epi_l, cyl))
        rv_contraction = 1.0 - s * (1.0 - p["rv_contraction"])
        rv_width = p["rv_width"] * rv_contraction
        rv_radial = rv_radial_ed * math.sqrt(rv_contraction)
        rv_tangential = rv_tangential_ed * (1.0 - 0.12 * s)
    return _Heart(
        center=np.asarray(p["lv_center"], dtype=np.float64),
        rotation=p["rotation"],
        ellipticity=p["ellipticity"],
        base=base,
        cylinder=cyl,
        endo_radius=endo_r,
        epi_radius=epi_r,
        endo_length=endo_l,
        epi_length=epi_l,
        rv_angle=p["rv_angle"],
        rv_offset=epi_r + p["rv_gap"] + rv_width - rv_radial,
        rv_radial=rv_radial,
        rv_tangential=rv_tangential,
        rv_length=rv_l,
        rv_cylinder=p["cylinder_fraction"] * rv_l,
        rv_gap=p["rv_gap"],
    )


def _taper_sq(depth: np.ndarray, length: float, cylinder: float) -> np.ndarray:
    """Squared cross-section scale at ``depth`` mm below the base: 1 on the cylinder, an ellipse on the cap,
    negative outside ``[0, length]`` so that no point there is inside."""
    cap = np.clip(depth - cylinder, 0.0, None) / (length - cylinder)
    scale_sq = 1.0 - cap**2
    return np.where((depth >= 0.0) & (depth <= length), scale_sq, -1.0)


def _label_points(points: np.ndarray, heart: _Heart) -> np.ndarray:
    """Label (0-3) of each world point ``[N, 3]``; the LV wins where the RV ellipse would overlap it."""
    rel = points - heart.center
    depth = heart.base - rel[:, 2]
    c, s = math.cos(heart.rotation), math.sin(heart.rotation)
    x, y = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
    radius_sq = x**2 + (y / heart.ellipticity) ** 2  # elliptical radius, in units of the major semi-axis
    endo_sq = _taper_sq(depth, heart.endo_length, heart.cylinder)
    epi_sq = _taper_sq(depth, heart.epi_length, heart.cylinder)
    in_endo = radius_sq <= heart.endo_radius**2 * endo_sq
    in_epi = radius_sq <= heart.epi_radius**2 * epi_sq

    # RV: ellipse scaled about the LV axis by its own taper, minus the epicardium dilated by ``rv_gap``
    rv_sq = _taper_sq(depth, heart.rv_length, heart.rv_cylinder)
    rv_scale = np.sqrt(np.clip(rv_sq, 0.0, None))
    c, s = math.cos(heart.rv_angle), math.sin(heart.rv_angle)
    xr, yr = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
    in_rv = ((xr - rv_scale * heart.rv_offset) / heart.rv_radial) ** 2 + (yr / heart.rv_tangential) ** 2 <= rv_sq
    epi_major = np.sqrt(np.clip(epi_sq, 0.0, None)) * heart.epi_radius
    dilated_x, dilated_y = epi_major + heart.rv_gap, epi_major * heart.ellipticity + heart.rv_gap
    in_dilated = (x / dilated_x) ** 2 + (y / dilated_y) ** 2 <= 1.0

    labels = np.zeros(len(points), dtype=np.uint8)
    labels[in_rv & ~in_dilated] = LABELS["rv_blood_pool"]
    labels[in_epi] = LABELS["lv_myocardium"]
    labels[in_endo] = LABELS["lv_blood_pool"]
    return labels


def _direction(p: dict[str, Any], oblique: bool) -> np.ndarray:
    """Direction cosines of the voxel axes: identity, or an in-plane rotation followed by a small tilt."""
    if not oblique:
        return np.eye(3)
    a = p["oblique_inplane"]
    in_plane = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    b, t = p["oblique_tilt_axis"], p["oblique_tilt"]
    axis = np.array([[0.0, 0.0, math.sin(b)], [0.0, 0.0, -math.cos(b)], [-math.sin(b), math.cos(b), 0.0]])
    tilt = np.eye(3) + math.sin(t) * axis + (1.0 - math.cos(t)) * axis @ axis  # Rodrigues, axis (cos b, sin b, 0)
    return tilt @ in_plane


def _make_affine(p: dict[str, Any], spacing: Sequence[float], shape: Sequence[int], oblique: bool) -> np.ndarray:
    """Voxel-to-world affine centred on the subject's field-of-view centre, rounded to float32 so that it
    survives the NIfTI header (sform) unchanged."""
    matrix = _direction(p, oblique) @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = p["fov_center"] - matrix @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
    return affine.astype(np.float32).astype(np.float64)


def _world_points(affine: np.ndarray, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """World coordinates ``[N, 3]`` of the (possibly fractional) voxel indices ``i x j x k``, i-major order."""
    i, j, k = (np.asarray(v, dtype=np.float64) for v in (i, j, k))
    grid = [
        affine[c, 0] * i[:, None, None] + affine[c, 1] * j[None, :, None] + affine[c, 2] * k[None, None, :]
        for c in range(3)
    ]
    return np.stack([g + affine[c, 3] for c, g in enumerate(grid)], axis=-1).reshape(-1, 3)


def _dot3(points: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``points @ vector`` for ``[N, 3]`` points, as explicit sums (numpy's matmul is slow for 3 columns)."""
    return points[:, 0] * vector[0] + points[:, 1] * vector[1] + points[:, 2] * vector[2]


def _near_boundary(labels: np.ndarray, margin: int) -> np.ndarray:
    """Voxels with a differently labelled in-plane neighbour within ``margin`` voxels (Chebyshev distance)."""
    padded = np.pad(labels, [(margin, margin), (margin, margin), (0, 0)], mode="edge")
    mask = np.zeros(labels.shape, dtype=bool)
    nx, ny = labels.shape[:2]
    for di in range(2 * margin + 1):
        for dj in range(2 * margin + 1):
            mask |= padded[di : di + nx, dj : dj + ny] != labels
    return mask


def _label_fractions(labels: np.ndarray, affine: np.ndarray, heart: _Heart) -> np.ndarray:
    """Fraction ``[4, X, Y, Z]`` of each voxel's in-plane footprint (in the plane through its centre) covered by
    each label, from a ``_SUBSAMPLES**2`` sub-grid. Only voxels within ``_BOUNDARY_MARGIN`` voxels of a label
    boundary are sub-sampled; the others are taken as uniform (the shapes are much larger than a voxel)."""
    fractions = (labels[None] == np.arange(len(LABELS)).reshape(-1, 1, 1, 1)).astype(np.float64)
    index = np.argwhere(_near_boundary(labels, _BOUNDARY_MARGIN))
    if len(index) == 0:
        return fractions
    n = _SUBSAMPLES
    offsets = (np.arange(n) + 0.5) / n - 0.5
    sub = np.zeros((n * n, 3))
    sub[:, 0], sub[:, 1] = np.repeat(offsets, n), np.tile(offsets, n)
    points = index_to_world(affine, (index[:, None, :] + sub[None]).reshape(-1, 3))
    sub_labels = _label_points(points, heart).reshape(len(index), n * n)
    for value in range(len(LABELS)):
        fractions[value, index[:, 0], index[:, 1], index[:, 2]] = (sub_labels == value).mean(axis=1)
    return fractions


def _tissue(points: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Torso around the heart: textured mid-grey tissue, dark lungs, a bright fat rim and air outside the body."""
    rel = points - p["fov_center"]
    texture = sum(
        a * np.cos(_dot3(rel, k) + phi)
        for k, phi, a in zip(p["wave_vectors"], p["wave_phases"], p["wave_amplitudes"], strict=True)
    )
    tissue = np.clip(p["tissue"] + texture, 0.3, 0.6)
    for center, axes in zip(p["lung_centers"], p["lung_axes"], strict=True):
        in_lung = ((rel[:, 0] - center[0]) / axes[0]) ** 2 + ((rel[:, 1] - center[1]) / axes[1]) ** 2 <= 1.0
        tissue = np.where(in_lung, p["lung"] + 0.2 * (tissue - 0.45), tissue)
    bx, by = rel[:, 0] - p["body_center"][0], rel[:, 1] - p["body_center"][1]
    outer, inner = p["body_axes"], p["body_axes"] - p["fat_thickness"]
    in_body = (bx / outer[0]) ** 2 + (by / outer[1]) ** 2 <= 1.0
    in_core = (bx / inner[0]) ** 2 + (by / inner[1]) ** 2 <= 1.0
    tissue = np.where(in_body & ~in_core, p["fat"], tissue)
    return np.where(in_body, tissue, 0.0)


def _bias_field(points: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Smooth multiplicative coil sensitivity: a quadratic polynomial within +/- ``bias_amplitude`` near the heart."""
    x, y, z = ((points - p["fov_center"]) / np.array([75.0, 75.0, 60.0])).T
    c = p["bias_coefficients"] / np.abs(p["bias_coefficients"]).sum() * p["bias_amplitude"]
    field = 1.0 + c[0] * x + c[1] * y + c[2] * z + c[3] * x**2 + c[4] * y**2 + c[5] * x * y
    return np.clip(field, 0.6, 1.4)


def _blur_in_plane(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along the first two axes (the in-plane point-spread function), edge-padded."""
    radius = max(int(math.ceil(3.0 * sigma)), 1)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(radius, radius) if a == axis else (0, 0) for a in range(image.ndim)]
        padded = np.pad(image, pad, mode="edge")
        size = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(o, o + size), axis=axis) for o, w in enumerate(kernel))
    return image


def _validate_grid(spacing: Sequence[float], shape: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    spacing_t, shape_t = tuple(float(s) for s in spacing), tuple(int(s) for s in shape)
    if len(spacing_t) != 3 or len(shape_t) != 3 or min(spacing_t) <= 0 or min(shape_t) < 1:
        raise ValueError(f"spacing and shape must be 3 positive values each, got {spacing} and {shape}.")
    return spacing_t, shape_t


def generate_subject(
    seed: int,
    phase: str = "ED",
    *,
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
    shape: Sequence[int] = (96, 96, 10),
    oblique: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One synthetic SAX cine volume.

    Args:
        seed: subject identity; everything (anatomy, appearance, noise) is a function of the seed and phase.
        phase: ``"ED"`` (end-diastole) or ``"ES"`` (end-systole) of the same heart.
        spacing: voxel size in mm along the array axes (in-plane, in-plane, slice).
        shape: array shape ``[X, Y, Z]``.
        oblique: rotate the voxel axes (in-plane rotation and a 5-15 degree tilt); the heart stays where it is
            in world space, so this only changes how it is sampled.

    Returns:
        image (float32 ``[X, Y, Z]``, arbitrary per-subject intensity scale), label (uint8 ``[X, Y, Z]``, see
        ``LABELS``), the 4x4 voxel-to-world affine (float64) and a JSON-serialisable ``info`` dict with the
        reference volumes ``<structure>_ml`` (disc summation, see the module docstring), the closed-form
        ``lv_blood_pool_continuous_ml`` and ``lv_myocardium_continuous_ml``, and the subject parameters.
    """
    phase = str(phase).upper()
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}.")
    spacing, shape = _validate_grid(spacing, shape)
    p = _draw_parameters(seed)
    image, label, affine, info = _render(p, _heart(p, phase), [seed, 1 + PHASES.index(phase)], spacing, shape, oblique)
    return image, label, affine, {"seed": int(seed), "phase": phase, **info}


def contraction_at(phase: float, es_phase: float) -> float:
    """The heart's contraction (0 at ED, 1 at ES) at cardiac phase ``phase`` in [0, 1): a half cosine up to the ES
    phase (systole), another back down to 0 at the cycle's end (diastole)."""
    t = float(phase) % 1.0
    if t <= es_phase:
        return 0.5 * (1.0 - math.cos(math.pi * t / es_phase))
    return 0.5 * (1.0 + math.cos(math.pi * (t - es_phase) / (1.0 - es_phase)))


def generate_cine(
    seed: int,
    num_frames: int = 20,
    *,
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
    shape: Sequence[int] = (96, 96, 10),
    oblique: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """A whole beating cycle of subject ``seed``: ``num_frames`` frames at phases ``k / num_frames``.

    Frame 0 is ED and frame ``es_frame`` (the subject's ES phase, 30-40 % of the cycle, rounded to a frame) is ES,
    with the same geometry as :func:`generate_subject` gives for ``"ED"`` and ``"ES"``; the frames between follow
    :func:`contraction_at`. Each frame has noise of its own.

    Returns:
        image (float32 ``[X, Y, Z, T]``), label (uint8 ``[X, Y, Z, T]``), the affine, and ``info`` with ``ed_frame``
        (0), ``es_frame``, ``num_frames`` and per-frame ``contraction`` and reference volumes ``frames``.
    """
    num_frames = int(num_frames)
    if num_frames < 2:
        raise ValueError(f"a cine needs at least 2 frames, got {num_frames}.")
    spacing, shape = _validate_grid(spacing, shape)
    p = _draw_parameters(seed)
    es_frame = min(max(int(round(p["es_phase"] * num_frames)), 1), num_frames - 1)
    images, labels, frames = [], [], []
    for k in range(num_frames):
        contraction = contraction_at(k / num_frames, es_frame / num_frames)
        image, label, affine, info = _render(p, _heart(p, contraction), [seed, 100 + k], spacing, shape, oblique)
        images.append(image)
        labels.append(label)
        frames.append({"frame": k, "contraction": contraction, **{n: info[f"{n}_ml"] for n in STRUCTURES}})
    info.update({"seed": int(seed), "num_frames": num_frames, "ed_frame": 0, "es_frame": es_frame, "frames": frames})
    return np.stack(images, axis=-1), np.stack(labels, axis=-1), affine, info


def _render(
    p: dict[str, Any], heart: _Heart, noise_seed: list[int], spacing: tuple, shape: tuple, oblique: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One frame of the heart ``heart`` of subject ``p`` on a grid: image, label, affine and reference volumes."""
    affine = _make_affine(p, spacing, shape, oblique)
    points = _world_points(affine, np.arange(shape[0]), np.arange(shape[1]), np.arange(shape[2]))
    label = _label_points(points, heart).reshape(shape)
    fractions = _label_fractions(label, affine, heart)

    tissue = _tissue(points, p).reshape(shape)
    blood = fractions[LABELS["lv_blood_pool"]] + fractions[LABELS["rv_blood_pool"]]
    image = fractions[0] * tissue + blood * p["blood"] + fractions[LABELS["lv_myocardium"]] * p["myocardium"]
    image = _blur_in_plane(image * _bias_field(points, p).reshape(shape), p["blur_sigma"])
    noise = np.random.default_rng(noise_seed).normal(0.0, p["noise_std"], (2,) + shape)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    image = (image * p["intensity_scale"]).astype(np.float32)

    voxel_ml = voxel_volume_ml(affine)
    info: dict[str, Any] = {}
    for name in STRUCTURES:
        info[f"{name}_ml"] = float(fractions[LABELS[name]].sum() * voxel_ml)
    info.update(_continuous_lv_volumes(heart))
    info.update(_describe(p, heart, spacing, shape, oblique))
    return image, label, affine, info


def _continuous_lv_volumes(heart: _Heart) -> dict[str, float]:
    """Closed-form volumes (ml) of the whole continuous LV shapes, regardless of the field of view and sampling."""
    area = math.pi * heart.ellipticity
    cavity = area * heart.endo_radius**2 * _bullet_factor(heart.endo_length, heart.cylinder)
    epicardium = area * heart.epi_radius**2 * _bullet_factor(heart.epi_length, heart.cylinder)
    return {
        "lv_blood_pool_continuous_ml": cavity / 1000.0,
        "lv_myocardium_continuous_ml": (epicardium - cavity) / 1000.0,
    }


def _describe(p: dict[str, Any], heart: _Heart, spacing: tuple, shape: tuple, oblique: bool) -> dict[str, Any]:
    """Subject parameters for ``info``, in mm / degrees and plain Python types."""
    return {
        "spacing": list(spacing),
        "shape": list(shape),
        "oblique": bool(oblique),
        "fov_center_mm": [float(v) for v in p["fov_center"]],
        "lv_center_mm": [float(v) for v in heart.center],
        "lv_base_z_mm": float(heart.center[2] + heart.base),
        "lv_apex_z_mm": float(heart.center[2] + heart.base - heart.epi_length),
        "lv_rotation_deg": math.degrees(heart.rotation),
        "lv_ellipticity": float(heart.ellipticity),
        "lv_endo_radius_mm": float(heart.endo_radius),
        "lv_epi_radius_mm": float(heart.epi_radius),
        "lv_wall_thickness_mm": float(heart.epi_radius - heart.endo_radius),
        "lv_apex_wall_mm": float(heart.epi_length - heart.endo_length),
        "lv_length_mm": float(heart.epi_length),
        "lv_cavity_length_mm": float(heart.endo_length),
        "rv_angle_deg": math.degrees(heart.rv_angle),
        "rv_width_mm": float(heart.rv_offset + heart.rv_radial - heart.epi_radius - heart.rv_gap),
        "rv_length_mm": float(heart.rv_length),
        "target_ejection_fraction": float(p["ejection_fraction"]),
        "intensity_scale": float(p["intensity_scale"]),
        "noise_std": float(p["noise_std"]),
        "bias_amplitude": float(p["bias_amplitude"]),
    }


def _subject_seed(cohort_seed: int, index: int) -> int:
    """Independent, reproducible seed of subject ``index`` (cohorts with nearby seeds share no subjects)."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1)[0])


def _as_phases(phases: str | Sequence[str]) -> tuple[str, ...]:
    """Phases from a sequence or a comma-separated string (as the command line passes them)."""
    items = phases.split(",") if isinstance(phases, str) else list(phases)
    out = tuple(str(ph).strip().upper() for ph in items if str(ph).strip())
    if not out or any(ph not in PHASES for ph in out) or len(set(out)) != len(out):
        raise ValueError(f"phases must be distinct values from {PHASES}, got {phases!r}.")
    return out


def generate_cohort(
    output_dir: str,
    num_subjects: int = 12,
    seed: int = 0,
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
    shape: Sequence[int] = (96, 96, 10),
    phases: str | Sequence[str] = PHASES,
    num_validation: int = 2,
    num_frames: int | None = None,
    cine_labels: str = "all",
) -> str:
    """Write ``synth{NNN}_{phase}.nii.gz`` images, ``*_gt.nii.gz`` labels and a MONAI ``datalist.json``.

    Each entry records its ``cardiac_phase`` (ED 0, ES where :func:`generate_cine` puts that subject's ES frame in a
    cycle of 20), the cine model's time coordinate.

    The last ``num_validation`` subjects (all their phases) form the "validation" section, so no subject is split
    across sections; at least one subject is kept for training. Paths in the datalist are relative to its folder
    (``monai.data.load_decathlon_datalist`` resolves them), and the datalist is written last, so its presence
    marks a complete cohort. Subject ``i`` is ``generate_subject(s)`` with ``s`` derived from ``(seed, i)`` and
    stored as ``"seed"`` in its entries, so it can be regenerated, e.g. on a finer grid.

    With ``num_frames``, each subject is instead a whole cycle (:func:`generate_cine`): a 4D ``synth{NNN}_cine.nii.gz``
    with, for ``cine_labels="all"``, a 4D label ``synth{NNN}_cine_gt.nii.gz`` (one entry), or for ``"ed_es"`` 3D labels
    of the ED and ES frames only (``synth{NNN}_cine_ED_gt.nii.gz``, ``_ES_gt``: one entry each, with ``frames``) and
    one unlabelled entry for the other frames, whose intensities train the cine model too. Entries record
    ``ed_frame`` and ``es_frame``; ``phases`` is not used.

    Returns:
        the path of the datalist.
    """
    num_subjects = int(num_subjects)
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be at least 1, got {num_subjects}.")
    if cine_labels not in ("all", "ed_es"):
        raise ValueError(f"cine_labels must be 'all' or 'ed_es', got {cine_labels!r}.")
    phases = _as_phases(phases)
    num_val = min(max(int(num_validation), 0), num_subjects - 1)
    if num_val != num_validation:
        logger.warning(f"num_validation={num_validation} changed to {num_val} to keep a training subject.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    datalist: dict[str, Any] = {
        "name": "nisf_monai synthetic SAX cine",
        "description": "Synthetic short-axis cardiac cine MRI (nisf_monai.data.synthetic); volumes by disc summation.",
        "tensorImageSize": "3D" if num_frames is None else "4D",
        "modality": {"0": "MRI"},
        "labels": DATALIST_LABELS,
        "training": [],
        "validation": [],
    }
    for index in range(num_subjects):
        subject, subject_seed = f"synth{index:03d}", _subject_seed(seed, index)
        section = "validation" if index >= num_subjects - num_val else "training"
        if num_frames is not None:
            datalist[section] += _write_cine(out, subject, subject_seed, int(num_frames), spacing, shape, cine_labels)
            continue
        for phase in phases:
            image, label, affine, info = generate_subject(subject_seed, phase, spacing=spacing, shape=shape)
            case = f"{subject}_{phase}"
            save_nifti(image, affine, out / f"{case}.nii.gz", time_unit="sec")
            save_nifti(label, affine, out / f"{case}_gt.nii.gz", time_unit="sec")
            entry = {"image": f"{case}.nii.gz", "label": f"{case}_gt.nii.gz", "subject": subject, "phase": phase}
            entry.update({"case": case, "seed": subject_seed, "cardiac_phase": _cycle_phase(subject_seed, phase)})
            entry.update({f"{name}_ml": round(info[f"{name}_ml"], 4) for name in STRUCTURES})
            datalist[section].append(entry)
    datalist["numTraining"] = len(datalist["training"])
    return atomic_write_json(out / DATALIST_NAME, datalist)


def _cycle_phase(seed: int, phase: str, num_frames: int = 20) -> float:
    """Where the ED or ES frame of subject ``seed`` lies in its cycle of ``num_frames`` frames (as
    :func:`generate_cine` places them), for the cine model's time coordinate."""
    if phase == "ED":
        return 0.0
    es_frame = min(max(int(round(_draw_parameters(seed)["es_phase"] * num_frames)), 1), num_frames - 1)
    return es_frame / num_frames


def _write_cine(
    out: Path, subject: str, seed: int, num_frames: int, spacing: Sequence[float], shape: Sequence[int], labels: str
) -> list[dict[str, Any]]:
    """Write one subject's cycle (and its labels, ``labels`` as in :func:`generate_cohort`); its datalist entries."""
    image, label, affine, info = generate_cine(seed, num_frames, spacing=spacing, shape=shape)
    case = f"{subject}_cine"
    save_nifti(image, affine, out / f"{case}.nii.gz", time_unit="sec")
    common = {"image": f"{case}.nii.gz", "subject": subject, "case": case, "seed": seed}
    common.update({"ed_frame": info["ed_frame"], "es_frame": info["es_frame"]})
    if labels == "all":
        save_nifti(label, affine, out / f"{case}_gt.nii.gz", time_unit="sec")
        return [{**common, "label": f"{case}_gt.nii.gz"}]
    entries = []
    for phase, frame in (("ED", info["ed_frame"]), ("ES", info["es_frame"])):
        save_nifti(label[..., frame], affine, out / f"{case}_{phase}_gt.nii.gz", time_unit="sec")
        entries.append({**common, "label": f"{case}_{phase}_gt.nii.gz", "frames": [frame], "phase": phase})
    others = [k for k in range(num_frames) if k not in (info["ed_frame"], info["es_frame"])]
    return entries + [{**common, "frames": others}]


def ensure_synthetic_cohort(dataset_dir: str, **kwargs: Any) -> str:
    """Path of ``dataset_dir/datalist.json``, generating a synthetic cohort there first if it has none.

    An existing datalist is never overwritten, so a real or previously generated dataset is left alone;
    ``kwargs`` go to :func:`generate_cohort`.
    """
    path = Path(dataset_dir) / DATALIST_NAME
    if path.is_file():
        return str(path)
    datalist = generate_cohort(str(dataset_dir), **kwargs)
    with open(datalist) as f:
        content = json.load(f)
    num_subjects = len({e["subject"] for section in ("training", "validation") for e in content[section]})
    logger.info(f"generated a synthetic cohort of {num_subjects} subjects in {dataset_dir}")
    return datalist


def ensure_demo_case(dataset_dir: str | os.PathLike) -> str:
    """``dataset_dir``, holding one synthetic short-axis frame (``demo_ED.nii.gz``, on an oblique grid) written
    first when the folder has no image: what ``run inference`` segments when no ``--dataset_dir`` is given, so a
    first run shows the outputs without data of one's own."""
    folder = Path(dataset_dir)
    if not any(folder.glob("*.nii*")):
        image, _, affine, _ = generate_subject(7, "ED", oblique=True)
        save_nifti(image, affine, folder / "demo_ED.nii.gz", dtype=np.float32)
        logger.info(
            "no --dataset_dir given: segmenting one synthetic frame written to %s; give --dataset_dir DIR (NIfTI or "
            "DICOM) for your own scans",
            folder,
        )
    return str(folder)


def main() -> None:
    """Command line: ``python -m nisf_monai.data.synthetic generate --output_dir DIR [--num_subjects N ...]``."""
    import fire

    fire.Fire({"generate": generate_cohort})


if __name__ == "__main__":
    main()
