"""Finding a new image's heart frame from its intensities alone, with a network trained in that frame.

A network trained on heart-frame coordinates (:mod:`nisf_monai.transforms.heart_frame`) reconstructs an image
well only where its frame sits on the heart. Without labels, the pose is searched for in two stages:

1. **Grid search**: candidate origins on a grid in the slice plane through the volume centre (within
   ``radius_mm``, every ``step_mm``) times ``num_angles`` in-plane rotations; each is scored by the
   population-average reconstruction (the zero code) on a fixed set of voxels, weighted around the candidate
   heart (Gaussian of ``sigma_mm`` in the slice plane). No gradient, one batched pass per group.
With a ``localiser`` (:class:`~nisf_monai.inferers.SliceLocaliser`), the pose of its coarse labels replaces the
grid search as the single start (the grid search remains the fallback when it finds no left ventricle).

2. **Refinement**: the ``num_starts`` best candidates each get a code and a pose correction (a shift along
   the heart axes, the slice normal included, and an in-plane angle) fitted jointly by Adam for
   ``refine_steps`` on the same weighted loss; the start with the lowest final loss wins.

All positions are world millimetres; the result is the 4 x 4 map from world mm to the heart frame. A cine network
(``coord_dim=5``) is read at the image's cardiac phase throughout. The search
runs through a :func:`frozen_view` of the network and leaves the network object itself untouched.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from nisf_monai.inferers.slice_localiser import SliceLocaliser
from nisf_monai.transforms.coordinates import CINE_COORD_DIM, CoordinateMapping, phase_channels, phase_of
from nisf_monai.transforms.heart_frame import pose_matrix, split_pose

__all__ = ["HeartLocator", "frozen_view", "heart_weights"]

logger = logging.getLogger("nisf_monai")


def heart_weights(points: torch.Tensor, extent_mm: float, sigma_mm: float | None) -> torch.Tensor:
    """Per-point loss weights ``(..., N)`` for network coordinates ``(..., 3, N)`` in a heart frame: a Gaussian of
    the in-plane distance to the heart's origin (``sigma_mm``), normalised to mean 1; all ones for None."""
    if sigma_mm is None or sigma_mm <= 0:
        return torch.ones_like(points[..., 0, :])
    radius2 = (points[..., 0, :] ** 2 + points[..., 1, :] ** 2) * extent_mm**2
    weights = torch.exp(-radius2 / (2.0 * sigma_mm**2))
    return weights / weights.mean(dim=-1, keepdim=True).clamp_min(1e-12)


def frozen_view(network: nn.Module) -> nn.Module:
    """A copy of ``network``'s module structure whose parameters are detached aliases of the network's (same
    storage, ``requires_grad=False``) and whose buffers are the network's own, for fitting codes and poses.

    Through it autograd skips every weight gradient (``autograd.grad`` on a code alone would otherwise still
    run them: a third of a step's work; the fused Gabor path drops them when no weight requires grad) without
    switching ``requires_grad`` off on the network, which other threads may be using at the same time
    (concurrent fits, a training loop). Costs a copy of the modules (about 2 ms for the default network), not
    of the weights, so weights changed in place (an optimizer step elsewhere) show through. A TorchScript
    module copies its weights when deep-copied: it becomes a frozen copy instead (right, but not shared)."""
    if isinstance(network, (DataParallel, DistributedDataParallel)):
        raise TypeError(
            f"pass the network itself, not a {type(network).__name__} wrapper (nisf_monai.distributed.unwrap_network)."
        )
    with torch.inference_mode(False):  # a plain alias even when the caller is in inference mode
        memo: dict[int, Any] = {id(buffer): buffer for buffer in network.buffers()}
        memo.update({id(parameter): parameter.detach() for parameter in network.parameters()})
        view = copy.deepcopy(network, memo)
    for parameter in view.parameters():
        if parameter.requires_grad:  # copied rather than taken from the memo (TorchScript): a copy of our own
            parameter.requires_grad_(False)
    return view


