"""Evaluation by latent optimisation: a MONAI evaluator whose inference fits a code per case."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from nisf_monai.data.dataset import SKIPPED_KEY, report_failed_cases
from nisf_monai.denormals import flush_denormal
from nisf_monai.engines.dice_curve import DiceCurveRecorder
from nisf_monai.inferers import LatentOptimisationInferer

__all__ = ["LatentOptimisationEvaluator"]

logger = logging.getLogger("nisf_monai")


class LatentOptimisationEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose iteration fits each case's latent code with a frozen network and then
    samples the segmentation on the inferer's target grid.

    Batches may be collated dicts (cases on one grid) or lists of case dicts (``monai.data.no_collation``,
    any grids): the cases of a batch are optimised together, one batched forward per step. The output per
    case: ``image``, ``label`` (when the data has one), ``pred`` (uint8 labels on the target grid, a
    MetaTensor with that grid's affine), ``recon`` (reconstructed intensity on that grid) and ``latent``;
    with ``monitor_every > 0`` and labels, also ``dice_curve`` (Dice per foreground class against the
    latent step, see :class:`DiceCurveRecorder`). A case's ``mask`` (boolean ``(1, X, Y, Z)``, e.g. from
    :class:`~nisf_monai.transforms.SliceMaskd` or a ``mask`` image in the datalist) limits the voxels its code
    is fitted to (see :meth:`LatentOptimisationInferer.fit`) and is passed on in the output. Cases that a
    :class:`~nisf_monai.data.SkippingDataset` marked as skipped are left out of the batch and listed in
    ``engine.state.skipped_cases`` (sources) and ``engine.state.failed_cases`` (``(source, reason)`` pairs,
    which :class:`~nisf_monai.handlers.FailedCasesHandler` writes to a file); ``engine.state.num_cases_done``
    counts the others. A run ends with a log line saying how many were skipped; a run in which every case was
    skipped stops before its metrics (there is nothing to compute them on) and raises
    :class:`~nisf_monai.errors.NoUsableCaseError`, so it exits non-zero. Postprocessing (``SaveImaged``,
    ``AsDiscreted``) and metrics then work as for any MONAI evaluator.

    Args:
        inferer: the :class:`LatentOptimisationInferer` holding the optimisation settings.
        monitor_every: record Dice every this many latent steps (0: never).
        monitor_points: voxels per case for those records.
        mask_key: key of the optional per-case mask of voxels to fit to.
        group_key: key of the cases' group label (``subject`` for the cine model): the cases of a batch with the same
            label share one code (see :meth:`LatentOptimisationInferer.fit`); the batches must hold whole groups
            (:class:`~nisf_monai.data.GroupBatchSampler`). None: every case has its own code.
        sample_outputs: sample ``pred`` and ``recon`` on the inferer's target grid; False leaves only the
            fitted ``latent`` (with ``image``), for a handler that samples and writes the outputs itself
            (:class:`~nisf_monai.handlers.StreamingSegmentationSaver`, whose memory does not grow with the grid).
        kwargs: as for ``SupervisedEvaluator``.
    """

    def __init__(
        self,
        *args: Any,
        inferer: LatentOptimisationInferer,
        monitor_every: int = 0,
        monitor_points: int = 32768,
        mask_key: str = "mask",
        group_key: str | None = None,
        sample_outputs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, inferer=inferer, **kwargs)
        self.sample_outputs = bool(sample_outputs)
        self.monitor_every = int(monitor_every)
        self.monitor_points = int(monitor_points)
        self.mask_key = mask_key
        self.group_key = group_key
        self.add_event_handler(Events.STARTED, self._reset_cases)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_nothing_usable)

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """Evaluate with subnormal floats flushed to zero (see :mod:`nisf_monai.denormals`), restoring the
        caller's setting afterwards; then account for skipped cases (after every handler and ignite's own
        messages, so that it is the run's last log line)."""
        with flush_denormal():
            super().run(global_epoch)
        state = self.state  # an empty loader never starts the engine: no case counts then
        report_failed_cases(
            getattr(state, "failed_cases", []),
            getattr(state, "num_cases_done", 0),
            getattr(state, "failed_cases_file", None),
        )

    def _register_metrics(self, k_metric: dict, add_metrics: dict | None = None) -> None:
        """Register metrics as MONAI does, each made to pass over an iteration whose cases were all skipped:
        its output is an empty list, on which MONAI's ``from_engine`` output transforms fail."""
        for metric in [*k_metric.values(), *(add_metrics or {}).values()]:
            metric.iteration_completed = _unless_all_skipped(metric.iteration_completed)
        super()._register_metrics(k_metric, add_metrics)

    @staticmethod
    def _reset_cases(engine: LatentOptimisationEvaluator) -> None:
        engine.state.skipped_cases, engine.state.failed_cases, engine.state.num_cases_done = [], [], 0
        engine.state.failed_cases_file = None

    @staticmethod
    def _stop_if_nothing_usable(engine: LatentOptimisationEvaluator) -> None:
        """After the last batch of a run in which every case was skipped, end the run without its epoch's
        metrics, which cannot be computed over no case (``run`` then raises)."""
        length = engine.state.epoch_length
        last = bool(length) and engine.state.iteration % length == 0
        if last and engine.state.num_cases_done == 0 and engine.state.failed_cases:
            engine.terminate()

    def _iteration(self, engine: LatentOptimisationEvaluator, batchdata: Any) -> Any:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        with (
            engine.mode(engine.network),
            torch.autocast(device_type=torch.device(device).type, enabled=bool(engine.amp), **engine.amp_kwargs),
        ):
            if isinstance(batchdata, (list, tuple)):
                engine.state.output = self._cases_iteration(engine, list(batchdata))
            else:
                image = batchdata[Keys.IMAGE].to(device, non_blocking=engine.non_blocking)
                engine.state.num_cases_done += int(image.shape[0])
                engine.state.output = {Keys.IMAGE: image}
                if Keys.LABEL in batchdata:
                    engine.state.output[Keys.LABEL] = batchdata[Keys.LABEL]
                mask = batchdata.get(self.mask_key)
                if mask is not None:
                    engine.state.output[self.mask_key] = mask
                if self.sample_outputs:
                    engine.state.output.update(engine.inferer.fit_and_sample(image, engine.network, masks=mask))
                else:
                    engine.state.output["latent"] = engine.inferer.fit(image, engine.network, masks=mask)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _cases_iteration(self, engine: LatentOptimisationEvaluator, cases: list[dict]) -> list[dict]:
        skipped = [case for case in cases if SKIPPED_KEY in case]
        if skipped:
            # reported by SkippingDataset; the batch goes on without them
            engine.state.skipped_cases += [c["source"] for c in skipped]
            engine.state.failed_cases += [(c["source"], c[SKIPPED_KEY]) for c in skipped]
            cases = [case for case in cases if SKIPPED_KEY not in case]
            engine.state.batch = cases
        if not cases:
            return []
        try:
            outputs = self._fit_cases(engine, cases)
        except Exception as error:  # one case's failure (a NaN, too little memory, ...) must not end a cohort
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            sources = [str(case.get("source", case[Keys.IMAGE].meta.get("filename_or_obj", "?"))) for case in cases]
            logger.error("fitting %s failed (%s): skipped, the run goes on", ", ".join(sources), reason)
            engine.state.failed_cases += [(source, reason) for source in sources]
            engine.state.batch = []
            return []
        engine.state.num_cases_done += len(cases)
        return outputs

    def _fit_cases(self, engine: LatentOptimisationEvaluator, cases: list[dict]) -> list[dict]:
        """Fit and sample one batch of usable cases; the outputs, one dict per case."""
        images = [case[Keys.IMAGE].to(engine.state.device) for case in cases]
        masks = [case.get(self.mask_key) for case in cases]
        kept = masks if any(m is not None for m in masks) else None
        groups = [str(case.get(self.group_key, b)) for b, case in enumerate(cases)] if self.group_key else None
        engine.inferer.locate(images, engine.network, kept, groups)  # poses first, for every frame below
        recorder = None
        if self.monitor_every > 0 and all(Keys.LABEL in case for case in cases):
            mappings = [engine.inferer.frame_of(image[None]) for image in images]
            recorder = DiceCurveRecorder(
                engine.network,
                images,
                [case[Keys.LABEL] for case in cases],
                mappings,
                int(engine.network.num_classes),
                self.monitor_points,
                seed=engine.inferer.seed,
            )
        if self.sample_outputs:
            outputs = engine.inferer.fit_and_sample(
                images, engine.network, recorder, self.monitor_every, masks=kept, groups=groups
            )
        else:
            latent = engine.inferer.fit(images, engine.network, recorder, self.monitor_every, masks=kept, groups=groups)
            outputs = [{"latent": code} for code in latent]
        for b, (case, output) in enumerate(zip(cases, outputs)):
            output[Keys.IMAGE] = images[b]
            if Keys.LABEL in case:
                output[Keys.LABEL] = case[Keys.LABEL]
            if masks[b] is not None:
                output[self.mask_key] = masks[b]
            if recorder is not None:
                output["dice_curve"] = recorder.curve(b)
        return outputs


def _unless_all_skipped(handler: Any) -> Any:
    """``handler(engine)`` for iterations with at least one case (the output of a wholly skipped batch is [])."""

    @functools.wraps(handler)
    def wrapper(engine: Any) -> None:
        output = engine.state.output
        if isinstance(output, list) and not output:
            return
        handler(engine)

    return wrapper
