"""The NISF coordinate network: one MLP shared by every case, conditioned on a latent code."""

from __future__ import annotations

import os

import torch
from torch import nn

from nisf_monai.networks.activations import GaborLayer, make_layer
from nisf_monai.networks.fused import autocast_enabled, gabor_network

__all__ = ["NISFNet", "saved_coord_dim"]


def saved_coord_dim(path: str | os.PathLike, latent_dim: int = 128, default: int = 3) -> int:
    """The coordinates per point (3, or 5 for a cine model) a saved network reads, from its first layer's width;
    ``default`` when there is no file yet (before training) or it holds no NISF network. Lets an inference config
    follow the weights it is given, so a per-frame ``model.pt`` and a cine one both load without a setting."""
    if not os.path.isfile(path):
        return default
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("model", "network"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        return default
    for name in ("layers.0.freq.weight", "layers.0.linear.weight"):
        weight = state.get(name)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return int(weight.shape[1]) - int(latent_dim)
    return default


class NISFNet(nn.Module):
    """Neural implicit segmentation function ``f(c, h) -> (segmentation logits, intensity logit)``.

    The latent code ``h`` is concatenated with the coordinate ``c`` at the input; a stack of residual
    layers (default 8 x 128, real Gabor wavelet activations) feeds two linear heads: ``num_classes``
    segmentation logits (softmax gives class probabilities) and one intensity logit (sigmoid gives the
    reconstructed intensity in [0, 1]). When ``latent_dim == hidden_dim`` the first layer adds ``h`` to its
    output as well, so the code also seeds the residual stream (as in the published NISF code).

    Coordinates are channel-first, like a MONAI image: ``(B, coord_dim, *spatial)``. A point set is the
    1-D case ``(B, coord_dim, N)``; a grid of coordinates is ``(B, coord_dim, X, Y, Z)``.

    Args:
        coord_dim: 3 for (x, y, z), 5 with the cardiac phase on a circle (the cine model).
        latent_dim: size of the per-case code.
        num_classes: segmentation classes, background included.
        hidden_dim: width of each residual layer.
        num_layers: number of residual layers.
        activation: 'gabor' (WIRE), 'siren' or 'relu'.
        omega0: frequency of the Gabor or sine activation.
        sigma0: Gaussian scale of the Gabor activation.
        fast_path: for the Gabor network, run the fused implementation (``fused.py``: same function and
            gradients, several times faster to train, differentiable once). False runs the plain maths
            through autograd, for double backward or ``torch.func`` transforms. TorchScript and autocast
            always take the plain maths.

    Example::

        net = NISFNet()
        coords = torch.rand(2, 3, 1000) - 0.5     # 2 cases, 1000 points each
        codes = torch.zeros(2, 128)
        seg_logits, intensity_logit = net.forward_heads(coords, codes)  # (2, 4, 1000), (2, 1, 1000)
    """

    def __init__(
        self,
        coord_dim: int = 3,
        latent_dim: int = 128,
        num_classes: int = 4,
        hidden_dim: int = 128,
        num_layers: int = 8,
        activation: str = "gabor",
        omega0: float = 10.0,
        sigma0: float = 10.0,
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background included), got {num_classes}.")
        self.coord_dim = coord_dim
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.latent_seeds_residual = latent_dim == hidden_dim
        self.layers = nn.ModuleList(
            [
                make_layer(
                    activation, coord_dim + latent_dim if i == 0 else hidden_dim, hidden_dim, omega0, sigma0, i == 0
                )
                for i in range(num_layers)
            ]
        )
        self.seg_head = nn.Linear(hidden_dim, num_classes)
        self.intensity_head = nn.Linear(hidden_dim, 1)
        self.gabor = all(isinstance(layer, GaborLayer) for layer in self.layers)
        self.fast_path = fast_path
        for layer in self.layers:
            if isinstance(layer, GaborLayer):
                layer.fused = fast_path

    @torch.jit.unused
    def _use_fused(self, points: torch.Tensor) -> bool:
        """The fused path covers the Gabor stack outside autocast (where the plain maths follows the
        autocast dtype); SIREN and ReLU ablations, ``fast_path=False`` and TorchScript use the plain one."""
        return self.fast_path and self.gabor and not autocast_enabled(points.device)

    def _features(self, points: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Shared features ``(B, N, hidden)`` of channel-last points ``(B, N, coord_dim)``: the network as
        written, code concatenated to every point, layer by layer (TorchScript, autocast, SIREN, ReLU)."""
        code = latent[:, None, :].expand(-1, points.shape[1], -1)
        x = torch.cat([points, code], dim=-1)
        first = True
        for layer in self.layers:
            if first:
                x = layer(x) + code if self.latent_seeds_residual else layer(x)
                first = False
            else:
                x = layer(x) + x
        return x

    def _check(self, coords: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        if coords.dim() < 3 or coords.shape[1] != self.coord_dim:
            raise ValueError(f"coordinates must be (B, {self.coord_dim}, *spatial), got shape {coords.shape}.")
        if latent is None:
            # the zero code is the centre of the latent prior: a population-average prediction
            return coords.new_zeros((coords.shape[0], self.latent_dim))
        if latent.dim() != 2 or latent.shape[0] != coords.shape[0] or latent.shape[1] != self.latent_dim:
            raise ValueError(f"latent must be (B={coords.shape[0]}, {self.latent_dim}), got shape {latent.shape}.")
        return latent

    def forward_heads(
        self, coords: torch.Tensor, latent: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads at once: ``(B, num_classes, *spatial)`` segmentation logits and ``(B, 1, *spatial)``
        intensity logits for coordinates ``(B, coord_dim, *spatial)`` and codes ``(B, latent_dim)``."""
        latent = self._check(coords, latent)
        batch = coords.shape[0]
        spatial = list(coords.shape[2:])
        points = coords.reshape(batch, self.coord_dim, -1).transpose(1, 2)
        seg, intensity = self._heads(points, latent.to(points.dtype))
        seg = seg.transpose(1, 2).reshape([batch, self.num_classes] + spatial)
        intensity = intensity.transpose(1, 2).reshape([batch, 1] + spatial)
        return seg, intensity

    def _heads(self, points: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-last ``(B, N, num_classes)`` and ``(B, N, 1)`` logits."""
        if torch.jit.is_scripting():
            features = self._features(points, latent)
            return self.seg_head(features), self.intensity_head(features)
        if self._use_fused(points):
            return self._fused_heads(points, latent)
        features = self._features(points, latent)
        return self.seg_head(features), self.intensity_head(features)

    @torch.jit.unused
    def _fused_heads(self, points: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-last logits of both heads through ``fused.gabor_network``: the whole network as one
        autograd node (first layer's code product once per frame, one product per layer, hand-written
        backward, chunked over the points on CPU)."""
        logits = gabor_network(
            self.layers, [self.seg_head, self.intensity_head], points, latent, self.latent_seeds_residual
        )
        return logits[..., : self.num_classes], logits[..., self.num_classes :]

    def forward(self, coords: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Segmentation logits ``(B, num_classes, *spatial)``: the image-in, logits-out form that MONAI's
        bundle tools (``verify_net_in_out``, TorchScript export, MONAI Label) expect. Without a latent,
        the zero code is used."""
        return self.forward_heads(coords, latent)[0]
