"""A coarse 2D segmentation network that finds the heart, to seed the heart-frame pose of a new case.

Searching the pose by reconstruction alone (:class:`~nisf_monai.inferers.HeartLocator`'s grid search) found the
heart in about half of the ACDC test frames: a population-average image matches many places of a field of
view. A small slice-wise network trained on the same labels finds the ventricles directly; the centroids of
its coarse labels give the pose the same way the labels do in training (:func:`heart_pose`). It works at a
fixed in-plane spacing (1.5 mm by default, near ACDC's acquired 1.4-1.8 mm), so any scan resolution
looks alike to it. Its class probabilities, brought back to the image grid, can also guide the latent fit
(the fit term ``LocaliserGuide``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import DivisiblePad, KeepLargestConnectedComponent, Spacing, SpatialResample
from torch import nn

from nisf_monai.errors import SettingsError
from nisf_monai.transforms.heart_frame import checked_reference_volume, heart_pose

__all__ = ["SliceLocaliser", "load_localiser", "localiser_network", "localiser_stride"]

logger = logging.getLogger("nisf_monai")


def localiser_network(
    num_classes: int = 4, channels: tuple[int, ...] = (16, 32, 64, 128, 256), num_res_units: int = 2
) -> UNet:
    """The localiser: a MONAI 2D UNet on one-channel slices, ``len(channels)`` levels of stride 2."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
    )


def to_in_plane_spacing(volume: MetaTensor, spacing_mm: float, mode: str = "bilinear") -> MetaTensor:
    """``volume`` (C, X, Y, Z) at ``spacing_mm`` in-plane, slice spacing unchanged (-1 keeps it): the grid the
    localiser sees."""
    return Spacing(pixdim=(spacing_mm, spacing_mm, -1.0), mode=mode)(volume)