def _with_phase(coords: torch.Tensor, phase: float | None) -> torch.Tensor:
    """Network coordinates ``(K, 3, P)`` with the phase's channels (``phase_channels``) appended for a cine network
    (None: as is)."""
    if phase is None:
        return coords
    channels = phase_channels(phase).to(coords)[None, :, None].expand(coords.shape[0], 2, coords.shape[2])
    return torch.cat([coords, channels], dim=1)


def _in_plane_axes(affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal world directions (e1, e2, normal) of an image's slice plane and slice normal."""
    normal = affine[:3, 2] / torch.linalg.norm(affine[:3, 2])
    e1 = affine[:3, 0] - (affine[:3, 0] @ normal) * normal
    e1 = e1 / torch.linalg.norm(e1)
    return e1, torch.linalg.cross(normal, e1), normal


class HeartLocator:
    """Estimates a case's heart-frame pose from its intensities with a heart-frame network, which it only reads
    (the search runs through a :func:`frozen_view`: no flag or gradient of the network changes, so a network
    in use by other threads can be passed).

    Args:
        radius_mm: how far from the volume centre (in the slice plane) candidate origins go.
        step_mm: spacing of the candidate origins.
        num_angles: in-plane rotations tried per origin (evenly spread over 360 degrees).
        sigma_mm: width of the loss weighting around the candidate heart.
        score_points: voxels scored per candidate.
        num_starts: best candidates refined; the one with the lowest refined loss wins. On ACDC validation frames
            one start found the heart best (median origin error 8 mm): with a free code the refined loss is a
            poorer judge of the pose than the population-average score (4 starts: 10 mm, 12 starts: 27 mm).
        refine_steps: Adam steps of each refinement (code + shift + in-plane angle); 0 keeps the start as found.
        learning_rate: the code's Adam rate in refinement; the angle moves at about ``learning_rate`` radians per
            step and the shift at about ``4 * learning_rate * step_mm`` millimetres (whatever the coordinate scale).
        seed: seeds the voxel draws and initial codes.
        localiser: a coarse segmentation network whose labels' pose is the start, instead of the grid search.
    """

    def __init__(
        self,
        radius_mm: float = 60.0,
        step_mm: float = 15.0,
        num_angles: int = 8,
        sigma_mm: float = 50.0,
        score_points: int = 2048,
        num_starts: int = 1,
        refine_steps: int = 50,
        learning_rate: float = 1e-2,
        seed: int = 0,
        localiser: SliceLocaliser | None = None,
    ) -> None:
        if step_mm <= 0 or radius_mm < 0 or num_angles < 1 or num_starts < 1 or score_points < 1:
            raise ValueError("HeartLocator needs step_mm > 0, radius_mm >= 0, and at least one angle, start and point.")
        self.radius_mm, self.step_mm, self.num_angles = float(radius_mm), float(step_mm), int(num_angles)
        self.sigma_mm, self.score_points, self.num_starts = float(sigma_mm), int(score_points), int(num_starts)
        self.refine_steps, self.learning_rate, self.seed = int(refine_steps), float(learning_rate), int(seed)
        self.localiser = localiser

    def candidates(self, image: MetaTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate poses: ``(K, 3)`` world origins and ``(K, 3, 3)`` rotations (rows: heart axes) around the
        volume centre."""
        affine = torch.as_tensor(image.affine, dtype=torch.float64).reshape(-1, 4, 4)[0]
        centre = CoordinateMapping(affine, image.shape[-3:]).centre
        radius_mm = self.radius_mm
        e1, e2, normal = _in_plane_axes(affine)
        n = int(radius_mm // self.step_mm)
        offsets = [
            (i * self.step_mm, j * self.step_mm)
            for i in range(-n, n + 1)
            for j in range(-n, n + 1)
            if math.hypot(i, j) * self.step_mm <= radius_mm + 1e-9
        ]
        origins, rotations = [], []
        for a in range(self.num_angles):
            theta = 2.0 * math.pi * a / self.num_angles
            x_axis = math.cos(theta) * e1 + math.sin(theta) * e2
            rotation = torch.stack([x_axis, torch.linalg.cross(normal, x_axis), normal])
            for u, v in offsets:
                origins.append(centre + u * e1 + v * e2)
                rotations.append(rotation)
        return torch.stack(origins), torch.stack(rotations)

    def _voxels(
        self, image: MetaTensor, generator: torch.Generator, kept: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """World positions ``(P, 3)`` (float64) and intensities ``(P,)`` of random voxels (among ``kept`` flat
        indices when given)."""
        affine = torch.as_tensor(image.affine, dtype=torch.float64).reshape(-1, 4, 4)[0]
        shape = tuple(image.shape[-3:])
        values = image.as_tensor().reshape(-1).float()
        if kept is None:
            index = torch.randint(values.numel(), (self.score_points,), generator=generator)
        else:
            index = kept[torch.randint(kept.numel(), (self.score_points,), generator=generator)]
        voxel = torch.stack(torch.unravel_index(index, shape), dim=-1).to(torch.float64)
        return voxel @ affine[:3, :3].T + affine[:3, 3], values[index].clamp(0.0, 1.0)

    @staticmethod
    def _coords(world: torch.Tensor, origins: torch.Tensor, rotations: torch.Tensor, extent_mm: float) -> torch.Tensor:
        """Network coordinates ``(K, 3, P)`` of world points ``(P, 3)`` in K poses."""
        local = torch.einsum("kij,kpj->kip", rotations, world[None] - origins[:, None, :])
        return (local / extent_mm).float()

    @torch.no_grad()
    def _scores(
        self,
        network: nn.Module,
        coords: torch.Tensor,
        target: torch.Tensor,
        extent_mm: float,
        group: int,
        phase: float | None = None,
    ) -> torch.Tensor:
        scores = []
        latent_dim = int(network.latent_dim)
        for start in range(0, coords.shape[0], group):
            chunk = coords[start : start + group]
            inputs = _with_phase(chunk, phase)
            _, logit = network.forward_heads(inputs, chunk.new_zeros((chunk.shape[0], latent_dim)))
            bce = F.binary_cross_entropy_with_logits(logit[:, 0], target.expand(chunk.shape[0], -1), reduction="none")
            scores.append((bce * heart_weights(chunk, extent_mm, self.sigma_mm)).mean(dim=-1))
        return torch.cat(scores)

    def locate(
        self, image: MetaTensor, network: nn.Module, extent_mm: float, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The 4 x 4 pose (world mm -> heart frame mm) of one case ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)``; a
        boolean ``mask`` of the image's grid limits the voxels used (hidden slices, sparse inputs)."""
        network = frozen_view(network)  # refinement's backward then reaches the code and pose alone
        device = next(network.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        kept = None if mask is None else torch.as_tensor(mask).reshape(-1).nonzero().squeeze(1)
        found = self.localiser.pose(image, mask) if self.localiser is not None else None
        if found is not None:
            if self.refine_steps == 0:
                return found
            origin, rotation, scale = split_pose(found)  # the localiser's scale is kept; origin and angle refined
            return self._refine(network, image, origin[None], rotation[None], extent_mm, generator, device, kept, scale)
        if self.localiser is not None:
            logger.warning(
                "the localiser found no left ventricle in %s: searching the heart by reconstruction instead.",
                image.meta.get("filename_or_obj", "a case"),
            )
        origins, rotations = self.candidates(image)
        best = self._best(network, image, origins, rotations, extent_mm, generator, device, kept)[: self.num_starts]
        return self._refine(network, image, origins[best], rotations[best], extent_mm, generator, device, kept)

    def _best(self, network, image, origins, rotations, extent_mm, generator, device, kept) -> torch.Tensor:
        """Indices of candidate poses from the best population-average (zero-code) score to the worst."""
        world, target = self._voxels(image, generator, kept)
        coords = self._coords(world, origins, rotations, extent_mm).to(device)
        group = max(1, 16384 // self.score_points) if device.type == "cpu" else coords.shape[0]
        phase = _phase_for(network, image)
        return torch.argsort(self._scores(network, coords, target.to(device), extent_mm, group, phase))

    def _refine(
        self, network, image, origins, rotations, extent_mm, generator, device, kept, scale: float = 1.0
    ) -> torch.Tensor:
        """Joint code + in-plane pose fit from each start (frames of the given ``scale``); the pose of the lowest
        final loss."""
        starts = origins.shape[0]
        latent = (
            (torch.randn(starts, int(network.latent_dim), generator=generator) * 1e-4).to(device).requires_grad_(True)
        )
        shift = torch.zeros(starts, 3, device=device, requires_grad=True)  # along the heart axes, in units of step_mm
        angle = torch.zeros(starts, device=device, requires_grad=True)  # radians about heart z
        optimizer = torch.optim.Adam(
            [
                {"params": [latent], "lr": self.learning_rate},
                {"params": [shift], "lr": 4 * self.learning_rate},
                {"params": [angle], "lr": self.learning_rate},
            ]
        )
        losses = torch.zeros(starts)
        axes = rotations * scale  # the frame's axes in frame mm per world mm
        phase = _phase_for(network, image)
        for step in range(self.refine_steps + 1):
            world, target = self._voxels(image, generator, kept)
            base = self._coords(world, origins, axes, extent_mm).to(device)  # (S, 3, P)
            coords = _moved(base, shift * (self.step_mm / extent_mm), angle)
            _, logit = network.forward_heads(_with_phase(coords, phase), latent)
            bce = F.binary_cross_entropy_with_logits(
                logit[:, 0], target.to(device).expand(starts, -1), reduction="none"
            )
            per_start = (bce * heart_weights(coords.detach(), extent_mm, self.sigma_mm)).mean(dim=-1)
            if step == self.refine_steps:
                losses = per_start.detach().cpu()
                break
            loss = per_start.sum() + 1e-4 * latent.pow(2).mean(dim=1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        b = int(torch.argmin(losses))
        shift_mm = shift[b].detach().cpu().double() * self.step_mm
        return _corrected_pose(origins[b], rotations[b], shift_mm, float(angle[b].detach()), scale)


def _phase_for(network: nn.Module, image: MetaTensor) -> float | None:
    """The phase a cine network reads the image at (0 when it carries none), None for a per-frame network."""
    if int(getattr(network, "coord_dim", 3)) != CINE_COORD_DIM:
        return None
    return phase_of(image) or 0.0


def _moved(coords: torch.Tensor, shift: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Heart coordinates ``(S, 3, P)`` shifted by ``shift (S, 3)`` then turned in-plane by ``angle (S,)``."""
    x = coords[:, 0] - shift[:, 0:1]
    y = coords[:, 1] - shift[:, 1:2]
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    return torch.stack([c * x + s * y, -s * x + c * y, coords[:, 2] - shift[:, 2:3]], dim=1)


def _corrected_pose(
    origin: torch.Tensor, rotation: torch.Tensor, shift_mm: torch.Tensor, angle: float, scale: float = 1.0
) -> torch.Tensor:
    """The pose whose coordinates equal ``_moved`` of the start pose's: origin moved by the shift (frame mm, so
    ``shift / scale`` world mm) along the start's heart axes, axes turned by the angle about heart z."""
    new_origin = origin + (shift_mm[0] * rotation[0] + shift_mm[1] * rotation[1] + shift_mm[2] * rotation[2]) / scale
    c, s = math.cos(angle), math.sin(angle)
    turn = torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return pose_matrix(new_origin.numpy(), (turn @ rotation).numpy(), scale)
