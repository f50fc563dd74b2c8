from nisf_monai.transforms.cine import LABELLED_KEY, CardiacPhased, FlagLabelledd
from nisf_monai.transforms.coordinates import (
    COORDINATE_MODES,
    PHASE_KEY,
    POSE_KEY,
    CoordinateFrame,
    CoordinateGridd,
    CoordinateMapping,
    RandPointSampled,
    phase_of,
    pose_of,
    world_grid,
)
from nisf_monai.transforms.figures import OverlayFigured, mid_ventricular_slice
from nisf_monai.transforms.heart_frame import HeartPosed, heart_pose, pose_matrix, split_pose, with_subject_poses
from nisf_monai.transforms.loading import (
    CaseIDd,
    LoadCase,
    LoadCased,
    SelectFramed,
    describe_read_error,
    frame_case_name,
    frame_name_formatter,
)
from nisf_monai.transforms.masks import (
    MaskedScaleIntensityRangePercentilesd,
    RandPointMaskd,
    SliceMaskd,
    kept_slices,
    slice_selection,
)
from nisf_monai.transforms.postprocessing import ProbabilitiesToLabelsd
from nisf_monai.transforms.validation import InvalidCaseError, ValidateCased, source_of

__all__ = [
    "CardiacPhased",
    "CaseIDd",
    "FlagLabelledd",
    "LABELLED_KEY",
    "PHASE_KEY",
    "phase_of",
    "with_subject_poses",
    "COORDINATE_MODES",
    "CoordinateFrame",
    "CoordinateGridd",
    "CoordinateMapping",
    "HeartPosed",
    "POSE_KEY",
    "InvalidCaseError",
    "LoadCase",
    "LoadCased",
    "MaskedScaleIntensityRangePercentilesd",
    "OverlayFigured",
    "ProbabilitiesToLabelsd",
    "RandPointMaskd",
    "RandPointSampled",
    "SelectFramed",
    "SliceMaskd",
    "ValidateCased",
    "describe_read_error",
    "frame_case_name",
    "frame_name_formatter",
    "heart_pose",
    "mid_ventricular_slice",
    "pose_matrix",
    "pose_of",
    "world_grid",
    "split_pose",
    "kept_slices",
    "slice_selection",
    "source_of",
]
