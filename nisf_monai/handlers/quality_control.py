"""Quality control of every fitted case: what the fit reached, and a warning when a case looks unlike training.

An auto-decoder always returns *some* segmentation: a code fitted to an image the network cannot explain
(another anatomy, another contrast, a heart outside the searched region) still decodes to labels. The
evidence that it went wrong is in the fit itself: the image is reconstructed badly, the code lands far from
every training code, or the left ventricle comes out empty. :class:`QualityControlHandler` writes these
numbers to ``<case>_qc.json`` beside the outputs and logs a warning when they fall outside what cases fitted
the same way reached (the reference, :func:`qc_reference`, shipped as ``models/qc_reference.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import FolderLayout, MetaTensor
from monai.utils import CommonKeys as Keys

from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer, code_groups
from nisf_monai.io import atomic_write_json
from nisf_monai.spatial import voxel_volume_ml
from nisf_monai.transforms.coordinates import pose_of
from nisf_monai.transforms.heart_frame import split_pose
from nisf_monai.transforms.loading import frame_name_formatter

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["QualityControlHandler", "case_quality", "qc_reference"]

logger = logging.getLogger("nisf_monai")


def _nearest_distance(code: torch.Tensor, codes: torch.Tensor | None) -> float | None:
    if codes is None or len(codes) == 0:
        return None
    return float(torch.cdist(code.reshape(1, -1).float().cpu(), codes.float()).min())


@torch.no_grad()
def case_quality(
    inferer: LatentOptimisationInferer,
    network: torch.nn.Module,
    image: MetaTensor,
    latent: torch.Tensor,
    label_names: Sequence[str],
    training_codes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """QC numbers of one fitted case ``image (1, X, Y, Z)`` (intensities as fitted, in [0, 1]) on its own grid:
    mean absolute reconstruction error, the code's norm and distance to the nearest training code, and the
    volume of each structure in ml."""
    case = image[None] if image.dim() == 4 else image
    mapping = inferer.frame_of(case)
    device = next(network.parameters()).device
    labels, recon = inferer.sample(network, latent.reshape(1, -1).to(device), mapping, mapping.affine, case.shape[2:])
    error = float((recon[0, 0] - case.as_tensor()[0, 0].float().cpu().clamp(0, 1)).abs().mean())
    voxel_ml = voxel_volume_ml(mapping.affine)
    counts = torch.bincount(labels.reshape(-1).long(), minlength=len(label_names))
    pose = pose_of(case)
    heart = None
    if pose is not None:  # where the heart frame was put (found from intensity at inference, or given)
        origin, axes, scale = split_pose(pose)
        heart = {"origin_mm": origin.tolist(), "axes": axes.tolist(), "scale": scale}
    return {
        "heart_frame": heart,
        "reconstruction_error": error,
        "code_norm": float(latent.float().norm()),
        "nearest_training_code_distance": _nearest_distance(latent, training_codes),
        "volume_ml": {name: float(counts[c]) * voxel_ml for c, name in enumerate(label_names) if c > 0},
    }


def qc_reference(
    inferer: LatentOptimisationInferer,
    network: torch.nn.Module,
    images: Sequence[MetaTensor],
    training_codes: torch.Tensor,
    label_names: Sequence[str],
    own_rows: Sequence[int] | None = None,
    groups: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The reference QC compares with: the training codes, and the reconstruction errors and code distances of
    ``images`` fitted as inference fits them. ``images`` are best cases the network was not trained on (e.g. the
    validation cases); when they are training cases, ``own_rows`` gives each one's row of ``training_codes``,
    which its distance leaves out: a refitted training case would otherwise be measured against its own code,
    closer than any new case can be, and QC would warn about ordinary new cases. ``groups`` (the cine model:
    each image's subject) fits the frames of a subject together, with one code, as inference does."""
    if own_rows is not None and len(own_rows) != len(images):
        raise ValueError(f"own_rows needs one row per image, got {len(own_rows)} for {len(images)} images.")
    cases = [image[None] if image.dim() == 4 else image for image in images]
    latents: list[torch.Tensor] = [torch.empty(0)] * len(cases)
    for unit in code_groups(groups, len(cases)):
        fitted = inferer.fit([cases[b] for b in unit], network, groups=[0] * len(unit))
        for b, latent in zip(unit, fitted):
            latents[b] = latent
    errors, distances = [], []
    for i, (case, latent) in enumerate(zip(cases, latents)):
        others = training_codes
        if own_rows is not None:
            others = torch.cat([training_codes[: own_rows[i]], training_codes[own_rows[i] + 1 :]])
        quality = case_quality(inferer, network, case, latent, label_names, others)
        errors.append(quality["reconstruction_error"])
        distances.append(quality["nearest_training_code_distance"])
    return {
        "reconstruction_error": errors,
        "nearest_training_code_distance": distances,
        "training_codes": training_codes.float().cpu().numpy().round(5).tolist(),
    }


