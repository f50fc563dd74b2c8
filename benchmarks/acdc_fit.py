"""Scoring of ``acdc.py evaluate`` (``acdc_levers.py``): fit codes to ACDC frames with a frozen network and record
Dice on every voxel at several latent steps, for four objectives.

- ``intensity``: the bundle's test-time fit (``LatentOptimisationInferer``), what a user gets;
- ``segmentation``: codes fitted to the labels themselves (cross-entropy + Dice on random voxels), the
  ceiling of what the latent space can express for these cases;
- ``trained``: the training codes the latent table holds (training frames only), the Dice the training
  reached; compared with ``intensity`` on the same frames it says whether intensity finds those codes;
- ``localiser``: the heart locator's localiser alone (its coarse probabilities brought back to the image grid,
  argmax), the Dice of the CNN that seeds the pose and may guide the fit (``localiser_weight``).
"""

from __future__ import annotations

import math
from functools import reduce
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from acdc_common import CONFIGS, dice_of, fit_overrides
from monai.bundle import ConfigParser
from monai.losses import DiceLoss
from monai.transforms import KeepLargestConnectedComponent

from nisf_monai.data import case_ids
from nisf_monai.networks import LatentTable
from nisf_monai.transforms import POSE_KEY, HeartPosed, heart_pose, phase_of, pose_of, split_pose


class _Recorder:
    """Dice of every case on its whole grid at the chosen steps (a monitor for ``inferer.fit``).

    ``blends``: weights ``w`` of the localiser's probabilities in a mixture ``(1 - w) NISF + w localiser`` on the
    image grid, each scored beside the plain NISF labels (``self.blended[w][step]``). ``largest_component``: also
    score every blend after keeping each structure's largest connected component (``self.cleaned[w][step]``)."""

    def __init__(
        self, inferer, network, images, labels, steps, blends: tuple[float, ...] = (), largest_component: bool = False
    ) -> None:
        self.inferer, self.network, self.images, self.labels = inferer, network, images, labels
        self.steps = set(steps)
        self.dice: dict[int, list[np.ndarray]] = {}
        self.blends = tuple(blends)
        self.blended: dict[float, dict[int, list[np.ndarray]]] = {w: {} for w in self.blends}
        self.cleaner = KeepLargestConnectedComponent(applied_labels=(1, 2, 3)) if largest_component else None
        self.cleaned: dict[float, dict[int, list[np.ndarray]]] = {w: {} for w in self.blends} if self.cleaner else {}
        self._guides: dict[int, torch.Tensor] = {}

    def _guide(self, b: int) -> torch.Tensor:
        if b not in self._guides:
            self._guides[b] = self.inferer.heart_locator.localiser.probabilities(self.images[b])
        return self._guides[b]

    def __call__(self, step: int, latent: torch.Tensor) -> None:
        if step not in self.steps or step in self.dice:
            return
        scores = []
        for b, (image, label) in enumerate(zip(self.images, self.labels)):
            frame = self.inferer.frame_of(image[None])
            probs, _ = self.inferer.sample(
                self.network, latent[b : b + 1], frame, frame.affine, image.shape[1:], probabilities=True
            )
            scores.append(dice_of(probs[0].argmax(0), label[0]))
            for w in self.blends:
                mixed = (1.0 - w) * probs[0] + w * self._guide(b)
                self.blended[w].setdefault(step, []).append(dice_of(mixed.argmax(0), label[0]))
                if self.cleaner is not None:
                    kept = self.cleaner(mixed.argmax(0, keepdim=True))[0]
                    self.cleaned[w].setdefault(step, []).append(dice_of(kept, label[0]))
        self.dice[step] = scores


