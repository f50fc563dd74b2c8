"""Per-class Dice metrics for MONAI evaluators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.handlers import MeanDice

__all__ = ["class_dice_metrics"]


def class_dice_metrics(
    label_names: Sequence[str], pred_key: str = "pred", label_key: str = "label"
) -> dict[str, MeanDice]:
    """One MONAI ``MeanDice`` per foreground class, named ``dice_<class>``, on one-hot ``[C, *spatial]``
    predictions and labels of decollated outputs (``AsDiscreted(to_onehot=...)`` in postprocessing).
    Each keeps per-case details for ``MetricsSaver``."""

    def picker(channel: int) -> Any:
        def pick(output: Any) -> tuple[list, list]:
            items = output if isinstance(output, list) else [output]
            preds = [item[pred_key][[0, channel]] for item in items]
            labels = [item[label_key][[0, channel]] for item in items]
            return preds, labels

        return pick

    return {
        f"dice_{name}": MeanDice(include_background=False, output_transform=picker(c), save_details=True)
        for c, name in enumerate(label_names)
        if c > 0
    }
