"""Headline numbers in README.md and docs/ are the numbers in their record files, as written there.

Each entry names the page, the sentence or table row that quotes a number (with ``{}`` where the number goes), the
record file under ``benchmarks/results/`` and how the number is read from it. When a benchmark is rerun and its
record changes, this fails until the page says what the record says.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from helpers import REPO

RESULTS = REPO / "benchmarks" / "results"


def _record(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def _clean_test_dice(path: str) -> np.ndarray:
    cases = _record(path)
    return np.array([case["dice"] for case in cases.values() if case["part"] == "clean"])


def _qc(split: str, part: str, key: str) -> float:
    return _record(f"qc_v13/{split}/report_{split}.json")["parts"][part][key]


def _fraction(split: str, part: str, key: str, count: str) -> str:
    entry = _record(f"qc_v13/{split}/report_{split}.json")["parts"][part]
    return f"{round(entry[key] * entry[count])} / {entry[count]}"


def _lever(name: str, key: str = "mean_dice") -> float:
    return _record(f"frame_levers/{name}.json")[key]


# (page, text with {} for each number, (functions giving each number's text))
HEADLINES: list[tuple[str, str, tuple[Callable[[], str], ...]]] = [
    (
        "README.md",
        "reaches a mean Dice of {} with 0.13.0's faster inference settings",
        (lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean():.3f}",),
    ),
    (
        "README.md",
        "RV {}; {} with 0.12.0's)",
        (
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean(0)[2]:.2f}",
            lambda: f"{_clean_test_dice('qc/test/cases.json').mean():.3f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "| test, clean | 40 | **{}** | **{}** | **{}** |",
        (
            lambda: f"{_qc('test', 'clean', 'spearman'):.2f}",
            lambda: _fraction("test", "clean", "warned_failing", "failing"),
            lambda: _fraction("test", "clean", "warned_good", "good"),
        ),
    ),
    (
        "docs/benchmarks.md",
        "| test, all | 80 | **{}** | **{}** | **{}** |",
        (
            lambda: f"{_qc('test', 'all', 'spearman'):.2f}",
            lambda: _fraction("test", "all", "warned_failing", "failing"),
            lambda: _fraction("test", "all", "warned_good", "good"),
        ),
    ),
    (
        "docs/benchmarks.md",
        "| none (quality control already reads the inference outputs instead of sampling the grid again) "
        "| {} | {} | - |",
        (lambda: f"{_lever('baseline'):.4f}", lambda: f"{_lever('baseline', 'median_s')['total']:.1f}"),
    ),
    (
        "docs/benchmarks.md",
        "| {} (0.9089); code alone {} (0.8875) | {} (9.9) | shipped in 0.13.0 |",
        (
            lambda: f"{_lever('combined'):.4f}",
            lambda: f"{_lever('combined', 'mean_code_dice'):.4f}",
            lambda: f"{_lever('combined', 'median_s')['total']:.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "**0.12.0 {} s, 0.13.0 {} s**",
        (
            lambda: f"{_record('frame_v012_vs_v013.json')['median_s']['0.12.0 (04174e5)']:.1f}",
            lambda: f"{_record('frame_v012_vs_v013.json')['median_s']['0.13.0']:.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "| 1 process | {} s | {} | {} MB |",
        (
            lambda: f"{_record('cohort_throughput.json')['cohort']['runs']['1']['wall_s']:.1f}",
            lambda: f"{_record('cohort_throughput.json')['cohort']['runs']['1']['cases_per_hour']:.0f}",
            lambda: f"{_record('cohort_throughput.json')['cohort']['runs']['1']['peak_mb']:.0f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "| `torchrun --nproc_per_node 2` | {} s | {} ({}x) | {} MB |",
        (
            lambda: f"{_record('cohort_throughput.json')['cohort']['runs']['2']['wall_s']:.1f}",
            lambda: f"{_record('cohort_throughput.json')['cohort']['runs']['2']['cases_per_hour']:.0f}",
            lambda: f"{_record('cohort_throughput.json')['cohort']['ratio_2_to_1']:.2f}",
            lambda: f"{_record('cohort_throughput.json')['cohort']['runs']['2']['peak_mb']:.0f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "the written labels agreed on every voxel ({} of {} patients)",
        (
            lambda: str(sum(r["voxel_agreement"] == 1.0 for r in _record("dicom_check.json")["rows"])),
            lambda: str(len(_record("dicom_check.json")["rows"])),
        ),
    ),
]


@pytest.mark.parametrize("page, text, numbers", HEADLINES, ids=[f"{p}: {t[:40]}" for p, t, _ in HEADLINES])
def test_headline_number_matches_its_record(page: str, text: str, numbers: tuple) -> None:
    expected = text.format(*(number() for number in numbers))
    content = " ".join((REPO / page).read_text().split())  # line breaks inside a sentence do not matter
    assert expected in content, f"{page} should say: {expected}"
