"""Checks of the bundle's settings before a run reads any image or fits any code.

A wrong value on the command line (``--target_spacing "[0, 1, 1]"``, an ``--output_dir`` that names a file,
``--batch_size 0``, ``--device gpu``) would otherwise surface minutes later, after the data was read and the
first code fitted, as a traceback from deep inside MONAI's config machinery. Each config's ``initialize`` list
calls :func:`check_settings` on its ``checked_settings`` (a dict of config ids; a config merged on top adds its
own with ``"+checked_settings"``), and a wrong value raises :class:`SettingsError`, which
:func:`~nisf_monai.errors.report_input_errors` prints as one line::

    ERROR: target_spacing: [0, 1, 1] has a value that is not positive; give 3 positive millimetre values ...

The message is always ``<setting>: <what is wrong>; <what would be accepted>``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nisf_monai.errors import SettingsError

__all__ = [
    "CHECKS",
    "SettingsError",
    "available_devices",
    "check_angles",
    "check_values",
    "check_zooms",
    "check_choice",
    "check_count",
    "check_device",
    "check_flag",
    "check_fraction",
    "check_non_negative",
    "check_output_dir",
    "check_settings",
    "check_spacing",
]


def _show(value: Any) -> str:
    """A value as the user typed it: lists and numbers plainly, text quoted."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, np.ndarray):
        return _show(value.tolist())
    return str(value)


def _is_text(value: Any) -> bool:
    return isinstance(value, (str, bytes))


def _none_hint(value: Any) -> str:
    """On the command line ``null`` and ``none`` arrive as text; ``None`` is what means "no value"."""
    return (
        " (write None, not null, on the command line)"
        if isinstance(value, str) and value.lower() in ("null", "none")
        else ""
    )


def check_spacing(
    name: str, value: Any, counts: Sequence[int] = (1, 3), none_means: str | None = None
) -> list[float] | None:
    """Positive, finite millimetre spacings: ``counts`` says how many values may be given (one value is used for
    every axis); ``none_means`` says what None does, if it is allowed. Returns the values as floats."""
    several = " or ".join(str(c) for c in sorted(counts) if c > 1)
    example = _show([1.0] * max(counts))
    accepted = f"give {several} positive millimetre values such as {example}" + (
        ", or one for every axis" if 1 in counts else ""
    )
    if none_means:
        accepted += f", or None {none_means}"
    if value is None:
        if none_means:
            return None
        raise SettingsError(name, "None is not a spacing", accepted)
    if _is_text(value) or isinstance(value, bool):
        raise SettingsError(name, f"{_show(value)} is not a spacing{_none_hint(value)}", accepted)
    try:
        spacing = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise SettingsError(name, f"{_show(value)} is not a list of numbers", accepted) from None
    if spacing.size not in counts:
        raise SettingsError(name, f"{_show(value)} has {spacing.size} value(s)", accepted)
    if not np.all(np.isfinite(spacing)):
        raise SettingsError(name, f"{_show(value)} has a value that is not finite", accepted)
    if not np.all(spacing > 0):
        raise SettingsError(name, f"{_show(value)} has a value that is not positive", accepted)
    return spacing.tolist()


def check_values(name: str, value: Any, noun: str, what: str, example: str, positive: bool = False) -> list[float]:
    """One or more finite numbers given as a list (all above 0 if ``positive``): ``noun`` names them in the message,
    ``what`` and ``example`` say what is accepted."""
    accepted = f"give a list of one or more {what}, such as {example}"
    if _is_text(value) or isinstance(value, bool) or not isinstance(value, (list, tuple, np.ndarray)):
        raise SettingsError(name, f"{_show(value)} is not a list of {noun}", accepted)
    try:
        values = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise SettingsError(name, f"{_show(value)} is not a list of numbers", accepted) from None
    if values.size == 0:
        raise SettingsError(name, f"[] has no {noun[:-1]}", accepted)
    if not np.all(np.isfinite(values)):
        raise SettingsError(name, f"{_show(value)} has a value that is not finite", accepted)
    if positive and not np.all(values > 0):
        raise SettingsError(name, f"{_show(value)} has a value that is not positive", accepted)
    return values.tolist()


