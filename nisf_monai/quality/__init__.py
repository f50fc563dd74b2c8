from nisf_monai.quality.score import QualityScore
from nisf_monai.quality.signals import (
    class_agreement,
    lv_enclosure,
    lv_gap_slices,
    shape_signals,
    structure_pieces,
)

__all__ = [
    "QualityScore",
    "class_agreement",
    "lv_enclosure",
    "lv_gap_slices",
    "shape_signals",
    "structure_pieces",
]
