"""Ignite handler that gives a 4D cine input 4D outputs: its frames' files joined into one NIfTI per output kind."""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from monai.data import FolderLayout, MetaTensor
from monai.utils import CommonKeys as Keys

from nisf_monai.io import atomic_write_bytes
from nisf_monai.transforms.loading import CINE_FRAME_KEY, frame_name_formatter

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CineOutputJoiner", "join_frames"]

logger = logging.getLogger("nisf_monai")


def join_frames(frame_paths: Sequence[str | os.PathLike], output: str | os.PathLike, source: str | os.PathLike) -> str:
    """Stack 3D NIfTI files (one per frame, one grid) into a 4D ``(X, Y, Z, T)`` NIfTI at ``output``, with the frames'
    affine and the ``source`` cine's frame interval and time unit; written whole or not at all. Returns the path."""
    frames = [nib.load(str(path)) for path in frame_paths]
    data = np.stack([np.asarray(frame.dataobj) for frame in frames], axis=-1)
    affine = frames[0].affine
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    cine = nib.load(str(source)).header
    time_unit = cine.get_xyzt_units()[1]
    image.header.set_xyzt_units(xyz="mm", t=time_unit if time_unit != "unknown" else None)
    zooms = list(image.header.get_zooms())
    zooms[3] = float(cine.get_zooms()[3]) if len(cine.get_zooms()) > 3 else 1.0
    image.header.set_zooms(zooms)
    payload = image.to_bytes()
    if str(output).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6)
    return atomic_write_bytes(output, payload)


class CineOutputJoiner:
    """After each iteration of the inference run, joins the per-frame outputs of every 4D cine input whose frames are
    all written (``<name>_tNN_seg.nii.gz``, ...) into ``<name>_seg.nii.gz`` (``(X, Y, Z, T)``, the input's frame count
    and frame interval, the outputs' affine) and removes the per-frame files. Inputs of one frame are left alone, and
    so is a cine of which the datalist asked only some frames (its per-frame files are the outputs then).

    The cine model's batches hold a subject's frames together (:class:`~nisf_monai.data.GroupBatchSampler`), so a cine
    is joined right after its own iteration; with the per-frame model, after its last frame's.

    Args:
        output_dir: where the outputs are written (as for ``SaveImaged`` / the streaming saver).
        output_postfixes: the output kinds to join (``seg``, ``recon``).
        output_ext: file extension of the outputs.
        output_name_formatter: as the savers name files (default: frames as ``_tNN``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_postfixes: Sequence[str] = ("seg", "recon"),
        output_ext: str = ".nii.gz",
        output_name_formatter: Callable[[dict, Any], dict] = frame_name_formatter,
    ) -> None:
        self.output_dir = output_dir
        self.postfixes = tuple(output_postfixes)
        self.output_ext = output_ext
        self.output_name_formatter = output_name_formatter
        self._lengths: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _path(self, source: str, postfix: str, frame: int | None) -> str:
        layout = FolderLayout(self.output_dir, postfix=postfix, extension=self.output_ext, parent=False, makedirs=True)
        meta = {"filename_or_obj": source} if frame is None else {"filename_or_obj": source, CINE_FRAME_KEY: frame}
        return layout.filename(**self.output_name_formatter(meta, self))

    def _length(self, source: str) -> int:
        if source not in self._lengths:
            shape = nib.load(source).shape
            self._lengths[source] = int(shape[3]) if len(shape) > 3 else 1
        return self._lengths[source]

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output
        if not isinstance(outputs, list):
            return
        sources = []
        for output in outputs:
            image = output.get(Keys.IMAGE)
            if isinstance(image, MetaTensor) and image.meta.get(CINE_FRAME_KEY) is not None:
                source = str(image.meta.get("filename_or_obj", ""))
                if source and source not in sources:
                    sources.append(source)
        for source in sources:
            self.join(source)

    def join(self, source: str) -> list[str]:
        """Join the frames of the cine ``source`` for every output kind whose frames are all written; the paths."""
        written = []
        for postfix in self.postfixes:
            frames = [self._path(source, postfix, t) for t in range(self._length(source))]
            if not all(Path(path).is_file() for path in frames):
                continue
            written.append(join_frames(frames, self._path(source, postfix, None), source))
            for path in frames:
                Path(path).unlink()
            logger.info("joined %d frames into %s", len(frames), written[-1])
        return written
