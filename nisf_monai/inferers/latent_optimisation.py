"""Inference by auto-decoding: fit a latent code to a new image, then read the segmentation anywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, to_affine_nd, zoom_affine
from monai.inferers import Inferer
from torch import nn

from nisf_monai.denormals import flush_denormal
from nisf_monai.inferers.heart_locator import HeartLocator, frozen_view, heart_weights
from nisf_monai.inferers.output_region import HeartRegion
from nisf_monai.inferers.probability_volume import ProbabilityVolume
from nisf_monai.inferers.slice_localiser import SliceLocaliser
from nisf_monai.transforms.coordinates import (
    CINE_COORD_DIM,
    PHASE_KEY,
    POSE_KEY,
    CoordinateMapping,
    phase_of,
    pose_of,
    world_grid,
)
from nisf_monai.transforms.heart_frame import split_pose

__all__ = ["LatentOptimisationInferer", "code_groups", "spacing_triple", "target_grid"]

CPU_GROUP_POINTS = 16384  # points per forward pass of a batched latent fit on a CPU (see ``_groups``)

logger = logging.getLogger("nisf_monai")

_FAR_LOGIT = 30.0  # a logit beyond the output region: probability 1 for background, 0 for intensity


def target_grid(
    affine: Any, spatial_shape: Sequence[int], spacing: Sequence[float] | None
) -> tuple[np.ndarray, list[int]]:
    """Affine and shape of the grid at ``spacing`` (mm) over the same physical extent as the input, computed
    as MONAI's ``Spacing`` computes its output grid (same axes directions, ``diagonal=False``,
    ``scale_extent=False``). ``spacing=None`` keeps the input grid."""
    affine = to_affine_nd(3, np.asarray(affine, dtype=np.float64))
    shape = [int(s) for s in spatial_shape]
    if spacing is None:
        return affine, shape
    pixdim = spacing_triple(spacing)
    new_affine = zoom_affine(affine, pixdim, diagonal=False)
    out_shape, offset = compute_shape_offset(shape, affine, new_affine, False)
    new_affine[:3, -1] = offset[:3]
    return new_affine, [int(s) for s in out_shape]


def spacing_triple(spacing: Sequence[float] | float, name: str = "target_spacing") -> np.ndarray:
    """Three positive spacings in mm from one value or three; ``name`` is the setting an error names."""
    pixdim = np.asarray(spacing, dtype=np.float64).ravel()
    if pixdim.size == 1:
        pixdim = np.repeat(pixdim, 3)
    if pixdim.size != 3 or not np.all(pixdim > 0):
        raise ValueError(f"{name} must be 3 positive millimetre values (or one), got {np.ravel(spacing).tolist()}.")
    return pixdim


def code_groups(groups: Sequence[Any] | None, num_cases: int) -> list[list[int]]:
    """The cases that share one code: indices grouped by equal ``groups`` values, in order of first appearance
    (``None``: every case alone)."""
    if groups is None:
        return [[b] for b in range(num_cases)]
    if len(groups) != num_cases:
        raise ValueError(f"got {len(groups)} group labels for {num_cases} images.")
    units: dict[Any, list[int]] = {}
    for b, group in enumerate(groups):
        units.setdefault(group, []).append(b)
    return list(units.values())


def _reference_case(images: Sequence[torch.Tensor], unit: Sequence[int]) -> int:
    """The case of a group its heart pose is found on: the one earliest in the cycle (end-diastole, where the heart
    is largest and a cine network's heart frame was placed in training), the first of them on a tie."""
    return min(unit, key=lambda b: (phase_of(images[b]) or 0.0, b))


class LatentOptimisationInferer(Inferer):
    """Segments an image with a trained NISF network by fitting the image's latent code first.

    Per case: start from ``h ~ N(0, init_std^2)``, minimise the intensity reconstruction loss
    (+ ``latent_weight * mean(h^2)``) over ``h`` alone for ``num_steps`` Adam steps on ``num_points``
    random voxels per step, then evaluate the segmentation head on the target grid in chunks.
    The network object is only read, never modified: the code (and the pose search of ``heart_frame``
    networks) is fitted through a :func:`~nisf_monai.inferers.heart_locator.frozen_view` of it, which shares
    its weights but not its ``requires_grad`` flags, gradients are taken with respect to ``h`` only
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
        heart_frame: the network was trained in the heart frame (``train.json``'s ``heart_frame``): each case's
            pose is estimated from its intensities before its code is fitted (:meth:`locate`), unless its
            metadata already carries one (``POSE_KEY``).
        heart_locator: the pose search (default :class:`HeartLocator` settings).
        heart_sigma_mm: weight the fit's loss (intensity and localiser terms) by a Gaussian of this width (mm)
            around the heart's origin in the slice plane, so the code is spent on the heart rather than on the rest
            of the field of view; None weights every voxel alike. Needs ``heart_frame``. On ACDC validation frames
            40 mm raised the guided fit's Dice by about 0.015 (``benchmarks/README.md``).
        localiser_weight: weight of a second fit term, the cross-entropy of the segmentation head against the
            heart locator's localiser (its coarse class probabilities on the image grid, kept voxels only). Intensity
            alone leaves the code's shape loosely pinned (on ACDC validation its fit reached 0.61 Dice where codes
            fitted to the labels reach 0.85); the localiser's coarse labels pull it toward this heart's shape while
            the network's prior keeps it a plausible heart that can be sampled anywhere. 0 (default): intensity
            alone, the paper's objective; without a localiser it is intensity alone, with a warning.

        draw_near_heart: with ``heart_sigma_mm``, draw each step's points from that Gaussian (default) instead of
            weighting uniform draws by it: the same expected loss, with every point where the weight is.
        localiser_blend: weight ``w`` of the localiser's class probabilities in the segmentation written by
            :meth:`fit_and_sample` and ``__call__``: ``(1 - w) * NISF + w * localiser`` on every output voxel the
            localiser saw (read trilinearly between the input's slices, fading to NISF alone beyond the stack and
            on voxels a mask hides; see :class:`ProbabilityVolume`). The fitted code is unchanged, and what is read
            from the code alone (planes, meshes, measures) stays NISF's. 0 (default): NISF alone. On ACDC
            validation frames 0.5 raised Dice from 0.827 to 0.837 (``benchmarks/README.md``).
        localiser_blend_hidden: with ``localiser_blend``, also mix into the slices a mask hides the localiser's
            probabilities of the kept slices on either side, interpolated across the gap
            (``ProbabilityVolume(bridge_hidden=True)``); False (default) leaves hidden slices to NISF alone. With
            every other slice hidden, ACDC validation Dice on those slices rose from 0.825 to 0.831
            (``benchmarks/README.md``).
        output_region: a :class:`HeartRegion`: sampled outputs are read from the network only within it
            (background and intensity 0 beyond); None reads every voxel.

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
        heart_frame: bool = False,
        heart_locator: HeartLocator | None = None,
        heart_sigma_mm: float | None = None,
        localiser_weight: float = 0.0,
        draw_near_heart: bool = True,
        localiser_blend: float = 0.0,
        localiser_blend_hidden: bool = False,
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
        self.heart_frame = bool(heart_frame)
        self.heart_locator = heart_locator if heart_locator is not None else HeartLocator(seed=seed)
        if heart_sigma_mm is not None and not self.heart_frame:
            raise ValueError("heart_sigma_mm weights the loss around the heart frame's origin: set heart_frame too.")
        self.heart_sigma_mm = heart_sigma_mm
        if localiser_weight < 0:
            raise ValueError(f"localiser_weight must be >= 0, got {localiser_weight}.")
        self.localiser_weight = float(localiser_weight)
        self.draw_near_heart = bool(draw_near_heart)
        if not 0.0 <= localiser_blend <= 1.0:
            raise ValueError(f"localiser_blend must lie in [0, 1], got {localiser_blend}.")
        self.localiser_blend = float(localiser_blend)
        self.localiser_blend_hidden = bool(localiser_blend_hidden)
        if output_region is not None and not self.heart_frame:
            raise ValueError("output_region is measured from the heart frame's axis: set heart_frame too.")
        self.output_region = output_region

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
            _grid_affine(image), image.shape[2:], self.extent_mm, self.coordinate_mode, pose=pose, phase=phase_of(image)
        )

    @staticmethod
    def _check_input(inputs: torch.Tensor) -> MetaTensor:
        if not isinstance(inputs, MetaTensor):
            raise TypeError("LatentOptimisationInferer needs a MetaTensor (its affine places the voxels in space).")
        if inputs.dim() != 5 or inputs.shape[1] != 1:
            raise ValueError(
                f"expected a batch of 3D single-channel images (B, 1, X, Y, Z), got {tuple(inputs.shape)}."
            )
        return inputs

    def _cases(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[MetaTensor]:
        """Split the input into single cases ``(1, 1, X, Y, Z)``; a list may mix grids."""
        if isinstance(inputs, torch.Tensor):
            image = self._check_input(inputs)
            return [image[b : b + 1] for b in range(image.shape[0])]
        cases = []
        for item in inputs:
            case = item[None] if isinstance(item, torch.Tensor) and item.dim() == 4 else item
            cases.append(self._check_input(case))
        if not cases:
            raise ValueError("no images to fit.")
        return cases

    def locate(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: nn.Module,
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        groups: Sequence[Any] | None = None,
    ) -> None:
        """Estimate the heart pose of every case that has none (``heart_frame`` networks) and store it in the
        case's metadata (``POSE_KEY``), where :meth:`frame_of` and every later step read it. ``masks`` as in
        :meth:`fit`: only kept voxels are looked at. Cases of one group (``groups`` as in :meth:`fit`) get one pose,
        found on the group's frame earliest in the cycle. Does nothing for networks trained without the heart
        frame. For a cine network, first gives a frame without a cardiac phase phase 0 (with a warning)."""
        images = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        _check_phases(images, network)
        if not self.heart_frame:
            return
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 5 and inputs.shape[0] > 1 and pose_of(inputs) is None:
            raise ValueError(
                "a heart-frame network locates each case on its own: pass a list of images (1, X, Y, Z), not a batch."
            )
        case_masks = self._masks(masks, [image if image.dim() == 5 else image[None] for image in images])
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(self._device_type(network), enabled=False),
            flush_denormal(),
        ):
            for unit in code_groups(groups, len(images)):
                reference = _reference_case(images, unit)
                pose = pose_of(images[reference])
                if pose is None:
                    image = images[reference]
                    pose = self.heart_locator.locate(image, network, self.extent_mm, case_masks[reference])
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
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
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
        cases = self._cases(inputs)
        case_masks = self._masks(masks, cases)
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
            case_coords, case_targets = self._fit_points(cases, case_masks, device)
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
                loss = self._gradient(frozen, latent, coords, targets, generators, draw_cdfs)
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

    def _localiser_for(self, setting: str, weight: float, without: str) -> SliceLocaliser | None:
        """The heart locator's localiser when ``weight`` (the value of ``setting``) asks for it; without one, a
        warning saying what happens instead (``without``)."""
        if weight <= 0:
            return None
        localiser = getattr(self.heart_locator, "localiser", None)
        if localiser is None:
            logger.warning("%s is set but there is no localiser: %s.", setting, without)
        return localiser

    def _guide(self) -> SliceLocaliser | None:
        """The localiser whose probabilities join the fit (``localiser_weight``), or None."""
        return self._localiser_for("localiser_weight", self.localiser_weight, "the code is fitted to intensity alone")

    def blend_source(self, image: MetaTensor, mask: torch.Tensor | None = None) -> ProbabilityVolume | None:
        """The localiser's probabilities of one case ``(1, X, Y, Z)`` (or ``(1, 1, X, Y, Z)``) that :meth:`sample`
        mixes in (``localiser_blend``), voxels outside ``mask`` left out; None when nothing is mixed in."""
        localiser = self._localiser_for("localiser_blend", self.localiser_blend, "the segmentation is NISF's alone")
        if localiser is None:
            return None
        return ProbabilityVolume(
            localiser.probabilities(image), _grid_affine(image), mask, bridge_hidden=self.localiser_blend_hidden
        )

    def _fit_points(
        self, cases: list[MetaTensor], case_masks: list[torch.Tensor | None], device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per case, the network coordinates ``(3, P)`` of the voxels a code is fitted to (those its mask keeps)
        and their targets on ``device``: intensity ``(1, P)``, followed by the localiser's class probabilities
        ``(1 + M, P)`` when it guides the fit. A cine network's coordinates are ``(4, P)``, the frame's phase last."""
        coords, targets = [], []
        guide = self._guide()
        for case, mask in zip(cases, case_masks):
            mapping = self.frame_of(case)
            points = mapping.grid(mapping.affine, case.shape[2:]).T  # (3, P), or (4, P) with the phase
            values = case.as_tensor().reshape(1, -1).float()  # (1, P)
            if guide is not None:
                probs = guide.probabilities(case[0]).reshape(-1, values.shape[-1])
                values = torch.cat([values, probs.to(values)])
            if mask is not None:
                kept = mask.reshape(-1).nonzero().squeeze(1)
                points, values = points[:, kept.to(points.device)], values[:, kept.to(values.device)]
            coords.append(points.to(device))
            targets.append(values.float().clone().to(device))
        return coords, targets

    def _gradient(
        self,
        network: nn.Module,
        latent: torch.Tensor,
        coords: list[torch.Tensor],
        targets: list[torch.Tensor],
        generators: list[torch.Generator],
        draw_cdfs: list[torch.Tensor | None],
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
            group_loss = self._loss(network, latent[group], [points[b] for b in group], [values[b] for b in group])
            latent.grad += torch.autograd.grad(group_loss, [latent])[0]
            loss = loss + group_loss.detach()
        return loss

    @staticmethod
    def _masks(
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None, cases: list[MetaTensor]
    ) -> list[torch.Tensor | None]:
        """One boolean mask (or None) per case, checked against the case's grid."""
        if masks is None:
            return [None] * len(cases)
        if isinstance(masks, torch.Tensor):
            masks = [masks] if masks.dim() <= 4 and len(cases) == 1 else list(masks)
        if len(masks) != len(cases):
            raise ValueError(f"got {len(masks)} masks for {len(cases)} images.")
        checked: list[torch.Tensor | None] = []
        for b, (mask, case) in enumerate(zip(masks, cases)):
            if mask is None:
                checked.append(None)
                continue
            mask = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
            if tuple(mask.shape[-3:]) != tuple(case.shape[2:]) or mask.numel() != case.shape[2:].numel():
                raise ValueError(
                    f"mask {b} has shape {tuple(mask.shape)}, its image {tuple(case.shape[1:])}; "
                    "they must share the grid."
                )
            mask = mask.reshape(case.shape[2:]) != 0
            if not bool(mask.any()):
                raise ValueError(f"mask {b} keeps no voxel: nothing to fit the code to.")
            checked.append(mask)
        return checked

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
        """The cumulative heart weighting over a case's voxels ``coords`` (3, P) that :meth:`_draw` samples from
        (``draw_near_heart``), or None for uniform draws."""
        if not self._draws_near_heart:
            return None
        return heart_weights(coords, self.extent_mm, self.heart_sigma_mm).cpu().double().cumsum(0)

    def _draw(self, num_voxels: int, generator: torch.Generator, cdf: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of this step's points among a case's ``num_voxels``: uniform, or by inverse CDF from ``cdf``
        (:meth:`_draw_cdf`; unlike ``torch.multinomial``, no limit on the number of voxels)."""
        if self.num_points is None or self.num_points >= num_voxels:
            return torch.arange(num_voxels)
        if cdf is not None:
            uniform = torch.rand(self.num_points, generator=generator, dtype=torch.float64) * cdf[-1]
            return torch.searchsorted(cdf, uniform).clamp_max(num_voxels - 1)
        return torch.randint(num_voxels, (self.num_points,), generator=generator)

    @property
    def _draws_near_heart(self) -> bool:
        return self.draw_near_heart and self.heart_sigma_mm is not None and self.heart_sigma_mm > 0

    def _point_weights(self, points: torch.Tensor) -> torch.Tensor:
        """Loss weights of drawn points ``(B, 3, N)``: the heart weighting, unless the draw already followed it."""
        if self._draws_near_heart:
            return torch.ones_like(points[:, 0])
        return heart_weights(points, self.extent_mm, self.heart_sigma_mm)

    def _loss(
        self, network: nn.Module, latent: torch.Tensor, points: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> torch.Tensor:
        """Sum over cases of each case's weighted mean point loss plus its L2 term: every code gets the gradient
        it would get alone."""
        penalty = self.latent_weight * latent.pow(2).mean(dim=1).sum()
        if len({p.shape[-1] for p in points}) == 1:
            stacked = torch.stack(points)
            per_point = self._point_loss(network, latent, stacked, torch.stack(targets))
            return (per_point * self._point_weights(stacked)).mean(dim=1).sum() + penalty
        total = penalty
        for b, (p, t) in enumerate(zip(points, targets)):
            per_point = self._point_loss(network, latent[b : b + 1], p[None], t[None])
            total = total + (per_point * self._point_weights(p[None])).mean()
        return total

    def _point_loss(
        self, network: nn.Module, latent: torch.Tensor, points: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Loss per point ``(B, N)``: intensity BCE, plus ``localiser_weight`` times the cross-entropy of the
        segmentation head against the localiser's probabilities when the targets carry them."""
        seg_logits, logit = network.forward_heads(points, latent)
        loss = F.binary_cross_entropy_with_logits(logit[:, 0], targets[:, 0].clamp(0.0, 1.0), reduction="none")
        if targets.shape[1] > 1:
            guide = targets[:, 1:]
            loss = loss - self.localiser_weight * (guide * torch.log_softmax(seg_logits.float(), dim=1)).sum(dim=1)
        return loss

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
        localiser's probabilities of a single case (:meth:`blend_source`), mixed in with ``localiser_blend`` (the
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

    def blended(self, probs: torch.Tensor, blend: ProbabilityVolume, world: torch.Tensor) -> torch.Tensor:
        """NISF's class probabilities ``(1, M, N)`` mixed with the localiser's at the world points ``(N, 3)`` (what
        :meth:`sample` writes with ``blend``; public so probabilities already read can be mixed without a re-read)."""
        guide, weight = blend.at(world)
        return probs + self.localiser_blend * weight * (guide[None] - probs)

    def fit_and_sample(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: nn.Module,
        monitor: Callable[[int, torch.Tensor], None] | None = None,
        monitor_every: int = 0,
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
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
            image = self._check_input(inputs)
            affine, shape = target_grid(_grid_affine(image), image.shape[2:], self.target_spacing)
            labels, recon = self._sample_batch(network, latent, image, masks, affine, shape)
            return {
                "pred": self._as_meta(labels, image, affine),
                "recon": self._as_meta(recon, image, affine),
                "latent": latent,
            }
        outputs = []
        cases = self._cases(inputs)
        for b, (case, mask) in enumerate(zip(cases, self._masks(masks, cases))):
            affine, shape = target_grid(_grid_affine(case), case.shape[2:], self.target_spacing)
            mapping, blend = self.frame_of(case), self.blend_source(case, mask)
            own = torch.empty(shape, dtype=torch.uint8) if blend is not None else None
            labels, recon = self.sample(network, latent[b : b + 1], mapping, affine, shape, blend=blend, own_labels=own)
            output = {
                "pred": self._as_meta(labels, case, affine)[0],
                "recon": self._as_meta(recon, case, affine)[0],
                "latent": latent[b],
            }
            # NISF's own labels, read in the same pass: quality control needs them (the blend hides them in pred)
            output["code_labels"] = labels[0, 0] if own is None else own
            outputs.append(output)
        return outputs

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Class probabilities ``(B, M, X, Y, Z)`` on the input grid: the ``inferer(image, network)`` form
        MONAI's evaluators and MONAI Label use; ``masks=`` (keyword) as in :meth:`fit`."""
        image = self._check_input(inputs)
        latent = self.fit(image, network, masks=kwargs.get("masks"))
        affine = _grid_affine(image)
        probs, _ = self._sample_batch(network, latent, image, kwargs.get("masks"), affine, image.shape[2:], True)
        return self._as_meta(probs, image, affine)

    def _sample_batch(
        self,
        network: nn.Module,
        latent: torch.Tensor,
        image: MetaTensor,
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None,
        affine: Any,
        shape: Sequence[int],
        probabilities: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` of a batch on one grid: in one pass, or case by case when the localiser's probabilities,
        which belong to one case each, are mixed in."""
        if self.localiser_blend <= 0:
            return self.sample(network, latent, self.frame_of(image), affine, shape, probabilities)
        cases = self._cases(image)
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
            for b, (case, mask) in enumerate(zip(cases, self._masks(masks, cases)))
        ]
        return torch.cat([seg for seg, _ in parts]), torch.cat([recon for _, recon in parts])

    @staticmethod
    def _as_meta(data: torch.Tensor, image: MetaTensor, affine: Any) -> MetaTensor:
        out = MetaTensor(data, meta=dict(image.meta))
        affine = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
        shape = torch.as_tensor(data.shape[2:])
        if image.is_batch:
            out.is_batch = True
            out.affine = affine.expand(data.shape[0], 4, 4).clone()
            out.meta["spatial_shape"] = shape.expand(data.shape[0], -1).clone()
        else:
            out.affine = affine
            out.meta["spatial_shape"] = shape
        return out


def _check_phases(images: Sequence[torch.Tensor], network: nn.Module) -> None:
    """Frames and network must agree on time: a cine network (``coord_dim=5``) reads each frame at its phase, so a
    frame without one is read at phase 0 (end-diastole) with a warning; a per-frame network cannot read a phase."""
    coord_dim = int(getattr(network, "coord_dim", 3))
    for image in images:
        phase = phase_of(image)
        if coord_dim == CINE_COORD_DIM and phase is None:
            logger.warning(
                "%s has no cardiac phase (cardiac_phase): the cine network reads it as end-diastole (phase 0).",
                image.meta.get("filename_or_obj", "an image") if isinstance(image, MetaTensor) else "an image",
            )
            if isinstance(image, MetaTensor):
                image.meta[PHASE_KEY] = 0.0
        elif coord_dim == 3 and phase is not None:
            raise ValueError(
                "this network reads 3 coordinates (a per-frame model) but the image carries a cardiac phase: set "
                "cine_model to false, or use a network trained with cine_model true."
            )


def _grid_affine(image: MetaTensor) -> torch.Tensor:
    """The one affine of a (possibly collated) batch of images on a shared grid."""
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    if affine.ndim == 3:
        if not torch.allclose(affine, affine[:1].expand_as(affine), atol=1e-4):
            raise ValueError("all images of a batch must share one grid (affine); use batch_size 1.")
        affine = affine[0]
    return affine
