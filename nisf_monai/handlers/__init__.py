from nisf_monai.handlers.cine_outputs import CineOutputJoiner, join_frames
from nisf_monai.handlers.failed_cases import FailedCasesHandler
from nisf_monai.handlers.hidden_slices import HiddenSliceReport
from nisf_monai.handlers.metrics import class_dice_metrics
from nisf_monai.handlers.quality_control import QualityControlHandler, case_quality, qc_reference
from nisf_monai.handlers.release_memory import ReleaseMemory
from nisf_monai.handlers.step_selection import StepSelectionHandler, select_step, selected_inference_steps
from nisf_monai.handlers.streaming_saver import StreamingSegmentationSaver
from nisf_monai.handlers.training_state import (
    CheckpointError,
    TrainingStateHandler,
    atomic_save,
    describe_state_mismatch,
)

__all__ = [
    "CineOutputJoiner",
    "join_frames",
    "CheckpointError",
    "describe_state_mismatch",
    "FailedCasesHandler",
    "HiddenSliceReport",
    "QualityControlHandler",
    "ReleaseMemory",
    "qc_reference",
    "StepSelectionHandler",
    "StreamingSegmentationSaver",
    "TrainingStateHandler",
    "atomic_save",
    "case_quality",
    "class_dice_metrics",
    "select_step",
    "selected_inference_steps",
]
