from nisf_monai.data.builder import ACDC_LABEL_MAPPING, build_datalist, read_label_mapping, split_of
from nisf_monai.data.datalist import (
    case_id,
    case_ids,
    case_name,
    expand_cine_datalist,
    labelled_entries,
    list_images,
    load_datalist,
    subject_of_case,
)
from nisf_monai.data.dataset import (
    FAILED_CASES_FILENAME,
    SKIPPED_KEY,
    SkippingDataset,
    report_failed_cases,
    write_failed_cases,
)
from nisf_monai.data.phases import (
    ASSUMED_CINE_LENGTH,
    assign_cardiac_phases,
    cardiac_phase,
    frame_index_from_name,
)
from nisf_monai.data.resume import is_written, pending_entries
from nisf_monai.data.sampler import GroupBatchSampler

__all__ = [
    "is_written",
    "pending_entries",
    "ASSUMED_CINE_LENGTH",
    "GroupBatchSampler",
    "assign_cardiac_phases",
    "cardiac_phase",
    "frame_index_from_name",
    "labelled_entries",
    "subject_of_case",
    "FAILED_CASES_FILENAME",
    "SKIPPED_KEY",
    "SkippingDataset",
    "report_failed_cases",
    "write_failed_cases",
    "ACDC_LABEL_MAPPING",
    "build_datalist",
    "read_label_mapping",
    "split_of",
    "case_id",
    "case_ids",
    "case_name",
    "expand_cine_datalist",
    "list_images",
    "load_datalist",
    "LABELS",
    "ensure_demo_case",
    "ensure_synthetic_cohort",
    "generate_cohort",
    "generate_subject",
]

_SYNTHETIC = ("LABELS", "ensure_demo_case", "ensure_synthetic_cohort", "generate_cohort", "generate_subject")


def __getattr__(name: str):
    # imported lazily so that ``python -m nisf_monai.data.synthetic`` does not find the module already imported
    if name in _SYNTHETIC:
        from nisf_monai.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
