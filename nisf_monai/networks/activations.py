"""Periodic and wavelet layers for coordinate networks.

Each layer is an affine map followed by a nonlinearity, so a network can swap WIRE for SIREN or ReLU
(the ablations of the NISF paper) without changing its structure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nisf_monai.networks.fused import autocast_enabled, gabor_activation, stacked_gabor_weights

__all__ = ["GaborLayer", "SineLayer", "ReLULayer", "make_layer", "ACTIVATIONS"]


class GaborLayer(nn.Module):
    """Real-valued Gabor wavelet layer of WIRE (Saragadam et al., CVPR 2023).

    ``y = cos(omega0 * (W_f x + b_f)) * exp(-(sigma0 * (W_s x + b_s))^2)``: a sinusoid under a Gaussian
    envelope, with separate affine maps for frequency and scale. WIRE keeps PyTorch's default ``nn.Linear``
    initialisation (uniform in +-1/sqrt(fan_in)); the wavelet's compact support makes a SIREN-style scheme
    unnecessary, so none is applied here.

    Args:
        in_features: size of the last input dimension.
        out_features: size of the last output dimension.
        omega0: frequency of the sinusoid (10 in WIRE and NISF).
        sigma0: width scale of the Gaussian envelope (10 in WIRE and NISF).
        fused: run the fused activation with its hand-written backward (faster, differentiable once);
            False runs the formula through autograd (double backward, ``torch.func`` transforms).
    """

    def __init__(
        self, in_features: int, out_features: int, omega0: float = 10.0, sigma0: float = 10.0, fused: bool = True
    ) -> None:
        super().__init__()
        self.omega0 = float(omega0)
        self.sigma0 = float(sigma0)
        self.fused = fused
        self.freq = nn.Linear(in_features, out_features)
        self.scale = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._plain(x)
        if not self.fused or autocast_enabled(x.device):  # under autocast the plain maths follows its dtype
            return self._plain(x)
        return self._fused(x)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        """The formula as written (TorchScript, autocast, ``fused=False``): each map its own product and
        autograd's backward."""
        phase = self.omega0 * self.freq(x)
        envelope = self.sigma0 * self.scale(x)
        return torch.cos(phase) * torch.exp(-envelope * envelope)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """Same maths with both maps in one product and the fused activation (see ``fused.py``)."""
        weight, bias = stacked_gabor_weights(self)
        return gabor_activation(nn.functional.linear(x, weight, bias))


class SineLayer(nn.Module):
    """SIREN layer ``sin(omega0 * (W x + b))`` with the SIREN initialisation (Sitzmann et al., 2020).

    The first layer draws weights from U(-1/fan_in, 1/fan_in); later layers from
    U(-sqrt(6/fan_in)/omega0, sqrt(6/fan_in)/omega0), which keeps activations arcsine-distributed.
    """

    def __init__(self, in_features: int, out_features: int, omega0: float = 30.0, is_first: bool = False) -> None:
        super().__init__()
        self.omega0 = float(omega0)
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if is_first else math.sqrt(6.0 / in_features) / self.omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega0 * self.linear(x))


class ReLULayer(nn.Module):
    """Plain ``relu(W x + b)`` layer, the non-periodic baseline."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


ACTIVATIONS = ("gabor", "siren", "relu")


def make_layer(
    activation: str, in_features: int, out_features: int, omega0: float, sigma0: float, is_first: bool
) -> nn.Module:
    """Build one hidden layer of the named kind ('gabor', 'siren' or 'relu')."""
    name = activation.lower()
    if name == "gabor":
        return GaborLayer(in_features, out_features, omega0=omega0, sigma0=sigma0)
    if name == "siren":
        return SineLayer(in_features, out_features, omega0=omega0, is_first=is_first)
    if name == "relu":
        return ReLULayer(in_features, out_features)
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
