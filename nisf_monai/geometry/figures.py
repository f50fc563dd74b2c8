"""PNG figures of the geometry runs: planes with their segmentation, surfaces, and agreement plots."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from nisf_monai.geometry.meshes import Mesh
from nisf_monai.plotting import CLASS_COLOURS, pyplot, save_figure

__all__ = ["plane_figure", "agreement_figure", "surface_figure"]

UNITS = {"ml": "ml", "pct": "%", "g": "g"}


def plane_figure(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
    spacing: Sequence[float],
    title: str = "",
) -> str:
    """Side-by-side views of one plane ``(U, V)``: each panel a title, a grey image and optionally a label
    map drawn as coloured translucent regions; axes in mm along the plane's u (horizontal) and v."""
    plt = pyplot()
    su, sv = float(spacing[0]), float(spacing[1])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for ax, (name, image, labels) in zip(axes[0], panels):
        nu, nv = image.shape
        extent = (-0.5 * su, (nu - 0.5) * su, -0.5 * sv, (nv - 0.5) * sv)
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        ax.imshow(
            image.T,
            cmap="gray",
            origin="lower",
            extent=extent,
            vmin=lo,
            vmax=hi if hi > lo else lo + 1,
            interpolation="nearest",
        )
        if labels is not None:
            overlay = np.zeros((nv, nu, 4))
            for value, colour in CLASS_COLOURS.items():
                overlay[labels.T == value] = (*colour, 0.45)
            ax.imshow(overlay, origin="lower", extent=extent, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("u (mm)", fontsize=8)
        ax.set_ylabel("v (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}\nred LV blood pool, green LV myocardium, blue RV blood pool", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _label(measure: str) -> str:
    name, unit = measure.rsplit("_", 1)
    return f"{name.replace('_', ' ').upper()} ({UNITS.get(unit, unit)})"


def agreement_figure(
    path: str | os.PathLike,
    predicted: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    measures: Sequence[str],
    kind: str = "bland_altman",
    title: str = "",
    labels: tuple[str, str] = ("NISF", "manual"),
) -> str:
    """One panel per measure over the subjects in both dicts: a Bland-Altman plot (difference against
    mean, with bias and 95 % limits) or a scatter plot against the identity line."""
    plt = pyplot()
    subjects = sorted(set(predicted) & set(reference))
    cols = min(3, len(measures))
    rows = int(np.ceil(len(measures) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, measure in zip(axes.ravel(), measures):
        p = np.array([predicted[s][measure] for s in subjects], dtype=float)
        r = np.array([reference[s][measure] for s in subjects], dtype=float)
        keep = np.isfinite(p) & np.isfinite(r)
        p, r = p[keep], r[keep]
        if kind == "bland_altman":
            mean, diff = (p + r) / 2, p - r
            ax.scatter(mean, diff, s=14)
            if diff.size:
                bias = diff.mean()
                sd = diff.std(ddof=1) if diff.size > 1 else 0.0
                for y, style in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
                    ax.axhline(y, color="grey", linestyle=style, linewidth=1)
            ax.set_xlabel(f"mean of {labels[0]} and {labels[1]}", fontsize=8)
            ax.set_ylabel(f"{labels[0]} - {labels[1]}", fontsize=8)
        else:
            ax.scatter(r, p, s=14)
            if p.size:
                lo, hi = min(p.min(), r.min()), max(p.max(), r.max())
                ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
            ax.set_xlabel(labels[1], fontsize=8)
            ax.set_ylabel(labels[0], fontsize=8)
        if p.size:
            r_text = f", r {np.corrcoef(p, r)[0, 1]:.2f}" if p.size > 1 and p.std() > 0 and r.std() > 0 else ""
            ax.text(
                0.02,
                0.97,
                f"bias {np.mean(p - r):+.2f}, MAE {np.mean(np.abs(p - r)):.2f}{r_text}",
                transform=ax.transAxes,
                fontsize=7,
                va="top",
            )
        ax.set_title(_label(measure), fontsize=9)
        ax.ticklabel_format(useOffset=False)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(measures) :]:
        ax.axis("off")
    fig.suptitle(title or ("Bland-Altman" if kind == "bland_altman" else "agreement"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _unit_normals(mesh: Mesh) -> np.ndarray:
    v0, v1, v2 = (mesh.vertices[mesh.faces[:, k]] for k in range(3))
    normal = np.cross(v1 - v0, v2 - v0)
    return normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)


def surface_figure(path: str | os.PathLike, meshes: Mapping[str, Mesh], title: str = "") -> str:
    """A 3D view of the structure surfaces (world mm): LV blood pool, myocardium (translucent) and RV.
    Drawing is slow for large meshes: pass meshes extracted on a grid of about 2 mm."""
    plt = pyplot()
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    colours = {
        "lv_blood_pool": (CLASS_COLOURS[1], 1.0),
        "lv_myocardium": (CLASS_COLOURS[2], 0.2),
        "rv_blood_pool": (CLASS_COLOURS[3], 0.9),
    }
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    points = [m.vertices for m in meshes.values() if len(m)]
    for name, mesh in meshes.items():
        if not len(mesh):
            continue
        colour, alpha = colours.get(name, ((0.5, 0.5, 0.5), 0.5))
        shade = np.clip(0.55 + 0.45 * np.abs(_unit_normals(mesh) @ np.array([0.3, -0.4, 0.87])), 0, 1)[:, None]
        faces = np.concatenate([np.asarray(colour)[None] * shade, np.full((len(mesh), 1), alpha)], axis=1)
        ax.add_collection3d(Poly3DCollection(mesh.vertices[mesh.faces], facecolors=faces, linewidth=0))
    if points:
        allp = np.concatenate(points)
        centre, half = allp.mean(axis=0), (allp.max(axis=0) - allp.min(axis=0)).max() / 2
        for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(c - half, c + half)
    ax.set_xlabel("x (mm)", fontsize=8)
    ax.set_ylabel("y (mm)", fontsize=8)
    ax.set_zlabel("z (mm)", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