check_angles = partial(
    check_values, noun="angles", what="angles in radians", example="[0.0, 0.15, -0.15] ([0.0]: no turn)"
)
check_zooms = partial(
    check_values, noun="factors", what="positive factors", example="[1.0, 0.9, 1.1] ([1.0]: no zoom)", positive=True
)


def check_count(
    name: str, value: Any, minimum: int = 1, what: str = "items", none_means: str | None = None
) -> int | None:
    """An integer of at least ``minimum``; ``none_means`` says what None does, if it is allowed. A float such
    as 4.0 is refused too: the objects it goes to (``DataLoader``'s batch size, ``range``) need an ``int``."""
    accepted = f"give an integer number of {what}, {minimum} or more"
    if none_means:
        accepted += f", or None {none_means}"
    if value is None:
        if none_means:
            return None
        raise SettingsError(name, "None is not a number", accepted)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingsError(name, f"{_show(value)} is not an integer{_none_hint(value)}", accepted)
    if value < minimum:
        problem = "is negative" if value < 0 and minimum == 0 else f"is less than {minimum}"
        raise SettingsError(name, f"{value} {problem}", accepted)
    return int(value)


def check_fraction(name: str, value: Any, include_zero: bool = True) -> float:
    """A share between 0 (included or not) and 1 (included)."""
    interval = "[0, 1]" if include_zero else "(0, 1]"
    accepted = f"give a number in {interval}" + (
        ", such as 0.5" if include_zero else ", such as 0.5 (1 keeps everything)"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingsError(name, f"{_show(value)} is not a number", accepted)
    if not (0.0 <= value <= 1.0) or (value == 0 and not include_zero):
        raise SettingsError(name, f"{value} is outside {interval}", accepted)
    return float(value)


def check_non_negative(
    name: str, value: Any, unit: str = "mm", none_means: str | None = None, positive: bool = False
) -> float | None:
    """A finite number >= 0 (> 0 if ``positive``) of ``unit`` (a plain number for ""); ``none_means`` says what
    None does, if it is allowed."""
    quantity = f"a number of {unit}" if unit else "a number"
    bound = "above 0" if positive else "0 or more"
    accepted = f"give {quantity}, {bound}" + (f", or None {none_means}" if none_means else "")
    if value is None and none_means:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingsError(name, f"{_show(value)} is not a number{_none_hint(value)}", accepted)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        problem = "negative" if value < 0 else "zero" if value == 0 else "not finite"
        raise SettingsError(name, f"{value} is {problem}", accepted)
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """True or False. On the command line ``false`` is text (only ``False`` is parsed), and any text is true
    in Python: ``--stream_outputs false`` would switch streaming *on*."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    flag = f"--{name} False" if str(value).lower() in ("false", "0", "no", "off") else f"--{name} True"
    problem = (
        f"{_show(value)} is text, not True or False" if _is_text(value) else f"{_show(value)} is not True or False"
    )
    raise SettingsError(name, problem, f"give True or False, capitalised on the command line (e.g. {flag})")


def check_choice(name: str, value: Any, choices: Sequence[str], none_means: str | None = None) -> str | None:
    """One of ``choices``; ``none_means`` says what None does, if it is allowed."""
    accepted = "give one of " + ", ".join(repr(c) for c in choices) + (f", or None {none_means}" if none_means else "")
    if value is None and none_means:
        return None
    if value not in choices:
        raise SettingsError(name, f"{_show(value)} is not one of the accepted values", accepted)
    return str(value)


def available_devices() -> list[str]:
    """The torch devices a run can use on this machine."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str, value: Any) -> torch.device:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    devices = available_devices()
    accepted = f"give one of the devices of this machine: {', '.join(devices)}"
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise SettingsError(name, f"{_show(value)} is not a device", accepted)
    if isinstance(value, int) and not torch.cuda.is_available():
        raise SettingsError(name, f"{value} names a GPU and torch finds no CUDA GPU here", accepted)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise SettingsError(name, f"{_show(value)} is not a torch device", accepted) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(name, f"{device} is not available (torch finds no CUDA GPU here)", accepted)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingsError(
                name, f"{device} does not exist ({torch.cuda.device_count()} CUDA GPU(s) here)", accepted
            )
        return device
    if str(device) in devices:
        return device
    raise SettingsError(name, f"{device} is not available on this machine", accepted)


def check_output_dir(name: str, value: Any) -> Path:
    """A folder the run can write to, created (with its parents) if missing. Writing is tried for real (a
    temporary file, removed at once): permission bits say nothing about read-only file systems or root."""
    accepted = "give a folder you can write to (it is created if missing)"
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise SettingsError(name, f"{_show(value)} is not a folder path", accepted)
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise SettingsError(name, f"{path} is a file, not a folder", accepted)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SettingsError(name, f"cannot create {path} ({err.strerror or err})", accepted) from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".nisf_write_check.", suffix=".tmp")
    except OSError as err:
        raise SettingsError(name, f"{path} is not writable ({err.strerror or err})", accepted) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)
    return path