def onto_grid(values: MetaTensor, affine: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """``values`` (C, ...) resampled bilinearly onto the grid of ``affine`` and ``spatial_size``, edges extended:
    how the localiser's probabilities come back to another grid."""
    out = SpatialResample(mode="bilinear", padding_mode="border")(
        values, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=spatial_size
    )
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def localiser_stride(channels: tuple[int, ...]) -> int:
    """The total stride of :func:`localiser_network` with ``channels``: slices are padded to a multiple of it."""
    return 2 ** (len(channels) - 1)


class SliceLocaliser:
    """Coarse heart labels of a short-axis volume, predicted slice by slice at a fixed in-plane spacing, and the
    heart-frame pose their centroids give.

    Args:
        network: a 2D segmentation network of one-channel slices into the bundle's classes (logits).
        weights: a state dict file for ``network`` (as written by ``train_localiser.json``), or None if loaded.
        in_plane_mm: the in-plane spacing the network was trained at; slices keep their own spacing.
        divisor: each slice is padded at its end to a multiple of this (the network's total stride).
        slices_per_batch: slices predicted per forward pass.
        largest_component: take the pose from each class's largest connected component. A stray blob (an RV
            predicted in the liver, an LV in the aorta) drags a centroid by centimetres; on 20 ACDC validation
            frames the cleanup halved the median origin and angle errors (0.5.0; the write-up is in
            ``git show 773952f:benchmarks/README.md``).
        reference_volume_ml: scale the pose to an LV of this volume, as the network's training did
            (:class:`~nisf_monai.transforms.HeartPosed`); None for networks trained in world millimetres.
        rotations: in-plane angles (radians) at which every slice is also predicted, turned about its centre; the
            softmax of each is turned back and all are averaged (test-time augmentation within the rotations the
            localiser was trained with, ``train_localiser.json``'s ``rotate_range``). On the 20 ACDC validation
            frames 0 and +-0.15 raised the localiser's own Dice from 0.814 to 0.833 (0.7.0; the write-up is in
            ``git show 773952f:benchmarks/README.md``). The default, ``(0.0,)``, predicts each slice once.
        zooms: factors of ``in_plane_mm`` at which every slice is also predicted (a factor of 1.1 shows the heart
            10 % smaller), each brought back to the ``in_plane_mm`` grid and averaged, as ``rotations`` are (within
            the ``scale_range`` of 0.1 the localiser was trained with). The default, ``(1.0,)``, predicts at
            ``in_plane_mm`` alone.
    """

    def __init__(
        self,
        network: nn.Module,
        weights: str | Path | None = None,
        in_plane_mm: float = 1.5,
        divisor: int = 16,
        slices_per_batch: int = 32,
        largest_component: bool = True,
        reference_volume_ml: float | None = None,
        rotations: Sequence[float] = (0.0,),
        zooms: Sequence[float] = (1.0,),
    ) -> None:
        if in_plane_mm <= 0 or divisor < 1 or slices_per_batch < 1:
            raise ValueError("SliceLocaliser needs in_plane_mm > 0, divisor >= 1 and slices_per_batch >= 1.")
        self.rotations = tuple(float(angle) for angle in rotations)
        if not self.rotations or not all(math.isfinite(angle) for angle in self.rotations):
            raise ValueError(f"SliceLocaliser needs one or more finite rotations (radians), got {list(rotations)}.")
        self.zooms = tuple(float(zoom) for zoom in zooms)
        if not self.zooms or not all(math.isfinite(zoom) and zoom > 0 for zoom in self.zooms):
            raise ValueError(f"SliceLocaliser needs one or more positive zooms, got {list(zooms)}.")
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(
                    f"localiser weights not found: {weights} (train them with train_localiser.json)."
                )
            state = torch.load(weights, map_location="cpu", weights_only=True)
            try:
                network.load_state_dict(state)
            except RuntimeError as error:
                raise SettingsError(
                    "localiser_channels",
                    f"the weights in {weights} were trained as another localiser network",
                    "pass the localiser_channels and localiser_res_units they were trained with "
                    "(before version 0.4: [16, 32, 64, 128] and 1), or retrain with train_localiser.json",
                ) from error
        self.network = network.eval()
        self.in_plane_mm = float(in_plane_mm)
        self.divisor = int(divisor)
        self.slices_per_batch = int(slices_per_batch)
        self.largest_component = bool(largest_component)
        self.reference_volume_ml = checked_reference_volume(reference_volume_ml)
        # the last image predicted (values, affine) and its probabilities: one inference asks for the same image's
        # probabilities three times (pose, guide of the fit, blend), each costing len(rotations) x len(zooms) passes
        self._last: tuple[torch.Tensor, torch.Tensor, MetaTensor] | None = None

    def resample(self, volume: MetaTensor, mode: str = "bilinear", spacing_mm: float | None = None) -> MetaTensor:
        """``volume`` (C, X, Y, Z) at the localiser's in-plane spacing (or ``spacing_mm``), slice spacing unchanged
        (-1 keeps it)."""
        return to_in_plane_spacing(volume, self.in_plane_mm if spacing_mm is None else spacing_mm, mode)

    @staticmethod
    def _one_image(image: MetaTensor) -> MetaTensor:
        image = image[0] if image.dim() == 5 else image
        if not isinstance(image, MetaTensor) or image.dim() != 4:
            raise ValueError("SliceLocaliser needs one image (1, X, Y, Z) as a MetaTensor with its affine.")
        return image

    @torch.no_grad()
    def coarse_probabilities(self, image: MetaTensor) -> MetaTensor:
        """Class probabilities ``(M, X', Y', Z)`` of one image ``(1, X, Y, Z)`` scaled to [0, 1], predicted slice by
        slice at the localiser's in-plane spacing (averaged over ``rotations`` and ``zooms``), with that grid's
        affine. The answer for the last image is kept and given again while the values and affine asked about are
        equal (the network is taken as fixed once the localiser is built)."""
        image = self._one_image(image).float()
        values, affine = image.as_tensor(), torch.as_tensor(image.affine, dtype=torch.float64)
        last = self._last
        if last is not None and _equal(last[0], values) and _equal(last[1], affine):
            return last[2].clone()
        probs = self._averaged(image)
        self._last = (values.clone(), affine.clone(), probs)
        return probs.clone()

    def _averaged(self, image: MetaTensor) -> MetaTensor:
        """The probabilities of :meth:`coarse_probabilities`, computed."""
        reference = self._predicted(image, self.in_plane_mm) if 1.0 in self.zooms else None
        grid = reference if reference is not None else self.resample(image)
        total = torch.zeros(())
        for zoom in self.zooms:
            probs = reference if zoom == 1.0 else self._predicted(image, self.in_plane_mm * zoom)
            if zoom != 1.0:  # onto the localiser's own grid
                probs = onto_grid(probs, grid.affine, grid.shape[1:])
            total = total + (probs.as_tensor() if isinstance(probs, MetaTensor) else probs)
        return MetaTensor(total / len(self.zooms), affine=grid.affine)

    def _predicted(self, image: MetaTensor, spacing_mm: float) -> MetaTensor:
        """Probabilities ``(M, X', Y', Z)`` of ``image`` at the in-plane spacing ``spacing_mm``, averaged over
        ``rotations``, with that grid's affine."""
        resampled = self.resample(image, spacing_mm=spacing_mm)
        x, y = resampled.shape[1:3]
        padded = DivisiblePad((self.divisor, self.divisor, 1), method="end")(resampled).as_tensor()
        slices = padded.permute(3, 0, 1, 2)  # (Z, 1, X'', Y'')
        total = torch.zeros(())
        for angle in self.rotations:
            probs = self._softmax(_turned(slices, angle) if angle else slices)
            if angle:
                probs = _turned(probs, -angle)
                probs[:, 0] += (1.0 - probs.sum(1)).clamp_min(0.0)  # turned in from beyond the slice: background
            total = total + probs
        mean = (total / len(self.rotations)).permute(1, 2, 3, 0)[:, :x, :y]  # (M, X', Y', Z)
        return MetaTensor(mean, affine=resampled.affine)

    def _softmax(self, slices: torch.Tensor) -> torch.Tensor:
        device = next(self.network.parameters(), torch.empty(0)).device
        predictions = [
            torch.softmax(self.network(chunk.to(device)).float(), dim=1).cpu()
            for chunk in torch.split(slices, self.slices_per_batch)
        ]
        return torch.cat(predictions)

    def labels(self, image: MetaTensor, mask: torch.Tensor | None = None) -> MetaTensor:
        """Coarse label map ``(1, X', Y', Z)`` of one image ``(1, X, Y, Z)`` (or ``(1, 1, X, Y, Z)``) scaled to
        [0, 1], with its own affine; where a boolean ``mask`` of the image's grid is False the label is 0."""
        image = self._one_image(image)
        probs = self.coarse_probabilities(image)
        label = probs.as_tensor().argmax(0, keepdim=True)
        if mask is not None:
            kept = MetaTensor(torch.as_tensor(mask).reshape(image.shape).float(), affine=image.affine)
            label = label * (self.resample(kept, mode="nearest").as_tensor() > 0.5)
        return MetaTensor(label.to(torch.uint8), affine=probs.affine)

    def probabilities(self, image: MetaTensor) -> torch.Tensor:
        """Class probabilities ``(M, X, Y, Z)`` on the image's own grid: the coarse softmax resampled back
        (bilinearly in-plane; slices map onto themselves, so each slice's values come from that slice alone)."""
        image = self._one_image(image)
        back = onto_grid(self.coarse_probabilities(image), image.affine, image.shape[1:])
        return back / back.sum(0, keepdim=True).clamp_min(1e-6)

    def pose(self, image: MetaTensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The heart-frame pose (4 x 4, world mm -> heart mm) of the predicted labels, or None when no left
        ventricle is predicted."""
        label = self.labels(image, mask)
        if self.largest_component:
            classes = [int(c) for c in label.unique() if c > 0]
            if classes:
                label = KeepLargestConnectedComponent(applied_labels=classes)(label)
        return heart_pose(label.as_tensor(), label.affine, reference_volume_ml=self.reference_volume_ml)


def load_localiser(
    weights: str | Path,
    num_classes: int = 4,
    device: str | torch.device = "cpu",
    in_plane_mm: float = 1.5,
    channels: tuple[int, ...] = (16, 32, 64, 128, 256),
    num_res_units: int = 2,
    reference_volume_ml: float | None = None,
    rotations: Sequence[float] = (0.0,),
    zooms: Sequence[float] = (1.0,),
) -> SliceLocaliser | None:
    """The bundle's localiser from ``weights`` (:func:`localiser_network` with ``channels`` and ``num_res_units``,
    trained at ``in_plane_mm``; poses scaled to ``reference_volume_ml`` as the NISF network was trained; slices also
    predicted at ``rotations`` and ``zooms``, see :class:`SliceLocaliser`), or None
    with a warning when the file is missing, so that a bundle trained
    without one still runs (its pose is then searched by reconstruction)."""
    if not Path(weights).is_file():
        logger.warning(
            "no heart localiser at %s: the heart is searched by reconstruction alone, which misses it in "
            "about half of ACDC's frames; train one with configs/train_localiser.json.",
            weights,
        )
        return None
    network = localiser_network(num_classes, channels, num_res_units).to(device)
    return SliceLocaliser(
        network,
        weights,
        in_plane_mm=in_plane_mm,
        divisor=localiser_stride(channels),
        reference_volume_ml=reference_volume_ml,
        rotations=rotations,
        zooms=zooms,
    )


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


def _turned(slices: torch.Tensor, angle: float) -> torch.Tensor:
    """Slices ``(N, C, H, W)`` turned by ``angle`` (radians) about their centre, rigidly in pixel space (the pixels
    are square), zeros where nothing turns in."""
    cos, sin = math.cos(angle), math.sin(angle)
    half = torch.tensor([slices.shape[-1], slices.shape[-2]], dtype=torch.float32)  # (x, y) = (W, H)
    rotation = torch.tensor([[cos, -sin], [sin, cos]])
    theta = torch.zeros(slices.shape[0], 2, 3)
    # affine_grid works in [-1, 1] per axis: the pixel rotation R becomes D^-1 R D, D the half-sizes
    theta[:, :, :2] = rotation * half[None, :] / half[:, None]
    grid = F.affine_grid(theta, list(slices.shape), align_corners=False)
    return F.grid_sample(slices.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