class QualityControlHandler:
    """Writes ``<case>_qc.json`` for every case an evaluator fitted, and warns about cases that look out of
    distribution: no left ventricle found, or a reconstruction error or code distance beyond the largest that
    the reference cases reached (times ``tolerance``).

    Args:
        inferer: the inferer that fitted the codes.
        network: the trained network.
        output_dir: folder of the JSON files (the bundle's outputs).
        label_names: class names, background first.
        reference_path: ``qc_reference.json`` (from :func:`qc_reference`); missing: only the LV check warns.
        lv_class: index of the LV blood pool among ``label_names``.
        min_lv_ml: an LV smaller than this counts as not found.
        tolerance: how far beyond the reference's largest value a case may go before the warning.
        output_name_formatter: as for ``SaveImage``.
    """

    def __init__(
        self,
        inferer: LatentOptimisationInferer,
        network: torch.nn.Module,
        output_dir: str | os.PathLike,
        label_names: Sequence[str],
        reference_path: str | os.PathLike | None = None,
        lv_class: int = 1,
        min_lv_ml: float = 5.0,
        tolerance: float = 1.25,
        output_name_formatter: Callable[[dict, Any], dict] = frame_name_formatter,
    ) -> None:
        self.inferer, self.network = inferer, network
        self.output_dir = output_dir
        self.label_names = list(label_names)
        self.lv_name = self.label_names[lv_class]
        self.min_lv_ml, self.tolerance = float(min_lv_ml), float(tolerance)
        self.output_name_formatter = output_name_formatter
        self.reference: dict[str, Any] = {}
        if reference_path is not None and os.path.isfile(reference_path):
            with open(reference_path) as f:
                self.reference = json.load(f)
        codes = self.reference.get("training_codes")
        self.training_codes = torch.as_tensor(codes, dtype=torch.float32) if codes else None
        self._data_index = 0

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _limit(self, key: str) -> float | None:
        values = [v for v in self.reference.get(key, []) if v is not None]
        return max(values) * self.tolerance if values else None

    def warnings(self, quality: dict[str, Any]) -> list[str]:
        """Why a case looks out of distribution (empty when it does not)."""
        found = []
        if quality["volume_ml"].get(self.lv_name, 0.0) < self.min_lv_ml:
            found.append(
                f"no left ventricle found (LV blood pool {quality['volume_ml'].get(self.lv_name, 0.0):.1f} ml)"
            )
        limit = self._limit("reconstruction_error")
        if limit is not None and quality["reconstruction_error"] > limit:
            found.append(
                f"reconstruction error {quality['reconstruction_error']:.4f} beyond what reference cases reach "
                f"({limit / self.tolerance:.4f} at most)"
            )
        limit = self._limit("nearest_training_code_distance")
        distance = quality["nearest_training_code_distance"]
        if limit is not None and distance is not None and distance > limit:
            found.append(
                f"code {distance:.3f} from the nearest training code, beyond the reference cases' "
                f"{limit / self.tolerance:.3f}"
            )
        return found

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output
        if isinstance(outputs, dict):  # a collated batch: split it into cases
            outputs = [
                {Keys.IMAGE: outputs[Keys.IMAGE][b], "latent": outputs["latent"][b]}
                for b in range(len(outputs["latent"]))
            ]
        for output in outputs or []:
            image = output[Keys.IMAGE]
            quality = case_quality(
                self.inferer, self.network, image, output["latent"], self.label_names, self.training_codes
            )
            quality["warnings"] = self.warnings(quality)
            layout = FolderLayout(self.output_dir, postfix="qc", extension=".json", parent=False, makedirs=True)
            path = layout.filename(**self.output_name_formatter(dict(image.meta), self))
            atomic_write_json(path, quality)
            self._data_index += 1
            name = os.path.basename(str(image.meta.get("filename_or_obj", path)))
            for warning in quality["warnings"]:
                logger.warning("QC %s: %s; check this case's segmentation", name, warning)
