"""What several test modules share: the repository's paths, small networks and images, and running the bundle
as a user runs it (``from helpers import ...``; pytest puts this folder on the import path)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from nisf_monai.networks import NISFNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
AFFINE = np.diag([2.0, 2.0, 8.0, 1.0])  # 2 x 2 mm pixels, 8 mm slices
TINY_NET_ARGS = ["--hidden_dim", "16", "--latent_dim", "16", "--num_layers", "2"]  # a tiny network on the command line


def tiny_net(seed: int = 0, **sizes: Any) -> NISFNet:
    """A small NISFNet with weights seeded by ``seed``: latent 8, hidden 16, 2 layers, 3 classes unless ``sizes``
    (any NISFNet argument) say otherwise."""
    torch.manual_seed(seed)
    return NISFNet(**{"latent_dim": 8, "hidden_dim": 16, "num_layers": 2, "num_classes": 3, **sizes})


def as_image(volume: np.ndarray, affine: np.ndarray = AFFINE, batch: bool = True) -> MetaTensor:
    """A float32 MetaTensor of a volume ``(X, Y, Z)`` on the grid ``affine``: ``(1, 1, X, Y, Z)``, a batch of one
    as a MONAI evaluator hands it to the inferer, or ``(1, X, Y, Z)`` with ``batch=False``."""
    t = torch.as_tensor(volume, dtype=torch.float32)[None]
    return MetaTensor(t[None] if batch else t, affine=torch.as_tensor(affine))


def rotation(turn: float, tilt: float = 0.0) -> np.ndarray:
    """A turn by ``turn`` about z, then a tilt by ``tilt`` about x."""
    rz = np.array([[math.cos(turn), -math.sin(turn), 0], [math.sin(turn), math.cos(turn), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]])
    return rx @ rz


def oblique_affine(
    spacing: Sequence[float],
    origin: Sequence[float],
    turn: float,
    tilt: float = 0.0,
    flip_voxel_axis: int | None = None,
    flip_world_axis: int | None = None,
) -> np.ndarray:
    """A voxel-to-world affine with oblique axes: voxel sizes ``spacing``, turned and tilted (:func:`rotation`),
    the first voxel at ``origin``; optionally one voxel axis reversed (a left-handed grid) or one world axis."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(turn, tilt) @ np.diag(spacing)
    if flip_voxel_axis is not None:
        affine[:3, flip_voxel_axis] *= -1
    affine[:3, 3] = origin
    if flip_world_axis is not None:
        affine[flip_world_axis, :3] *= -1.0
    return affine


def bundle_command(run_id: str, config: str | list[str], bundle_root: Path, *overrides: str) -> list[str]:
    """``python -m monai.bundle run`` of a config of ``bundle/configs``; a list of configs is passed as MONAI's
    ``--config_file "['a.json', 'b.json']"`` (later files override earlier ones)."""
    configs = str(CONFIGS / config) if isinstance(config, str) else str([str(CONFIGS / c) for c in config])
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        configs,
        "--bundle_root",
        str(bundle_root),
        *overrides,
    ]


def bundle_env(**env: str) -> dict[str, str]:
    """The environment of a bundle run: this one with ``CI=true``, Python warnings off and ``env`` added."""
    return dict(os.environ, CI="true", PYTHONWARNINGS="ignore", **env)


def run_command(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a fresh process, in :func:`bundle_env` (``env`` added), capturing its output."""
    return subprocess.run(cmd, cwd=cwd, env=bundle_env(**env), capture_output=True, text=True, timeout=timeout)


def run_bundle(
    run_id: str,
    config: str | list[str],
    bundle_root: Path,
    *overrides: str,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 600,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` (:func:`bundle_command`) in a fresh process, from ``cwd`` (default the
    bundle root, a folder other than the repository); with ``check``, fail the test unless it succeeds."""
    cmd = bundle_command(run_id, config, bundle_root, *overrides)
    result = run_command(cmd, cwd or bundle_root, timeout, **env)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
