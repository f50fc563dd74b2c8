"""Inference by auto-decoding: fit a latent code to a new image, then read the segmentation anywhere.

:class:`LatentOptimisationInferer` is the auto-decoder's loop (draw points, take a step on the code, read the
heads on a grid); what it is fitted to and what it writes come from parts, each one lever measured on ACDC:

- the pose, a :class:`~nisf_monai.inferers.heart_locator.HeartLocator` (heart-frame networks);
- the fit's terms (:mod:`~nisf_monai.inferers.fit_terms`): the intensity, the localiser's guide;
- where the fit looks, a :class:`~nisf_monai.inferers.fit_terms.HeartWeighting`;
- the written output's mixing with the localiser, a :class:`~nisf_monai.inferers.output_blend.LocaliserBlend`;
- where the outputs are read from the network, a :class:`~nisf_monai.inferers.output_region.HeartRegion`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from nisf_monai.denormals import flush_denormal
from nisf_monai.inferers.cases import (
    CaseMasks,
    as_meta,
    case_masks,
    check_phases,
    checked_batch,
    code_groups,
    grid_affine,
    reference_case,
    spacing_triple,
    split_cases,
    target_grid,
)
from nisf_monai.inferers.fit_terms import FitTerm, HeartWeighting, IntensityTerm
from nisf_monai.inferers.heart_locator import HeartLocator, frozen_view
from nisf_monai.inferers.output_blend import LocaliserBlend
from nisf_monai.inferers.output_region import HeartRegion
from nisf_monai.inferers.probability_volume import ProbabilityVolume
from nisf_monai.inferers.slice_localiser import SliceLocaliser
from nisf_monai.transforms.coordinates import POSE_KEY, CoordinateMapping, phase_of, pose_of, world_grid
from nisf_monai.transforms.heart_frame import split_pose

__all__ = ["LatentOptimisationInferer"]

CPU_GROUP_POINTS = 16384  # points per forward pass of a batched latent fit on a CPU (see ``_groups``)

logger = logging.getLogger("nisf_monai")

_FAR_LOGIT = 30.0  # a logit beyond the output region: probability 1 for background, 0 for intensity

# the terms of one fit that take part, each with the rows of the fit's targets it reads
_ActiveTerms = list[tuple[FitTerm, slice]]


class LatentOptimisationInferer(Inferer):
    """Segments an image with a trained NISF network by fitting the image's latent code first.

    Per case: start from ``h ~ N(0, init_std^2)``, minimise the fit's terms (+ ``latent_weight * mean(h^2)``) over
    ``h`` alone for ``num_steps`` Adam steps on ``num_points`` drawn voxels per step, then evaluate both heads on
    the target grid in chunks. The network object is only read, never modified: the code (and the pose search of
    heart-frame networks) is fitted through a :func:`~nisf_monai.inferers.heart_locator.frozen_view` of it, which
    shares its weights but not its ``requires_grad`` flags, gradients are taken with respect to ``h`` only
    (``torch.autograd.grad``) and no weight gradient is computed or stored. So one network can serve many
    cases from several threads at once, each getting the codes it would get alone, and a training loop that
    shares it keeps its flags and ``.grad``. What it cannot isolate: weights changed in place while a fit
    runs (an optimizer step elsewhere) are seen by that fit, and train/eval mode is the caller's. Grad is
    re-enabled locally because MONAI's evaluators and MONAI Label call inferers under ``torch.no_grad()``.

    Input images are channel-first MetaTensors ``(B, 1, X, Y, Z)`` whose intensities are already scaled to
    [0, 1] (the bundle's percentile scaling); all cases of a batch must share one grid.

    Args:
        num_steps: latent optimisation steps (chosen on validation data; the paper found 672).
        learning_rate: Adam step size for the code.
        num_points: random voxels per step (None: all voxels, as in the paper; slow on a CPU).
        init_std: standard deviation of the initial code.
        latent_weight: weight of the L2 penalty on the code.
        latent_dim: size of the code; defaults to ``network.latent_dim``.
        extent_mm: coordinate normalisation, as in training (see ``CoordinateMapping``).
        coordinate_mode: 'world' or 'voxel', as in training.
        target_spacing: output spacing in mm for ``fit_and_sample``; None keeps the input grid.
        chunk_size: points per forward pass when sampling a grid (bounds memory).
        seed: seeds the code's initialisation and the point sampling, for repeatable results.
        log_every: log the loss every this many steps (0: never).
        heart_locator: the pose. Given one, the network reads heart-frame coordinates (``train.json``'s
            ``heart_frame``): each case's pose is estimated by it (:meth:`locate`) before its code is fitted, unless
            its metadata already carries one (``POSE_KEY``); its localiser, if any, is what the localiser parts
            read. None: the network reads the volume's coordinates.
        fit_terms: the per-point loss, summed over these :class:`~nisf_monai.inferers.fit_terms.FitTerm`
            (default: :class:`~nisf_monai.inferers.fit_terms.IntensityTerm` alone, the paper's objective).
        fit_weighting: where the fit's points are drawn and how they are weighted, e.g. a
            :class:`~nisf_monai.inferers.fit_terms.HeartWeighting` (needs a heart locator); None: evenly.
        output_blend: a :class:`~nisf_monai.inferers.output_blend.LocaliserBlend` mixing the localiser's class
            probabilities into what :meth:`fit_and_sample` and ``__call__`` write; None: NISF alone.
        output_region: a :class:`~nisf_monai.inferers.output_region.HeartRegion` (needs a heart locator): sampled
            outputs are read from the network only within it (background and intensity 0 beyond); None reads every
            voxel.

    A cine network (``coord_dim=5``, one code per subject) reads each frame at its cardiac phase (``PHASE_KEY`` in the
    image's metadata; 0, end-diastole, with a warning when a frame has none). Frames given the same ``groups`` label
    in :meth:`fit` share one code, fitted to all of them at once (each step draws ``num_points`` from their voxels
    together), and one heart pose, found on the group's frame earliest in the cycle.
    """

    def __init__(
        self,
        num_steps: int = 200,
        learning_rate: float = 3e-3,
        num_points: int | None = 8192,
        init_std: float = 1e-4,
        latent_weight: float = 1e-4,
        latent_dim: int | None = None,
        extent_mm: float = 400.0,
        coordinate_mode: str = "world",
        target_spacing: Sequence[float] | None = None,
        chunk_size: int = 65536,
        seed: int = 0,
        log_every: int = 100,
        heart_locator: HeartLocator | None = None,
        fit_terms: Sequence[FitTerm] | None = None,
        fit_weighting: HeartWeighting | None = None,
        output_blend: LocaliserBlend | None = None,
        output_region: HeartRegion | None = None,
    ) -> None:
        super().__init__()
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        self.num_steps = int(num_steps)
        self.learning_rate = learning_rate
        self.num_points = num_points
        self.init_std = init_std
        self.latent_weight = latent_weight
        self.latent_dim = latent_dim
        self.extent_mm = extent_mm
        self.coordinate_mode = coordinate_mode
        self.target_spacing = None if target_spacing is None else spacing_triple(target_spacing).tolist()
        self.chunk_size = int(chunk_size)
        self.seed = seed
        self.log_every = log_every
        self.heart_locator = heart_locator
        self.fit_terms = list(fit_terms) if fit_terms is not None else [IntensityTerm()]
        if not self.fit_terms:
            raise ValueError("fit_terms is empty: give at least one term to fit the code to (IntensityTerm).")
        for part, name in ((fit_weighting, "fit_weighting"), (output_region, "output_region")):
            if part is not None and heart_locator is None:
                raise ValueError(f"{name} is measured from the heart frame's axis: give a heart_locator too.")
        self.fit_weighting = fit_weighting
        self.output_blend = output_blend
        self.output_region = output_region

    @property
    def heart_frame(self) -> bool:
        """Whether the network reads heart-frame coordinates (a heart locator finds each case's pose)."""
        return self.heart_locator is not None

    @property
    def localiser(self) -> SliceLocaliser | None:
        """The heart locator's localiser, which the localiser parts read, or None."""
        return getattr(self.heart_locator, "localiser", None)

    def frame_of(self, image: MetaTensor) -> CoordinateMapping:
        """The :class:`CoordinateMapping` of an image (B, 1, X, Y, Z), with this inferer's normalisation, the heart
        pose its metadata carries (``POSE_KEY``), if any, and its cardiac phase (``PHASE_KEY``), if any. (The name
        predates the mapping's rename; kept for existing callers.) A heart-frame inferer needs the pose :meth:`locate`
        or :meth:`fit` stored: without it the coordinates would silently be the volume's, where the code was not
        fitted."""
        pose = pose_of(image)
        if self.heart_frame and pose is None:
            raise ValueError(
                "this image carries no heart pose: call locate() or fit() on it first. They store the pose in the"
                " metadata of the image they are given; a view made before (e.g. image[None]) does not get it."
            )
        return CoordinateMapping(
            grid_affine(image), image.shape[2:], self.extent_mm, self.coordinate_mode, pose=pose, phase=phase_of(image)
        )

    def locate(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: nn.Module,
        masks: CaseMasks = None,
        groups: Sequence[Any] | None = None,
    ) -> None:
        """Estimate the heart pose of every case that has none (heart-frame networks) and store it in the
        case's metadata (``POSE_KEY``), where :meth:`frame_of` and every later step read it. ``masks`` as in
        :meth:`fit`: only kept voxels are looked at. Cases of one group (``groups`` as in :meth:`fit`) get one pose,
        found on the group's frame earliest in the cycle. Does nothing without a heart locator. For a cine network,
        first gives a frame without a cardiac phase phase 0 (with a warning)."""
        images = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        check_phases(images, network)
        if self.heart_locator is None:
            return
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 5 and inputs.shape[0] > 1 and pose_of(inputs) is None:
            raise ValueError(
                "a heart-frame network locates each case on its own: pass a list of images (1, X, Y, Z), not a batch."
            )
        masks_of = case_masks(masks, [image if image.dim() == 5 else image[None] for image in images])
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(self._device_type(network), enabled=False),
            flush_denormal(),
        ):
            for unit in code_groups(groups, len(images)):
                reference = reference_case(images, unit)
                pose = pose_of(images[reference])
                if pose is None:
                    image = images[reference]
                    pose = self.heart_locator.locate(image, network, self.extent_mm, masks_of[reference])
                    image.meta[POSE_KEY] = pose
                    origin, _, scale = split_pose(pose)
                    logger.debug(
                        "heart frame of %s: origin %s mm, scale %.3f",
                        image.meta.get("filename_or_obj", "a case"),
                        np.round(origin.numpy(), 1).tolist(),
                        scale,
                    )
                for b in unit:
                    if pose_of(images[b]) is None:
                        images[b].meta[POSE_KEY] = pose.clone()

    @staticmethod
    def _device_type(network: nn.Module) -> str:
        parameter = next(network.parameters(), None)
        return parameter.device.type if parameter is not None else "cpu"

    def fit(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: nn.Module,
        monitor: Callable[[int, torch.Tensor], None] | None = None,
        monitor_every: int = 0,
        masks: CaseMasks = None,
        groups: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Fitted codes ``(B, latent_dim)``, one row per case; the network stays untouched (see the class docstring).

        ``inputs`` is a batch ``(B, 1, X, Y, Z)`` on one grid or a list of images ``(1, X, Y, Z)`` on grids of
        their own. All cases are optimised together (one batched forward per step), each with its own
        code, Adam moments and random points drawn from a generator seeded as for a case fitted alone, so
        a batch gives the codes that fitting each case alone gives. ``monitor(step, codes)`` is called
        before the first step and every ``monitor_every`` steps (e.g. to record Dice against the step).

        ``masks`` restricts each case to some of its voxels (sparse or partial input, hidden slices): a
        boolean batch ``(B, 1, X, Y, Z)`` or one ``(1, X, Y, Z)`` mask (or None: every voxel) per case,
        True where the voxel may be used. Only kept voxels are copied into the optimisation, so the loss
        never sees the others; points are drawn among them (all of them when ``num_points`` is None or at
        least their number). A mask keeping every voxel gives the code of no mask.

        ``groups`` (one hashable label per case, e.g. the subject; None: every case alone): cases with the same label
        are frames of one cine and share one code, fitted to all their voxels together (each step draws
        ``num_points`` among them); their rows of the result are that code.
        """
        self.locate(inputs, network, masks, groups)
        cases = split_cases(inputs)
        masks_of = case_masks(masks, cases)
        units = code_groups(groups, len(cases))
        row_of_case = torch.empty(len(cases), dtype=torch.long)
        for row, unit in enumerate(units):
            row_of_case[unit] = row
        device = cases[0].device
        latent_dim = self.latent_dim or int(network.latent_dim)
        # callers may hold no_grad or inference_mode; the code needs autograd, the network does not. The fit
        # runs in float32 even inside an autocast region (the bundle's AMP on CUDA): the code's gradient is a
        # mean over thousands of points and would underflow in float16 without loss scaling
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
            flush_denormal(),
        ):
            frozen = frozen_view(network)  # no weight gradients, and no flag of the shared network flipped
            case_coords, case_targets, terms = self._fit_points(cases, masks_of, device)
            coords = [torch.cat([case_coords[b] for b in unit], dim=1) for unit in units]
            targets = [torch.cat([case_targets[b] for b in unit], dim=1) for unit in units]
            generators = [torch.Generator().manual_seed(self.seed) for _ in units]  # as for each case alone
            draw_cdfs = [self._draw_cdf(c) for c in coords]  # fixed for the fit: computed once, not every step
            initial = [torch.randn(1, latent_dim, generator=g) for g in generators]
            latent = (torch.cat(initial) * self.init_std).to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([latent], lr=self.learning_rate)
            rows = row_of_case.to(device)
            for step in range(self.num_steps):
                if monitor is not None and monitor_every and step % monitor_every == 0:
                    monitor(step, latent.detach()[rows])
                loss = self._gradient(frozen, latent, coords, targets, generators, draw_cdfs, terms)
                optimizer.step()
                if self.log_every and (step + 1) % self.log_every == 0:
                    logger.info(
                        "latent optimisation step %d/%d: loss %.5f",
                        step + 1,
                        self.num_steps,
                        float(loss.detach()) / len(units),
                    )
            if monitor is not None and monitor_every:
                monitor(self.num_steps, latent.detach()[rows])
        return latent.detach()[rows]

    def _active_terms(self) -> list[FitTerm]:
        """The fit terms that take part in this fit (a term that needs the localiser sits out without one)."""
        terms = [term for term in self.fit_terms if term.takes_part(self.localiser)]
        if not terms:
            raise ValueError("none of the fit terms takes part in this fit: nothing to fit the code to.")
        return terms

    def _fit_points(
        self, cases: list[MetaTensor], masks: list[torch.Tensor | None], device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], _ActiveTerms]:
        """Per case, the network coordinates ``(3, P)`` of the voxels a code is fitted to (those its mask keeps)
        and their targets on ``device``, every term's rows stacked; and the terms that take part, each with its
        rows. A cine network's coordinates are ``(4, P)``, the frame's phase last."""
        terms = self._active_terms()
        coords, targets, active = [], [], []
        for case, mask in zip(cases, masks):
            mapping = self.frame_of(case)
            points = mapping.grid(mapping.affine, case.shape[2:]).T  # (3, P), or (4, P) with the phase
            rows = [term.targets(case, self.localiser) for term in terms]
            if not active:
                stops = np.cumsum([r.shape[0] for r in rows]).tolist()
                active = [(term, slice(stop - r.shape[0], stop)) for term, r, stop in zip(terms, rows, stops)]
            values = torch.cat([r.to(rows[0]) for r in rows])  # (C, P)
            if mask is not None:
                kept = mask.reshape(-1).nonzero().squeeze(1)
                points, values = points[:, kept.to(points.device)], values[:, kept.to(values.device)]
            coords.append(points.to(device))
            targets.append(values.float().clone().to(device))
        return coords, targets, active

    def _gradient(
        self,
        network: nn.Module,
        latent: torch.Tensor,
        coords: list[torch.Tensor],
        targets: list[torch.Tensor],
        generators: list[torch.Generator],
        draw_cdfs: list[torch.Tensor | None],
        terms: _ActiveTerms,
    ) -> torch.Tensor:
        """One step's loss of all cases on freshly drawn points (``draw_cdfs``: see :meth:`_draw`); its gradient
        with respect to the codes is left in ``latent.grad`` (for the optimizer's step)."""
        device = latent.device
        index = [self._draw(c.shape[-1], g, cdf).to(device) for c, g, cdf in zip(coords, generators, draw_cdfs)]
        points, values = [c[:, i] for c, i in zip(coords, index)], [t[:, i] for t, i in zip(targets, index)]
        latent.grad = torch.zeros_like(latent)
        loss = latent.new_zeros(())
        for group in self._groups([p.shape[-1] for p in points], device):
            # each case's loss depends on its own code only: per-group gradients add up to the batch's
            group_loss = self._loss(
                network, latent[group], [points[b] for b in group], [values[b] for b in group], terms
            )
            latent.grad += torch.autograd.grad(group_loss, [latent])[0]
            loss = loss + group_loss.detach()
        return loss

    @staticmethod
    def _groups(num_points: list[int], device: torch.device) -> list[list[int]]:
        """Cases per forward pass. On a CPU the step's saved activations (about 2 KB per point) stop fitting
        in cache beyond a few ten thousand points, and a step over 8 cases x 8192 points ran 2x slower per
        case than one case alone, so cases go through in groups of at most ``CPU_GROUP_POINTS`` points; a GPU
        takes the whole batch in one pass."""
        if device.type != "cpu":
            return [list(range(len(num_points)))]
        groups: list[list[int]] = []
        total = 0
        for b, count in enumerate(num_points):
            if not groups or total + count > CPU_GROUP_POINTS:
                groups.append([])
                total = 0
            groups[-1].append(b)
            total += count
        return groups

    def _draw_cdf(self, coords: torch.Tensor) -> torch.Tensor | None:
        """The cumulative weighting over a case's voxels ``coords`` (3, P) that :meth:`_draw` samples from (the
        ``fit_weighting``'s), or None for even draws."""
        return None if self.fit_weighting is None else self.fit_weighting.draw_cdf(coords, self.extent_mm)

    def _draw(self, num_voxels: int, generator: torch.Generator, cdf: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of this step's points among a case's ``num_voxels``: uniform, or by inverse CDF from ``cdf``
        (:meth:`_draw_cdf`; unlike ``torch.multinomial``, no limit on the number of voxels)."""
        if self.num_points is None or self.num_points >= num_voxels:
            return torch.arange(num_voxels)
        if cdf is not None:
            uniform = torch.rand(self.num_points, generator=generator, dtype=torch.float64) * cdf[-1]
            return torch.searchsorted(cdf, uniform).clamp_max(num_voxels - 1)
        return torch.randint(num_voxels, (self.num_points,), generator=generator)

    def _point_weights(self, points: torch.Tensor) -> torch.Tensor:
        """Loss weights of drawn points ``(B, 3, N)``: the ``fit_weighting``'s, or ones."""
        if self.fit_weighting is None:
            return torch.ones_like(points[:, 0])
        return self.fit_weighting.point_weights(points, self.extent_mm)

    def _loss(
        self,
        network: nn.Module,
        latent: torch.Tensor,
        points: list[torch.Tensor],
        targets: list[torch.Tensor],
        terms: _ActiveTerms,
    ) -> torch.Tensor:
        """Sum over cases of each case's weighted mean point loss plus its L2 term: every code gets the gradient
        it would get alone."""
        penalty = self.latent_weight * latent.pow(2).mean(dim=1).sum()
        if len({p.shape[-1] for p in points}) == 1:
            stacked = torch.stack(points)
            per_point = self._point_loss(network, latent, stacked, torch.stack(targets), terms)
            return (per_point * self._point_weights(stacked)).mean(dim=1).sum() + penalty
        total = penalty
        for b, (p, t) in enumerate(zip(points, targets)):
            per_point = self._point_loss(network, latent[b : b + 1], p[None], t[None], terms)
            total = total + (per_point * self._point_weights(p[None])).mean()
        return total

    @staticmethod
    def _point_loss(
        network: nn.Module, latent: torch.Tensor, points: torch.Tensor, targets: torch.Tensor, terms: _ActiveTerms
    ) -> torch.Tensor:
        """Loss per point ``(B, N)``: the sum of the terms', each reading its rows of ``targets`` ``(B, C, N)``."""
        seg_logits, intensity_logit = network.forward_heads(points, latent)
        losses = [term.point_loss(seg_logits, intensity_logit, targets[:, rows]) for term, rows in terms]
        return sum(losses[1:], losses[0])

    @torch.no_grad()
    def sample(
        self,
        network: nn.Module,
        latent: torch.Tensor,
        frame: CoordinateMapping,
        affine: Any,
        spatial_shape: Sequence[int],
        probabilities: bool = False,
        blend: ProbabilityVolume | None = None,
        own_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate both heads on a grid in chunks of ``chunk_size`` points; ``frame`` is the
        :class:`CoordinateMapping` of the image the code was fitted to (:meth:`frame_of`). ``blend``: the
        localiser's probabilities of a single case (:meth:`blend_source`), mixed in by the ``output_blend`` (the
        labels are then the mixture's argmax, and ``probabilities=True`` returns the mixture).

        ``own_labels``: a uint8 tensor of ``prod(shape)`` elements filled, in the same pass, with NISF's own labels
        (before any blend), for quality control, which compares them with the localiser's.

        Returns ``(seg, intensity)`` of shapes ``(B, 1, *shape)`` uint8 labels (argmax) and
        ``(B, 1, *shape)`` intensity in [0, 1]; with ``probabilities=True`` ``seg`` is ``(B, M, *shape)``
        softmax probabilities instead (memory grows with the number of classes)."""
        shape = [int(s) for s in spatial_shape]
        total = int(np.prod(shape))
        batch = latent.shape[0]
        if blend is not None and batch != 1:
            raise ValueError(f"a blend belongs to one case: sample it with one code, got {batch}.")
        num_classes = int(network.num_classes)
        seg = torch.empty(
            (batch, num_classes if probabilities else 1, total), dtype=torch.float32 if probabilities else torch.uint8
        )
        intensity = torch.empty((batch, 1, total), dtype=torch.float32)
        with flush_denormal():
            for start in range(0, total, self.chunk_size):
                stop = min(start + self.chunk_size, total)
                seg_logits, intensity_logit = self._read_heads(network, latent, frame.grid(affine, shape, start, stop))
                if own_labels is not None:
                    own_labels.view(-1)[start:stop] = seg_logits[0].argmax(dim=0).to(torch.uint8).cpu()
                if probabilities or blend is not None:
                    probs = torch.softmax(seg_logits.float(), dim=1).cpu()
                    if blend is not None:
                        probs = self.blended(probs, blend, world_grid(affine, shape, start, stop))
                    seg[:, :, start:stop] = (
                        probs if probabilities else probs.argmax(dim=1, keepdim=True).to(torch.uint8)
                    )
                else:
                    seg[:, 0, start:stop] = seg_logits.argmax(dim=1).to(torch.uint8).cpu()
                intensity[:, :, start:stop] = torch.sigmoid(intensity_logit.float()).cpu()
        return seg.reshape(batch, -1, *shape), intensity.reshape(batch, 1, *shape)

    def _read_heads(
        self, network: nn.Module, latent: torch.Tensor, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits ``(B, M, N)``, ``(B, 1, N)`` at network coordinates ``(N, coord_dim)``; outside the
        :class:`HeartRegion`, when one is set, background and intensity 0 without a network pass."""
        inside = self.output_region.inside(points, self.extent_mm) if self.output_region is not None else None
        if inside is None or bool(inside.all()):
            return network.forward_heads(points.T.to(latent.device).expand(latent.shape[0], -1, -1), latent)
        batch, count = latent.shape[0], points.shape[0]
        seg = latent.new_full((batch, int(network.num_classes), count), -_FAR_LOGIT)
        seg[:, 0] = _FAR_LOGIT
        intensity = latent.new_full((batch, 1, count), -_FAR_LOGIT)
        if bool(inside.any()):
            read = points[inside].T.to(latent.device).expand(batch, -1, -1)
            seg_inside, intensity_inside = network.forward_heads(read, latent)
            where = inside.to(latent.device)
            seg[:, :, where] = seg_inside.to(seg.dtype)
            intensity[:, :, where] = intensity_inside.to(intensity.dtype)
        return seg, intensity

    def blend_source(self, image: MetaTensor, mask: torch.Tensor | None = None) -> ProbabilityVolume | None:
        """The localiser's probabilities of one case ``(1, X, Y, Z)`` (or ``(1, 1, X, Y, Z)``) that :meth:`sample`
        mixes in (the ``output_blend``), voxels outside ``mask`` left out; None when nothing is mixed in."""
        return None if self.output_blend is None else self.output_blend.source(image, mask, self.localiser)

    def blended(self, probs: torch.Tensor, blend: ProbabilityVolume, world: torch.Tensor) -> torch.Tensor:
        """NISF's class probabilities ``(1, M, N)`` mixed with the localiser's at the world points ``(N, 3)`` (what
        :meth:`sample` writes with ``blend``; public so probabilities already read can be mixed without a re-read)."""
        if self.output_blend is None:
            raise ValueError("this inferer has no output_blend to mix probabilities with.")
        return self.output_blend.mix(probs, blend, world)

    def fit_and_sample(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: nn.Module,
        monitor: Callable[[int, torch.Tensor], None] | None = None,
        monitor_every: int = 0,
        masks: CaseMasks = None,
        groups: Sequence[Any] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Fit codes, then sample labels and reconstruction at ``target_spacing``.

        For a batch ``(B, 1, X, Y, Z)``: ``{"pred": uint8 labels (B, 1, *S'), "recon": intensity (B, 1, *S'),
        "latent": (B, L)}``. For a list of images ``(1, X, Y, Z)`` (grids may differ): one such dict per
        image, without the batch dimension. ``pred`` and ``recon`` are MetaTensors carrying the target grid's
        affine, so ``SaveImage`` writes them in place. ``monitor``, ``masks``: see :meth:`fit` (a mask
        limits what the code is fitted to; the segmentation still covers the whole target grid), ``groups``: see
        :meth:`fit` (frames of one cine share a code; each is still sampled at its own phase)."""
        latent = self.fit(inputs, network, monitor, monitor_every, masks, groups)
        if isinstance(inputs, torch.Tensor):
            image = checked_batch(inputs)
            affine, shape = target_grid(grid_affine(image), image.shape[2:], self.target_spacing)
            labels, recon = self._sample_batch(network, latent, image, masks, affine, shape)
            return {
                "pred": as_meta(labels, image, affine),
                "recon": as_meta(recon, image, affine),
                "latent": latent,
            }
        outputs = []
        cases = split_cases(inputs)
        for b, (case, mask) in enumerate(zip(cases, case_masks(masks, cases))):
            affine, shape = target_grid(grid_affine(case), case.shape[2:], self.target_spacing)
            mapping, blend = self.frame_of(case), self.blend_source(case, mask)
            own = torch.empty(shape, dtype=torch.uint8) if blend is not None else None
            labels, recon = self.sample(network, latent[b : b + 1], mapping, affine, shape, blend=blend, own_labels=own)
            output = {
                "pred": as_meta(labels, case, affine)[0],
                "recon": as_meta(recon, case, affine)[0],
                "latent": latent[b],
            }
            # NISF's own labels, read in the same pass: quality control needs them (the blend hides them in pred)
            output["code_labels"] = labels[0, 0] if own is None else own
            outputs.append(output)
        return outputs

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Class probabilities ``(B, M, X, Y, Z)`` on the input grid: the ``inferer(image, network)`` form
        MONAI's evaluators and MONAI Label use; ``masks=`` (keyword) as in :meth:`fit`."""
        image = checked_batch(inputs)
        latent = self.fit(image, network, masks=kwargs.get("masks"))
        affine = grid_affine(image)
        probs, _ = self._sample_batch(network, latent, image, kwargs.get("masks"), affine, image.shape[2:], True)
        return as_meta(probs, image, affine)

    def _sample_batch(
        self,
        network: nn.Module,
        latent: torch.Tensor,
        image: MetaTensor,
        masks: CaseMasks,
        affine: Any,
        shape: Sequence[int],
        probabilities: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` of a batch on one grid: in one pass, or case by case when the localiser's probabilities,
        which belong to one case each, are mixed in."""
        if self.output_blend is None or not self.output_blend.active:
            return self.sample(network, latent, self.frame_of(image), affine, shape, probabilities)
        cases = split_cases(image)
        parts = [
            self.sample(
                network,
                latent[b : b + 1],
                self.frame_of(case),
                affine,
                shape,
                probabilities,
                self.blend_source(case, mask),
            )
            for b, (case, mask) in enumerate(zip(cases, case_masks(masks, cases)))
        ]
        return torch.cat([seg for seg, _ in parts]), torch.cat([recon for _, recon in parts])
