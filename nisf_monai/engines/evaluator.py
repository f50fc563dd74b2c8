"""Evaluation by latent optimisation: a MONAI evaluator whose inference fits a code per case."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from nisf_monai.inferers import LatentOptimisationInferer

__all__ = ["LatentOptimisationEvaluator"]


class LatentOptimisationEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose iteration fits each case's latent code with a frozen network and then
    samples the segmentation on the inferer's target grid.

    The engine's output per batch: ``image``, ``label`` (when the data has one), ``pred`` (uint8 labels on the
    target grid, a MetaTensor with that grid's affine), ``recon`` (reconstructed intensity on the same grid)
    and ``latent`` (the fitted codes). Postprocessing (e.g. ``SaveImaged`` on ``pred`` and ``recon``) and
    metrics then work as for any MONAI evaluator.

    Args:
        inferer: the :class:`LatentOptimisationInferer` holding the optimisation settings.
        kwargs: as for ``SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, inferer: LatentOptimisationInferer, **kwargs: Any) -> None:
        super().__init__(*args, inferer=inferer, **kwargs)

    def _iteration(self, engine: LatentOptimisationEvaluator, batchdata: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image = batchdata[Keys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        engine.state.output = {Keys.IMAGE: image}
        if Keys.LABEL in batchdata:
            engine.state.output[Keys.LABEL] = batchdata[Keys.LABEL]
        with engine.mode(engine.network):
            with torch.autocast(device_type=torch.device(engine.state.device).type, enabled=bool(engine.amp), **engine.amp_kwargs):
                engine.state.output.update(engine.inferer.fit_and_sample(image, engine.network))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
