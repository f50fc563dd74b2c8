"""Quality control of every fitted case: a predicted Dice and a verdict from signals that follow failure.

An auto-decoder always returns *some* segmentation: a code fitted to an image the network cannot explain still
decodes to labels. What gives a failure away, measured on ACDC frames clean and degraded on purpose
(``benchmarks/qc_calibration.py``), is mostly that NISF's own labels and the heart localiser's, reached by
different routes, disagree, and that the shape stops being a heart's (a cavity not ringed by myocardium, a missing
structure). :func:`case_quality` computes these signals on the image's voxel grid, so describing the same voxels
with another affine leaves them unchanged; :class:`QualityControlHandler` turns them into a predicted Dice
(:class:`~nisf_monai.quality.QualityScore`, shipped in ``models/qc_reference.json``), writes ``<case>_qc.json``
and warns about the cases to check.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import FolderLayout, MetaTensor
from monai.utils import CommonKeys as Keys

from nisf_monai.distributed import is_distributed
from nisf_monai.geometry.measures import write_csv
from nisf_monai.inferers.cases import code_groups
from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer
from nisf_monai.io import atomic_write_json
from nisf_monai.quality import QualityScore, class_agreement, shape_signals
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


def _localiser_labels(inferer: LatentOptimisationInferer, case: MetaTensor) -> np.ndarray | None:
    """The heart localiser's labels of ``case`` on its own grid, or None without a localiser."""
    localiser = inferer.localiser
    if localiser is None:
        return None
    return localiser.probabilities(case[0]).argmax(0).numpy().astype(np.uint8)


def label_signals(code_labels: np.ndarray, localiser_labels: np.ndarray | None, classes: Sequence[int]) -> dict:
    """The ground-truth-free signals of one case's labels ``(X, Y, Z)``: the shape checks of NISF's own labels
    and, with the localiser's, their agreement per class, their mean and minimum, and the localiser's shape checks."""
    signals: dict[str, float] = dict(shape_signals(code_labels))
    if localiser_labels is not None:
        agreement = class_agreement(code_labels, localiser_labels, classes)
        signals.update({f"agreement_{c}": value for c, value in agreement.items()})
        signals["agreement_mean"] = float(np.mean(list(agreement.values())))
        signals["agreement_min"] = float(min(agreement.values()))
        signals.update({f"localiser_{k}": v for k, v in shape_signals(localiser_labels).items()})
    return signals