_steps = partial(check_count, minimum=0, what="latent optimisation steps (0 decodes the initial code)")
_every = partial(check_count, minimum=0, what="latent steps between Dice records (0 turns them off)")
_spacing = partial(check_spacing, none_means="to keep the input grid")

CHECKS: dict[str, Callable[[str, Any], Any]] = {
    # where results go
    "output_dir": check_output_dir,
    "ckpt_dir": check_output_dir,
    # output grids
    "target_spacing": _spacing,
    "measure_spacing": partial(check_spacing, none_means="to read on the acquired grid"),
    "plane_spacing": partial(check_spacing, counts=(1, 2, 3)),
    # step counts
    "inference_steps": _steps,
    "val_max_steps": _steps,
    "monitor_every": _every,
    "val_monitor_every": _every,
    "max_epochs": partial(check_count, minimum=1, what="epochs"),
    "val_interval": partial(check_count, minimum=0, what="epochs between validations (0 turns validation off)"),
    # point counts and shares
    "num_points": partial(check_count, minimum=1, what="points per image and step", none_means="for every voxel"),
    "foreground_fraction": check_fraction,
    "point_fraction": partial(check_fraction, include_zero=False),
    # batch sizes
    "batch_size": partial(check_count, minimum=1, what="images per batch"),
    "val_batch_size": partial(check_count, minimum=1, what="images per batch"),
    # where it runs
    "device": check_device,
    "onednn_primitive_cache": partial(check_count, minimum=0, what="oneDNN primitives kept"),
    # switches
    "amp": check_flag,
    "stream_outputs": check_flag,
    "save_images": check_flag,
    "score_extrapolated": check_flag,
    # measuring
    "roi_margin_mm": partial(check_non_negative, none_means="to read the whole slab"),
    # latent fit
    "localiser_weight": partial(check_non_negative, unit=""),
    "localiser_blend": check_fraction,
    "localiser_blend_hidden": check_flag,
    "keep_largest_component": check_flag,
    "localiser_lr_power": partial(check_non_negative, unit=""),
    "localiser_random_crop": check_flag,
    "localiser_rotations": check_angles,
    "localiser_zooms": check_zooms,
    "heart_sigma_mm": partial(check_non_negative, none_means="to weigh every voxel alike"),
    "heart_reference_volume_ml": partial(
        check_non_negative, unit="ml", positive=True, none_means="to keep each heart's own size"
    ),
    "volume_mode": partial(check_choice, choices=("label", "probability")),
    "measure_source": partial(check_choice, choices=("nisf", "labels")),
    "measure_blend": check_flag,
    "mesh_format": partial(check_choice, choices=("vtk", "stl", "obj"), none_means="for no meshes"),
    "curve_phases": partial(check_count, minimum=0, what="phases of the cine volume curve (0: no curve; not 1)"),
    "curve_spacing": check_spacing,
    # the cine model
    "cine_model": check_flag,
    "assumed_cine_length": partial(check_count, minimum=1, what="frames per cardiac cycle"),
}


def check_settings(settings: Mapping[str, Any]) -> None:
    """Check every ``{config id: value}`` of ``settings`` with its check in :data:`CHECKS` and raise
    :class:`SettingsError` for the first wrong value. Folders (``output_dir``, ``ckpt_dir``) are checked last,
    since checking creates them: a run refused for another setting leaves nothing behind. Called from the
    configs' ``initialize`` lists, before anything else is built."""
    unknown = [name for name in settings if name not in CHECKS]
    if unknown:
        raise KeyError(f"no check for setting(s) {unknown}; known: {sorted(CHECKS)}.")
    for name in sorted(settings, key=lambda n: CHECKS[n] is check_output_dir):
        CHECKS[name](name, settings[name])
