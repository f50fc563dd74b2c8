from nisf_monai.transforms.coordinates import COORDINATE_MODES, CoordinateFrame, CoordinateGridd, RandPointSampled
from nisf_monai.transforms.validation import InvalidCaseError, ValidateCased, source_of

__all__ = [
    "COORDINATE_MODES",
    "CoordinateFrame",
    "CoordinateGridd",
    "InvalidCaseError",
    "RandPointSampled",
    "ValidateCased",
    "source_of",
]