def _fit_to_labels(inferer, network, images, labels, steps, recorder, num_points: int = 4096) -> None:
    """Codes fitted to the labels (frozen network): CE + Dice on random voxels, Adam at the inferer's rate."""
    dice_loss = DiceLoss(to_onehot_y=True, softmax=True)
    for b, (image, label) in enumerate(zip(images, labels)):
        frame = inferer.frame_of(image[None])
        points = frame.grid(frame.affine, image.shape[1:]).T
        truth = label.reshape(1, -1).long()
        generator = torch.Generator().manual_seed(inferer.seed)
        code = (torch.randn(1, network.latent_dim, generator=generator) * inferer.init_std).requires_grad_(True)
        optimizer = torch.optim.Adam([code], lr=inferer.learning_rate)
        for step in range(max(steps) + 1):
            if step in steps:
                with torch.no_grad():
                    pred, _ = inferer.sample(network, code.detach(), frame, frame.affine, image.shape[1:])
                recorder.dice.setdefault(step, [None] * len(images))[b] = dice_of(pred[0, 0], label[0])
            if step == max(steps):
                break
            index = torch.randint(points.shape[1], (num_points,), generator=generator)
            seg, _ = network.forward_heads(points[None, :, index], code)
            target = truth[None, :, index]
            loss = F.cross_entropy(seg, target[:, 0]) + dice_loss(seg, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def evaluate_cases(
    checkpoint: Path,
    cases: list[dict],
    datalist: str,
    steps: list[int],
    config_overrides: dict,
    inferer_overrides: dict,
    objective: str = "intensity",
    pose: str = "label",
    blends: tuple[float, ...] = (),
    largest_component: bool = False,
) -> dict:
    """Dice per case and step of ``cases`` (datalist entries) for one objective; see the module docstring.

    ``pose``: with a heart-frame model, 'label' takes each case's pose from its labels (an oracle: the upper
    bound of pose estimation), 'estimate' leaves it to the inferer. ``blends``: see ``_Recorder`` (intensity
    objective); ``largest_component``: score each blend also after keeping the largest component per structure."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"datalist": datalist, **config_overrides})
    for key, value in fit_overrides({"num_steps": max(steps), "log_every": 0, **inferer_overrides}).items():
        parser[f"validate#inferer#{key}"] = value
    network = parser.get_parsed_content("network_def")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    network.load_state_dict(saved["network"])
    network.eval()
    inferer = parser.get_parsed_content("validate#inferer")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    # what the run was trained with: its overrides over train.json's own defaults (heart_frame is on by default now)
    heart_frame = bool(parser.get_parsed_content("heart_frame"))
    cine = bool(parser.get_parsed_content("cine_model"))
    reference_ml = parser.get_parsed_content("heart_reference_volume_ml")
    images, labels, names = [], [], []
    for case in cases:
        d = preprocessing(dict(case))
        if heart_frame and pose == "label":
            d = HeartPosed(["image", "label"], reference_volume_ml=reference_ml)(d)
        images.append(d["image"])
        labels.append(d["label"])
        names.append(case_ids([case])[0])
    groups = [str(case["subject"]) for case in cases] if cine else None
    if cine and heart_frame and pose == "label":
        _share_reference_poses(images, groups)
    recorder = _Recorder(
        inferer, network, images, labels, steps, blends if objective == "intensity" else (), largest_component
    )
    if objective == "intensity":
        every = reduce(math.gcd, [s for s in steps if s > 0], 0) or 1
        inferer.fit(images, network, monitor=recorder, monitor_every=every, groups=groups)
    elif objective == "segmentation":
        _fit_to_labels(inferer, network, images, labels, steps, recorder)
    elif objective == "trained":
        keys = groups if cine else names
        table = LatentTable(keys, network.latent_dim)
        table.load_state_dict(saved["latents"])
        with torch.no_grad():
            recorder.steps = {0}
            recorder(0, table(keys))
        steps = [0]
    elif objective == "localiser":
        localiser = inferer.localiser
        if localiser is None:
            raise ValueError("the localiser objective needs --localiser weights.")
        recorder.steps, steps = {0}, [0]
        recorder.dice[0] = [
            dice_of(localiser.probabilities(image).argmax(0), label[0]) for image, label in zip(images, labels)
        ]
    else:
        raise ValueError(f"unknown objective {objective!r}")
    located = heart_frame and pose == "estimate" and objective != "localiser"
    pose_errors = _pose_errors(images, labels) if located else None
    return {
        "objective": objective,
        "pose": pose if heart_frame else "volume centre",
        "cases": names,
        "steps": steps,
        **_summary({s: recorder.dice[s] for s in steps}),
        "inferer": {k: getattr(inferer, k) for k in ("learning_rate", "num_points", "init_std", "latent_weight")},
        "pose_errors": pose_errors,
        "blends": {str(w): _summary({s: recorder.blended[w][s] for s in steps}) for w in recorder.blends},
        "blends_largest_component": {
            str(w): _summary({s: recorder.cleaned[w][s] for s in steps}) for w in recorder.cleaned
        },
    }


def _share_reference_poses(images: list, groups: list[str]) -> None:
    """The cine model's oracle pose: each subject's frames take the labels' pose of its frame earliest in the cycle,
    as training placed them (``with_subject_poses``)."""
    for subject in dict.fromkeys(groups):
        members = [b for b, g in enumerate(groups) if g == subject]
        reference = min(members, key=lambda b: (phase_of(images[b]) or 0.0, b))
        for b in members:
            images[b].meta[POSE_KEY] = pose_of(images[reference]).clone()


def _summary(dice_by_step: dict[int, list[np.ndarray]]) -> dict:
    """Mean and per-class Dice at each step, and the per-case values."""
    dice = {s: np.asarray(d, dtype=float) for s, d in dice_by_step.items()}
    with np.errstate(invalid="ignore"):
        return {
            "mean_dice": [float(np.nanmean(np.nanmean(d, axis=1))) for d in dice.values()],
            "class_dice": [np.nanmean(d, axis=0).tolist() for d in dice.values()],
            "per_case": {str(s): d.tolist() for s, d in dice.items()},
        }


def pose_error(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """How far a heart pose (4 x 4, world mm -> heart mm) lands from another: the distance between their origins
    (mm) and the angle between their x axes, the LV -> RV direction (degrees). Scales are not compared."""
    (found_origin, found_axes, _), (true_origin, true_axes, _) = split_pose(found), split_pose(truth)
    cosine = float(torch.clip(found_axes[0] @ true_axes[0], -1.0, 1.0))
    return float(torch.linalg.norm(found_origin - true_origin)), float(np.degrees(np.arccos(cosine)))


def scale_error(found: np.ndarray, truth: np.ndarray) -> float:
    """How far a pose's scale lands from another's, in per cent of the latter (any reference volume: the ratio
    of scales is the cube root of the inverse ratio of LV volumes)."""
    return abs(split_pose(found)[2] / split_pose(truth)[2] - 1.0) * 100.0


def _pose_errors(images: list, labels: list) -> dict:
    """Estimated heart poses against the labels' (origin distance in mm, in-plane angle in degrees), per case."""
    origin_mm, angle_deg = [], []
    for image, label in zip(images, labels):
        truth = heart_pose(label.as_tensor(), label.affine).numpy()
        origin, angle = pose_error(pose_of(image).numpy(), truth)
        origin_mm.append(origin)
        angle_deg.append(angle)
    return {
        "origin_mm": origin_mm,
        "angle_deg": angle_deg,
        "median_origin_mm": float(np.median(origin_mm)),
        "median_angle_deg": float(np.median(angle_deg)),
    }
