"""One number per case from its quality signals: the segmentation's predicted mean Dice, and a limit below which
the case is flagged for a look.

The model is a clipped linear map of a few named signals, fitted (``benchmarks/qc_calibration.py``) on validation
frames and on frames degraded on purpose until they fail, and shipped inside ``models/qc_reference.json`` under
``"score"``; a linear map stays readable: each weight says how much a signal moves the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QualityScore"]


@dataclass
class QualityScore:
    """Predicted Dice ``clip(bias + sum(weight * signal), 0, 1)`` and its warning limit.

    Args:
        features: names of the signals read (keys of the case's flat signal dict).
        weights: one weight per feature.
        bias: the prediction with every signal at zero.
        limit: a case whose predicted Dice is below this is flagged.
        fitted_on: a line saying what the model was calibrated on (kept in the JSON for whoever reads it).
    """

    features: Sequence[str]
    weights: Sequence[float]
    bias: float
    limit: float
    fitted_on: str = field(default="")

    def __post_init__(self) -> None:
        if len(self.features) != len(self.weights):
            raise ValueError(f"QualityScore needs one weight per feature, got {len(self.weights)} for {self.features}.")

    def predict(self, signals: Mapping[str, float | None]) -> float | None:
        """The predicted Dice of a case, or None when a signal it reads is missing (e.g. no localiser)."""
        total = float(self.bias)
        for name, weight in zip(self.features, self.weights):
            value = signals.get(name)
            if value is None:
                return None
            total += float(weight) * float(value)
        return min(max(total, 0.0), 1.0)

    def flags(self, predicted: float | None) -> bool:
        return predicted is not None and predicted < self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "weights": [float(w) for w in self.weights],
            "bias": float(self.bias),
            "limit": float(self.limit),
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityScore:
        return cls(
            features=list(data["features"]),
            weights=[float(w) for w in data["weights"]],
            bias=float(data["bias"]),
            limit=float(data["limit"]),
            fitted_on=str(data.get("fitted_on", "")),
        )
