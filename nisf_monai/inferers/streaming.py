"""Writing a sampled grid to NIfTI slab by slab, so memory is bounded by the slab, not by the output.

A NIfTI volume is stored with the first axis varying fastest, so the planes of the last spatial axis are
contiguous in the file: a volume can be written as a sequence of ``(X, Y, k)`` slabs appended in order.
At 0.5 mm an ACDC field of view has about 10^8 voxels (0.4 GB as float32 per channel, more after the
copies ``SaveImage`` makes); sampled and written a slab at a time, the same output needs a few MB.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel.openers import Opener
from torch import nn

from nisf_monai.inferers.probability_volume import ProbabilityVolume
from nisf_monai.transforms.coordinates import CoordinateMapping

__all__ = ["NiftiSlabWriter", "slab_bounds", "stream_sampled_grid"]


class NiftiSlabWriter:
    """Writes one NIfTI-1 file (``.nii`` or ``.nii.gz``) of a known shape from consecutive slabs along its
    last axis. The header (affine as sform, as MONAI's ``NibabelWriter`` sets it) goes first; the file is
    written under a temporary name and renamed into place only when every slab has arrived, so an
    interrupted run never leaves a truncated output behind.

    Use as a context manager::

        with NiftiSlabWriter("seg.nii.gz", affine, (X, Y, Z), np.uint8) as writer:
            for slab in slabs:  # each (X, Y, k), in order along the last axis
                writer.write(slab)
    """

    def __init__(self, path: str | os.PathLike, affine: Any, shape: Sequence[int], dtype: Any) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"a slab writer needs a 3D shape of positive sizes, got {self.shape}.")
        self.dtype = np.dtype(dtype)
        self.written = 0  # planes along the last axis so far
        template = nib.Nifti1Image(np.zeros((1, 1, 1), dtype=self.dtype), np.asarray(affine, dtype=np.float64))
        self.header = template.header.copy()
        self.header.set_data_shape(self.shape)
        self.header.set_xyzt_units("mm")
        self.header["vox_offset"] = 352  # 348-byte header + 4-byte empty extension flag, no extensions
        self.header.set_slope_inter(1.0, 0.0)
        # same extension, so nibabel's Opener compresses the temporary file as the final one
        suffix = ".nii.gz" if self.path.name.endswith(".nii.gz") else self.path.suffix
        self._temporary = self.path.with_name(f".{self.path.name[: len(self.path.name) - len(suffix)]}.partial{suffix}")
        self._file: Opener | None = None

    def __enter__(self) -> NiftiSlabWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = Opener(str(self._temporary), "wb")
        self.header.write_to(self._file)  # 348 bytes + the 4-byte extension flag: data starts at vox_offset
        return self

    def write(self, slab: np.ndarray | torch.Tensor) -> None:
        """Append the next ``(X, Y, k)`` planes."""
        if self._file is None:
            raise RuntimeError("NiftiSlabWriter.write must be called inside its `with` block.")
        array = slab.detach().cpu().numpy() if isinstance(slab, torch.Tensor) else np.asarray(slab)
        if array.ndim != 3 or array.shape[:2] != self.shape[:2] or self.written + array.shape[2] > self.shape[2]:
            raise ValueError(
                f"slab of shape {array.shape} does not continue a volume of shape {self.shape} at plane {self.written}."
            )
        self._file.write(array.astype(self.dtype, copy=False).tobytes(order="F"))
        self.written += array.shape[2]

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if exc_type is None and self.written == self.shape[2]:
            os.replace(self._temporary, self.path)
            return
        self._temporary.unlink(missing_ok=True)
        if exc_type is None:
            raise RuntimeError(
                f"{self.path}: only {self.written} of {self.shape[2]} planes were written; the file was not created."
            )


def slab_bounds(shape: Sequence[int], max_points: int) -> list[tuple[int, int]]:
    """``[start, stop)`` plane ranges along the last axis, each of at most ``max_points`` voxels (and at least
    one plane, however large a plane is)."""
    plane = int(shape[0]) * int(shape[1])
    depth = max(1, int(max_points) // max(plane, 1))
    return [(start, min(start + depth, int(shape[2]))) for start in range(0, int(shape[2]), depth)]


def _shifted(affine: np.ndarray, planes: int) -> np.ndarray:
    """The affine of a grid that starts ``planes`` voxels further along the last axis."""
    shifted = np.array(affine, dtype=np.float64, copy=True)
    shifted[:3, 3] += shifted[:3, 2] * planes
    return shifted


@torch.no_grad()
def stream_sampled_grid(
    inferer: Any,
    network: nn.Module,
    latent: torch.Tensor,
    frame: CoordinateMapping,
    affine: Any,
    spatial_shape: Sequence[int],
    seg_path: str | os.PathLike | None,
    recon_path: str | os.PathLike | None = None,
    slab_points: int | None = None,
    blend: ProbabilityVolume | None = None,
) -> None:
    """Sample one case's labels (uint8) and reconstruction (float32) on the grid ``(affine, spatial_shape)``
    and write them to NIfTI files, a slab at a time.

    ``inferer`` is a :class:`~nisf_monai.inferers.LatentOptimisationInferer` (its ``sample`` evaluates each slab
    in chunks of ``inferer.chunk_size`` points), ``latent`` the case's fitted code ``(1, L)`` and ``frame`` the
    :class:`~nisf_monai.transforms.CoordinateMapping` of the image it was fitted to. Slabs hold ``slab_points``
    voxels (default: the inferer's chunk size), so peak memory does not grow with the output grid. ``blend``: the
    case's localiser probabilities mixed into the labels (``inferer.blend_source``), as ``fit_and_sample`` mixes them.
    """
    if seg_path is None and recon_path is None:
        raise ValueError("nothing to write: give seg_path and/or recon_path.")
    if latent.dim() != 2 or latent.shape[0] != 1:
        raise ValueError(f"stream_sampled_grid writes one case: latent must be (1, L), got {tuple(latent.shape)}.")
    affine = np.asarray(affine, dtype=np.float64)
    shape = [int(s) for s in spatial_shape]
    writers = []
    if seg_path is not None:
        writers.append(("seg", NiftiSlabWriter(seg_path, affine, shape, np.uint8)))
    if recon_path is not None:
        writers.append(("recon", NiftiSlabWriter(recon_path, affine, shape, np.float32)))
    entered = []
    try:
        for _, writer in writers:
            entered.append(writer.__enter__())
        for start, stop in slab_bounds(shape, slab_points or inferer.chunk_size):
            labels, recon = inferer.sample(
                network, latent, frame, _shifted(affine, start), [shape[0], shape[1], stop - start], blend=blend
            )
            for (kind, writer), _ in zip(writers, entered):
                writer.write((labels if kind == "seg" else recon)[0, 0])
    except BaseException as error:
        for writer in entered:
            writer.__exit__(type(error), error, None)
        raise
    for writer in entered:
        writer.__exit__(None, None, None)
