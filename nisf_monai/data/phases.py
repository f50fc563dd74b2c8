"""Where each frame sits in the cardiac cycle: the time coordinate of the cine model.

The cine model reads a frame's cardiac phase ``t`` in [0, 1) as a fourth coordinate. Cine MRI is triggered on the
ECG's R wave, so frame 0 is end-diastole and frame ``k`` of a cycle of ``T`` frames has ``t = k / T``. Each datalist
entry gets ``cardiac_phase`` (the value used) and ``phase_source`` (how it was found), by the first rule that applies:

1. ``datalist``: the entry gives ``cardiac_phase`` itself.
2. ``cine``: a frame cut from a 4D cine ``(X, Y, Z, T)`` (:func:`~nisf_monai.data.expand_cine_datalist` records its
   ``frame`` and ``cine_length`` ``T``): ``t = frame / T``.
3. ``cine_frame``: a 3D file of one frame whose entry gives its 0-based index ``cine_frame`` in the cycle.
4. ``file name``: a 3D file named like ACDC's ``<subject>_frameKK`` (``KK`` counted from 1): index ``KK - 1``.

For rules 3 and 4 the cycle's length ``T`` is the entry's ``cine_length`` when known (``nisf-monai datalist`` reads it
from ACDC's ``Info.cfg`` or a ``*_4d.nii.gz`` beside the frames), else ``assumed_cine_length`` (30, a common
cine length: ACDC's cycles have 12-35 frames, most near 30), and ``phase_source`` says it was assumed. An assumed
length stretches or squeezes the phases of that subject; the frames' order and the ED frame (phase 0) stay right,
and the measures find ED and ES from the volumes, not from the phase.

5. ``none``: nothing says where the frame lies: phase 0 (read as end-diastole).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nisf_monai.errors import DatalistError

__all__ = [
    "ASSUMED_CINE_LENGTH",
    "CINE_LENGTH_KEY",
    "PHASE_SOURCE_KEY",
    "assign_cardiac_phases",
    "cardiac_phase",
    "frame_index_from_name",
    "phase_and_source",
]

logger = logging.getLogger("nisf_monai")

PHASE_KEY = "cardiac_phase"  # same value as nisf_monai.transforms.coordinates.PHASE_KEY (no import: data is lower)
PHASE_SOURCE_KEY = "phase_source"
CINE_LENGTH_KEY = "cine_length"
CINE_FRAME_KEY = "cine_frame"
ASSUMED_CINE_LENGTH = 30
_FRAME_IN_NAME = re.compile(r"_frame(\d+)(?:\.nii(?:\.gz)?)?$")


def frame_index_from_name(path: str) -> int | None:
    """The 0-based cycle index of a file named ``..._frameKK[.nii.gz]`` (ACDC counts frames from 1), or None."""
    match = _FRAME_IN_NAME.search(Path(str(path)).name)
    if match is None or int(match.group(1)) < 1:
        return None
    return int(match.group(1)) - 1


def cardiac_phase(index: int, cine_length: int) -> float:
    """``index / cine_length``: the phase of frame ``index`` (0-based) of a cycle of ``cine_length`` frames."""
    if cine_length < 1 or not 0 <= index < cine_length:
        raise DatalistError(f"frame {index} does not lie in a cycle of {cine_length} frames.")
    return index / cine_length


def phase_and_source(entry: Mapping[Hashable, Any], image_key: str, assumed_cine_length: int) -> tuple[float, str]:
    """The phase of one entry and the rule that gave it (the module docstring's rules, in order)."""
    if entry.get(PHASE_KEY) is not None:
        phase = float(entry[PHASE_KEY])
        if not 0.0 <= phase < 1.0:
            raise DatalistError(f"{entry.get(image_key)}: cardiac_phase must lie in [0, 1), got {phase}.")
        return phase, "datalist"
    length = entry.get(CINE_LENGTH_KEY)
    if entry.get("frame") is not None and length is not None and int(length) > 1:
        return cardiac_phase(int(entry["frame"]), int(length)), "cine"
    index, how = entry.get(CINE_FRAME_KEY), CINE_FRAME_KEY
    if index is None:
        index, how = frame_index_from_name(str(entry.get(image_key, ""))), "file name"
    if index is None:
        return 0.0, "none"
    if not length:  # None or 0: not known
        length = max(assumed_cine_length, int(index) + 1)
        return cardiac_phase(int(index), length), f"{how}, {length} frames assumed"
    return cardiac_phase(int(index), int(length)), f"{how}, {int(length)} frames"


def assign_cardiac_phases(
    items: Sequence[Mapping[Hashable, Any]],
    image_key: str = "image",
    assumed_cine_length: int = ASSUMED_CINE_LENGTH,
) -> list[dict[Hashable, Any]]:
    """Copies of datalist entries with ``cardiac_phase`` and ``phase_source`` set by the module's rules (use after
    :func:`~nisf_monai.data.expand_cine_datalist`, which records each 4D frame's index and the cine's length).

    Raises:
        DatalistError: a given phase outside [0, 1), or a frame index outside its cycle.
    """
    if assumed_cine_length < 1:
        raise DatalistError(f"assumed_cine_length must be a positive number of frames, got {assumed_cine_length}.")
    out = []
    assumed = 0
    for item in items:
        entry = dict(item)
        entry[PHASE_KEY], entry[PHASE_SOURCE_KEY] = phase_and_source(entry, image_key, assumed_cine_length)
        assumed += "assumed" in entry[PHASE_SOURCE_KEY]
        out.append(entry)
    if assumed:
        logger.info(
            "%d of %d frames: the cycle's length is unknown, %d frames assumed for their phases "
            "(give cine_length in the datalist to set it)",
            assumed,
            len(out),
            assumed_cine_length,
        )
    return out
