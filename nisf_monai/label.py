"""Former module of the MONAI Label helpers, now a re-export only: ``benchmarks/acdc_levers.py`` and
``benchmarks/levers_eval.py`` still import ``case_ids`` from here. Import :func:`nisf_monai.data.case_ids`,
:class:`nisf_monai.transforms.CaseIDd` and :class:`nisf_monai.transforms.ProbabilitiesToLabelsd` instead."""

from nisf_monai.data.datalist import case_ids
from nisf_monai.transforms.loading import CaseIDd
from nisf_monai.transforms.postprocessing import ProbabilitiesToLabelsd

__all__ = ["CaseIDd", "ProbabilitiesToLabelsd", "case_ids"]
