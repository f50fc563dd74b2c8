"""Ignite handler that writes each evaluated case's segmentation at any spacing without holding it in memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
from monai.data import FolderLayout, MetaTensor
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import CommonKeys as Keys

from nisf_monai.inferers.cases import spacing_triple, target_grid
from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer
from nisf_monai.inferers.streaming import NiftiSlabWriter, stream_sampled_grid
from nisf_monai.transforms.loading import frame_name_formatter

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["StreamingSegmentationSaver"]

logger = logging.getLogger("nisf_monai")


class StreamingSegmentationSaver:
    """Writes ``<case>_seg.nii.gz`` (uint8 labels) and ``<case>_recon.nii.gz`` (intensity) for every case of
    an iteration of a :class:`~nisf_monai.engines.LatentOptimisationEvaluator`, sampled from the case's fitted
    code on the grid at ``target_spacing`` over the input's extent (the grid MONAI ``Spacing`` would give).

    It does what ``SaveImaged`` on ``pred``/``recon`` does, with the same file names and affines, but samples
    and writes one slab at a time, so memory stays bounded by ``slab_points`` at any output spacing (a
    0.5 mm volume of 10^8 voxels costs a few MB instead of GBs). The evaluator's own outputs are not used
    beyond ``image`` (its affine and file name) and ``latent``.

    Args:
        inferer: the inferer that fitted the codes (its coordinate settings and chunk size are used).
        network: the trained network.
        output_dir: folder of the files.
        target_spacing: output spacing in mm (three values or one); None: the input grid.
        output_postfixes: postfixes of the label and the reconstruction files; None skips that file.
        output_ext: file extension (``.nii.gz`` or ``.nii``).
        slab_points: voxels per written slab (default: the inferer's ``chunk_size``).
        output_name_formatter: as for ``SaveImage`` (default names cine frames ``_tNN``).
        mask_key: key of a case's fit mask in the evaluator's output; the localiser's probabilities mixed into the
            labels (the inferer's ``output_blend``) leave out the voxels it hides, as ``fit_and_sample`` does.
        largest_component: labels of which only the largest connected component is kept (MONAI
            ``KeepLargestConnectedComponent``), as ``inference.json``'s ``keep_largest_component`` does for outputs held
            in memory. Components need the whole volume, so the written labels are read back once (one byte a voxel,
            and the component map) and rewritten; the probabilities are never held. None or empty: written as sampled.
    """

    def __init__(
        self,
        inferer: LatentOptimisationInferer,
        network: torch.nn.Module,
        output_dir: str | os.PathLike,
        target_spacing: Sequence[float] | float | None = None,
        output_postfixes: tuple[str | None, str | None] = ("seg", "recon"),
        output_ext: str = ".nii.gz",
        slab_points: int | None = None,
        output_name_formatter: Callable[[dict, Any], dict] = frame_name_formatter,
        mask_key: str = "mask",
        largest_component: Sequence[int] | None = None,
    ) -> None:
        self.inferer = inferer
        self.network = network
        # checked now, not after the first case's fit
        self.target_spacing = None if target_spacing is None else spacing_triple(target_spacing).tolist()
        self.seg_postfix, self.recon_postfix = output_postfixes
        self.output_dir = output_dir
        self.output_ext = output_ext
        self.slab_points = slab_points
        self.output_name_formatter = output_name_formatter
        self.mask_key = mask_key
        labels = [int(label) for label in largest_component or ()]
        self.cleaner = KeepLargestConnectedComponent(applied_labels=labels) if labels else None
        self._data_index = 0  # what SaveImage's default formatter names unnamed inputs by

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _path(self, meta: dict, postfix: str | None) -> str | None:
        if postfix is None:
            return None
        layout = FolderLayout(self.output_dir, postfix=postfix, extension=self.output_ext, parent=False, makedirs=True)
        return layout.filename(**self.output_name_formatter(meta, self))

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output
        if isinstance(outputs, dict):  # a collated batch: split it into cases
            images, latents, masks = outputs[Keys.IMAGE], outputs["latent"], outputs.get(self.mask_key)
            outputs = [
                {Keys.IMAGE: images[b], "latent": latents[b], self.mask_key: None if masks is None else masks[b]}
                for b in range(len(latents))
            ]
        for output in outputs or []:
            image = output[Keys.IMAGE]
            if not isinstance(image, MetaTensor):
                raise TypeError(
                    "StreamingSegmentationSaver needs the evaluator's `image` as a MetaTensor "
                    "(its affine places the output)."
                )
            case = image[None] if image.dim() == 4 else image
            mapping = self.inferer.frame_of(case)
            affine, shape = target_grid(mapping.affine, case.shape[2:], self.target_spacing)
            meta = dict(image.meta)
            seg_path, recon_path = self._path(meta, self.seg_postfix), self._path(meta, self.recon_postfix)
            latent = output["latent"].reshape(1, -1).to(next(self.network.parameters()).device)
            mask = output.get(self.mask_key)
            blend = self.inferer.blend_source(case, None if mask is None else mask.reshape(case.shape[2:]) != 0)
            stream_sampled_grid(
                self.inferer,
                self.network,
                latent,
                mapping,
                affine,
                shape,
                seg_path,
                recon_path,
                self.slab_points,
                blend,
            )
            if seg_path is not None and self.cleaner is not None:
                self._keep_largest_components(seg_path)
            logger.info(
                "wrote %s (%s voxels at %s mm)",
                seg_path or recon_path,
                "x".join(map(str, shape)),
                self.target_spacing or "input",
            )
            self._data_index += 1

    def _keep_largest_components(self, path: str) -> None:
        """Rewrite the labels at ``path`` with only the largest component of each of the cleaner's labels."""
        written = nib.load(path)
        kept = self.cleaner(torch.from_numpy(np.asarray(written.dataobj, dtype=np.uint8))[None])[0]
        with NiftiSlabWriter(path, written.affine, written.shape, np.uint8) as writer:  # all or nothing, as streamed
            writer.write(kept)