@torch.no_grad()
def case_quality(
    inferer: LatentOptimisationInferer,
    network: torch.nn.Module,
    image: MetaTensor,
    latent: torch.Tensor,
    label_names: Sequence[str],
    training_codes: torch.Tensor | None = None,
    sampled: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """QC numbers of one fitted case ``image (1, X, Y, Z)`` (intensities as fitted, in [0, 1]) on its own grid:
    mean absolute reconstruction error (everywhere, and over the voxels either NISF or the localiser calls heart),
    the code's norm and distance to the nearest training code, the volume of each structure in ml, and the
    label signals of :func:`label_signals` (all under ``signals``, flat, for :class:`QualityScore`). ``sampled``:
    NISF's own labels and reconstruction ``(X, Y, Z)`` on the image's grid when inference has already read
    them (saves sampling the grid again)."""
    case = image[None] if image.dim() == 4 else image
    mapping = inferer.frame_of(case)
    device = next(network.parameters()).device
    if sampled is None:
        code = latent.reshape(1, -1).to(device)
        labels, recon = inferer.sample(network, code, mapping, mapping.affine, case.shape[2:])
        sampled = (labels[0, 0], recon[0, 0])
    labels, recon = (torch.as_tensor(t).reshape(case.shape[2:]).cpu() for t in sampled)
    absolute = (recon.float() - case.as_tensor()[0, 0].float().cpu().clamp(0, 1)).abs()
    code_labels = labels.numpy().astype(np.uint8)
    localiser_labels = _localiser_labels(inferer, case)
    heart = code_labels > 0 if localiser_labels is None else (code_labels > 0) | (localiser_labels > 0)
    heart_error = float(absolute[torch.as_tensor(heart)].mean()) if heart.any() else float(absolute.mean())
    voxel_ml = voxel_volume_ml(mapping.affine)
    counts = torch.bincount(labels.reshape(-1).long(), minlength=len(label_names))
    pose = pose_of(case)
    frame = None
    if pose is not None:  # where the heart frame was put (found from intensity at inference, or given)
        origin, axes, scale = split_pose(pose)
        frame = {"origin_mm": origin.tolist(), "axes": axes.tolist(), "scale": scale}
    quality = {
        "heart_frame": frame,
        "reconstruction_error": float(absolute.mean()),
        "heart_reconstruction_error": heart_error,
        "code_norm": float(latent.float().norm()),
        "nearest_training_code_distance": _nearest_distance(latent, training_codes),
        "volume_ml": {name: float(counts[c]) * voxel_ml for c, name in enumerate(label_names) if c > 0},
    }
    signals = label_signals(code_labels, localiser_labels, range(1, len(label_names)))
    signals.update({k: v for k, v in quality.items() if isinstance(v, float)})
    signals.update({f"{name}_ml": v for name, v in quality["volume_ml"].items()})
    quality["signals"] = signals
    return quality


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
    """Writes ``<case>_qc.json`` for every case an evaluator fitted, with a verdict (``pass`` or ``check``), and
    warns about a case to check: its predicted Dice (the reference's :class:`~nisf_monai.quality.QualityScore`)
    below the score's limit, no left ventricle found, or a code farther from the training codes than the
    reference cases' farthest (times ``tolerance``; the one signal that caught images of another sequence). The
    reconstruction error is recorded but does not warn: on ACDC it did not follow the segmentation's quality.
    At the end of a run, ``qc_summary.csv`` lists every case in the output folder.

    Args:
        inferer: the inferer that fitted the codes.
        network: the trained network.
        output_dir: folder of the JSON files (the bundle's outputs).
        label_names: class names, background first.
        reference_path: ``qc_reference.json`` (from :func:`qc_reference`, its ``score`` from
            ``benchmarks/qc_calibration.py``); missing: only the LV check warns.
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
        score = self.reference.get("score")
        self.score = QualityScore.from_dict(score) if score else None
        self._started = time.perf_counter()
        codes = self.reference.get("training_codes")
        self.training_codes = torch.as_tensor(codes, dtype=torch.float32) if codes else None
        self._data_index = 0

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary_when_alone)

    @staticmethod
    def _sampled(output: dict[str, Any], image: MetaTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """NISF's own labels and the reconstruction from the inference output when they lie on the image's grid."""
        own, recon = output.get("code_labels"), output.get("recon")
        if own is None or recon is None or tuple(recon.shape[-3:]) != tuple(image.shape[-3:]):
            return None
        if isinstance(recon, MetaTensor) and not torch.allclose(
            torch.as_tensor(recon.affine, dtype=torch.float64), torch.as_tensor(image.affine, dtype=torch.float64)
        ):
            return None
        return own, recon.reshape(image.shape[-3:])

    def _summary_when_alone(self, engine: Engine | None = None) -> None:
        """The summary at the end of a single-process run; under torchrun ``run_shard`` writes it on rank 0 once
        every rank has finished (:mod:`nisf_monai.engines.sharded_run`)."""
        if not is_distributed():
            self.write_summary()

    def _start(self, engine: Engine | None = None) -> None:
        self._started = time.perf_counter()

    def _limit(self, key: str) -> float | None:
        values = [v for v in self.reference.get(key, []) if v is not None]
        return max(values) * self.tolerance if values else None

    def warnings(self, quality: dict[str, Any]) -> list[str]:
        """Why a case looks out of distribution (empty when it does not)."""
        found = []
        predicted = quality.get("predicted_dice")
        if self.score is not None and self.score.flags(predicted):
            found.append(f"predicted Dice {predicted:.2f}, below the limit {self.score.limit:.2f}")
        if quality["volume_ml"].get(self.lv_name, 0.0) < self.min_lv_ml:
            found.append(
                f"no left ventricle found (LV blood pool {quality['volume_ml'].get(self.lv_name, 0.0):.1f} ml)"
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
        seconds = (time.perf_counter() - self._started) / max(len(outputs or []), 1)  # the iteration's share
        for output in outputs or []:
            image = output[Keys.IMAGE]
            quality = case_quality(
                self.inferer,
                self.network,
                image,
                output["latent"],
                self.label_names,
                self.training_codes,
                self._sampled(output, image),
            )
            quality["predicted_dice"] = self.score.predict(quality["signals"]) if self.score is not None else None
            quality["warnings"] = self.warnings(quality)
            quality["verdict"] = "check" if quality["warnings"] else "pass"
            quality["seconds"] = seconds
            layout = FolderLayout(self.output_dir, postfix="qc", extension=".json", parent=False, makedirs=True)
            path = layout.filename(**self.output_name_formatter(dict(image.meta), self))
            atomic_write_json(path, quality)
            self._data_index += 1
            name = os.path.basename(str(image.meta.get("filename_or_obj", path)))
            if quality["warnings"]:
                logger.warning("QC %s: %s; check this case's segmentation", name, "; ".join(quality["warnings"]))

    @staticmethod
    def summary_row(case: str, quality: dict[str, Any]) -> dict[str, Any]:
        """One cohort-summary row of a case's ``_qc.json`` content."""
        predicted = quality.get("predicted_dice")
        row = {
            "case": case,
            "predicted_dice": "" if predicted is None else round(float(predicted), 4),
            "verdict": quality.get("verdict", "check" if quality.get("warnings") else "pass"),
        }
        row.update({f"{name}_ml": round(float(v), 2) for name, v in quality.get("volume_ml", {}).items()})
        seconds = quality.get("seconds")
        row["seconds"] = "" if seconds is None else round(float(seconds), 1)
        row["warnings"] = "; ".join(quality.get("warnings", []))
        return row

    def write_summary(self, engine: Engine | None = None) -> str | None:
        """``qc_summary.csv``: one row per ``*_qc.json`` in the output folder (case, predicted Dice, verdict,
        volumes, seconds, warnings), so it covers the cases of earlier runs and of every process of a distributed
        run."""
        rows = []
        for path in sorted(Path(self.output_dir).glob("*_qc.json")):
            with open(path) as f:
                rows.append(self.summary_row(path.name[: -len("_qc.json")], json.load(f)))
        if not rows:
            return None
        summary = write_csv(os.path.join(self.output_dir, "qc_summary.csv"), rows)
        flagged = [row["case"] for row in rows if row["verdict"] == "check"]
        logger.info("QC: %d of %d cases flagged for a look; summary in %s", len(flagged), len(rows), summary)
        return summary
