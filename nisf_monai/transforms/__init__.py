from nisf_monai.transforms.coordinates import COORDINATE_MODES, CoordinateFrame, CoordinateGridd, RandPointSampled
from nisf_monai.transforms.loading import LoadCase, LoadCased, SelectFramed, describe_read_error, frame_name_formatter
from nisf_monai.transforms.masks import (
    MaskedScaleIntensityRangePercentilesd,
    RandPointMaskd,
    SliceMaskd,
    kept_slices,
    slice_selection,
)
from nisf_monai.transforms.validation import InvalidCaseError, ValidateCased, source_of

__all__ = [
    "COORDINATE_MODES",
    "CoordinateFrame",
    "CoordinateGridd",
    "InvalidCaseError",
    "LoadCase",
    "LoadCased",
    "MaskedScaleIntensityRangePercentilesd",
    "RandPointMaskd",
    "RandPointSampled",
    "SelectFramed",
    "SliceMaskd",
    "ValidateCased",
    "describe_read_error",
    "frame_name_formatter",
    "kept_slices",
    "slice_selection",
    "source_of",
]
