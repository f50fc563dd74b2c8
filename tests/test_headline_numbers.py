"""Headline numbers in README.md and docs/benchmarks.md are the numbers in their record files, as written there.

Each entry names the page, the sentence or table row that quotes a number (with ``{}`` where the number goes) and
how the number is read from its record file under ``benchmarks/results/``, at the precision the page prints. When a
benchmark is rerun and its record changes, or a page is edited, this fails until the page says what the record says.
Every bold number on the two pages must sit inside one of the checked texts, so a new headline needs its record too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
from helpers import REPO

RESULTS = REPO / "benchmarks" / "results"
PAGES = ("README.md", "docs/benchmarks.md")
LEVERS = "acdc_levers/FINAL_heart_extent100"


@cache
def _load(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def _record(path: str) -> dict:
    """The record at ``path`` under ``benchmarks/results/`` (read once per session)."""
    return _load(path)


def _clean_test_dice(path: str) -> np.ndarray:
    cases = _record(path)
    return np.array([case["dice"] for case in cases.values() if case["part"] == "clean"])


def _qc(split: str, part: str, key: str, root: str = "qc_v13") -> float:
    return _record(f"{root}/{split}/report_{split}.json")["parts"][part][key]


def _fraction(split: str, part: str, key: str, count: str, root: str = "qc_v13") -> str:
    entry = _record(f"{root}/{split}/report_{split}.json")["parts"][part]
    return f"{round(entry[key] * entry[count])} / {entry[count]}"


def _lever(name: str, key: str = "mean_dice") -> float:
    return _record(f"frame_levers/{name}.json")[key]


def _cine(run: str, key: str) -> dict:
    return _record("acdc_cine/test_dice.json")["dice"][run][key]


def _unet(folder: str) -> dict:
    return _record(f"{folder}/acdc_unet.json")["summary"]


def _agreement(path: str, measure: str, key: str = "mae") -> float:
    return _record(path)["agreement"][measure][key]


def _hidden(path: str, method: str) -> str:
    mean, std = _record(path)["summary"][method]["mean"]
    return f"{mean:.3f} ± {std:.3f}"


def _timing(row: str) -> float:
    return _record("acdc_cine_timing/timing.json")["runs"][row]["wall_s"]


def _snapshot_minutes(name: str) -> int:
    """CPU-minutes of the snapshot the shipped network is (``model_0070min.pt``)."""
    snapshots = _record(f"{LEVERS}/record.json")["snapshots"]
    return next(s["cpu_minutes"] for s in snapshots if s["path"].endswith(name))


def _localiser_minutes() -> float:
    return _record("acdc_levers/localiser_final_v9_cpu.json")["cpu_minutes"]


def _classes(values, digits: int = 3) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


LOCALISER_TEST = f"{LEVERS}/evaluation_test_localiser_estimate_model_0070min_v9ttaz_test.json"
MEASURES = "acdc_measures_v10/acdc_measures.json"
UNET_MEASURES = "acdc_unet117_v2/acdc_unet_measures.json"
HIDDEN = "acdc_interpolation_v10/hidden_slice_dice.json"
CINE_HIDDEN = "acdc_interpolation_test_cine/hidden_slice_dice.json"

# (page, text with {} for each number, (functions giving each number's text))
HEADLINES: list[tuple[str, str, tuple[Callable[[], str], ...]]] = [
    # README.md
    (
        "README.md",
        "(test Dice of the code {} against {})",
        (lambda: f"{_cine('cine', 'code_all')['mean']:.3f}", lambda: f"{_cine('per-frame', 'code_all')['mean']:.3f}"),
    ),
    (
        "README.md",
        "`bundle/models/model.pt` (the network, {} CPU-minutes of training) and `bundle/models/localiser.pt` (the "
        "heart localiser, {} CPU-minutes)",
        (lambda: str(_snapshot_minutes("model_0070min.pt")), lambda: f"{_localiser_minutes():.0f}"),
    ),
    (
        "README.md",
        "reaches a mean Dice of {} with 0.13.0's faster inference settings (LV {}, myocardium {}, RV {}; {} with "
        "0.12.0's)",
        (
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean():.3f}",
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean(0)[0]:.2f}",
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean(0)[1]:.2f}",
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean(0)[2]:.2f}",
            lambda: f"{_clean_test_dice('qc/test/cases.json').mean():.3f}",
        ),
    ),
    (
        "README.md",
        "a 2D UNet's {} after {} CPU-minutes, {} after {} (both on the 50 training patients) and {} after {} "
        "(more than NISF's {})",
        (
            lambda: f"{_unet('acdc_unet12')['mean'][0]:.3f}",
            lambda: f"{_record('acdc_unet12/acdc_unet.json')['budget_minutes']:.0f}",
            lambda: f"{_unet('acdc_unet30')['mean'][0]:.3f}",
            lambda: f"{_record('acdc_unet30/acdc_unet.json')['budget_minutes']:.0f}",
            lambda: f"{_unet('acdc_unet117')['mean'][0]:.3f}",
            lambda: f"{_record('acdc_unet117/acdc_unet.json')['budget_minutes']:.0f}",
            lambda: f"{_snapshot_minutes('model_0070min.pt') + _localiser_minutes():.0f}",
        ),
    ),
    (
        "README.md",
        "NISF's own labels reached {} and the localiser alone {} with 0.12.0's settings",
        (
            lambda: f"{_cine('per-frame', 'code_all')['mean']:.3f}",
            lambda: f"{_record(LOCALISER_TEST)['mean_dice'][0]:.3f}",
        ),
    ),
    # docs/benchmarks.md: segmentation on the test split
    (
        "docs/benchmarks.md",
        "`bundle/models/localiser.pt`: {} CPU-minutes,",
        (lambda: f"{_localiser_minutes():.1f}",),
    ),
    (
        "docs/benchmarks.md",
        "| written by `run inference`, 0.13.0's settings | **{}** | {} | `qc_v13/test/cases.json` (clean frames) |",
        (
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean():.3f}",
            lambda: _classes(_clean_test_dice("qc_v13/test/cases.json").mean(0)),
        ),
    ),
    (
        "docs/benchmarks.md",
        "| written, 0.12.0's settings (blend 0.5, largest component) | {} | {} |",
        (
            lambda: f"{_cine('per-frame', 'written_all')['mean']:.3f}",
            lambda: _classes(_cine("per-frame", "written_all")["classes"]),
        ),
    ),
    (
        "docs/benchmarks.md",
        "| NISF's code alone, 0.12.0's settings | {} | {} |",
        (
            lambda: f"{_cine('per-frame', 'code_all')['mean']:.3f}",
            lambda: _classes(_cine("per-frame", "code_all")["classes"]),
        ),
    ),
    (
        "docs/benchmarks.md",
        "| the localiser alone (rotations and zooms) | {} | |",
        (lambda: f"{_record(LOCALISER_TEST)['mean_dice'][0]:.3f}",),
    ),
    *[
        (
            "docs/benchmarks.md",
            row + " | {} | {} | `" + folder + "/acdc_unet.json` |",
            (
                lambda folder=folder: f"{_unet(folder)['mean'][0]:.3f}",
                lambda folder=folder: _classes(_unet(folder)[k][0] for k in ("LV", "Myo", "RV")),
            ),
        )
        for row, folder in (
            ("| 2D MONAI UNet, 12 CPU-minutes, 50 training patients", "acdc_unet12"),
            ("| 2D UNet, 30 CPU-minutes, 50 training patients", "acdc_unet30"),
            ("| 2D UNet, 117.2 CPU-minutes, the same 60 patients", "acdc_unet117"),
        )
    ],
    (
        "docs/benchmarks.md",
        "| the same UNet recipe run again (for its volumes) | {} | |",
        (lambda: f"{_unet('acdc_unet117_v2')['mean'][0]:.3f}",),
    ),
    # cine against per-frame
    (
        "docs/benchmarks.md",
        "| Dice, code alone | **{}** | {} |",
        (lambda: f"{_cine('per-frame', 'code_all')['mean']:.3f}", lambda: f"{_cine('cine', 'code_all')['mean']:.3f}"),
    ),
    (
        "docs/benchmarks.md",
        "| Dice, written segmentation | **{}** | {} |",
        (
            lambda: f"{_cine('per-frame', 'written_all')['mean']:.3f}",
            lambda: f"{_cine('cine', 'written_all')['mean']:.3f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "wall s (2 threads, idle machine) | {} | **{}** |",
        (
            lambda: f"{_timing('synthetic 25-frame cine | per-frame'):.1f}",
            lambda: f"{_timing('synthetic 25-frame cine | cine'):.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "| one subject (patient049 ED + ES), wall s | **{}** | {} |",
        (
            lambda: f"{_timing('ACDC subject, ED + ES | per-frame'):.1f}",
            lambda: f"{_timing('ACDC subject, ED + ES | cine'):.1f}",
        ),
    ),
    # clinical measures
    (
        "docs/benchmarks.md",
        "| NISF 0.11.0-0.13.0 (the code) | {} | {} | **{}** | {}, {} | {} |",
        (
            lambda: f"{_agreement(MEASURES, 'lv_edv_ml'):.1f}",
            lambda: f"{_agreement(MEASURES, 'lv_esv_ml'):.1f}",
            lambda: f"{_agreement(MEASURES, 'lv_ef_pct'):.1f}",
            lambda: f"{_agreement(MEASURES, 'lv_mass_g'):.1f}",
            lambda: f"{_agreement(MEASURES, 'lv_mass_g', 'bias'):+.1f}",
            lambda: f"{_agreement(MEASURES, 'rv_ef_pct'):.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "| 2D UNet, 117.2 CPU-minutes | {} | {} | {} | **{}, {}** | **{}** |",
        (
            lambda: f"{_agreement(UNET_MEASURES, 'lv_edv_ml'):.1f}",
            lambda: f"{_agreement(UNET_MEASURES, 'lv_esv_ml'):.1f}",
            lambda: f"{_agreement(UNET_MEASURES, 'lv_ef_pct'):.1f}",
            lambda: f"{_agreement(UNET_MEASURES, 'lv_mass_g'):.1f}",
            lambda: f"{_agreement(UNET_MEASURES, 'lv_mass_g', 'bias'):+.1f}",
            lambda: f"{_agreement(UNET_MEASURES, 'rv_ef_pct'):.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "NISF's myocardium is drawn too thick ({} g).",
        (lambda: f"{_agreement(MEASURES, 'lv_mass_g', 'bias'):+.0f}",),
    ),
    # held-out slices
    (
        "docs/benchmarks.md",
        "| NISF, written segmentation (0.11.0 files) | **{}** | `" + HIDDEN + "` |",
        (lambda: _hidden(HIDDEN, "nisf"),),
    ),
    ("docs/benchmarks.md", "| the cine model | {} | `" + CINE_HIDDEN + "` |", (lambda: _hidden(CINE_HIDDEN, "nisf"),)),
    (
        "docs/benchmarks.md",
        "| shape-based interpolation of the true labels | {} | `" + HIDDEN + "` |",
        (lambda: _hidden(HIDDEN, "shape_based"),),
    ),
    (
        "docs/benchmarks.md",
        "| nearest-slice copy of the true labels | {} | `" + HIDDEN + "` |",
        (lambda: _hidden(HIDDEN, "nearest"),),
    ),
    # quality control, 0.13.0 and the first read
    *[
        (
            "docs/benchmarks.md",
            f"| {split_name}, {part} | {frames} | {{}} | {{}} | {{}} |",
            (
                lambda split=split, part=part: f"{_qc(split, part, 'spearman'):.2f}",
                lambda split=split, part=part: _fraction(split, part, "warned_failing", "failing"),
                lambda split=split, part=part: _fraction(split, part, "warned_good", "good"),
            ),
        )
        for split_name, split, part, frames in (("validation", "val", "degraded", 40), ("test", "test", "degraded", 40))
    ],
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
    *[
        (
            "docs/benchmarks.md",
            f"| test, {part} | {frames} | {{}} | {{}} ({{}}) | {{}} ({{}}) |",
            (
                lambda part=part: f"{_qc('test', part, 'spearman', 'qc'):.2f}",
                lambda part=part: _fraction("test", part, "warned_failing", "failing", "qc"),
                lambda part=part: _fraction("test", part, "before_warned_failing", "failing", "qc"),
                lambda part=part: _fraction("test", part, "warned_good", "good", "qc"),
                lambda part=part: _fraction("test", part, "before_warned_good", "good", "qc"),
            ),
        )
        for part, frames in (("clean", 40), ("degraded", 40), ("all", 80))
    ],
    # cohort-scale inference
    (
        "docs/benchmarks.md",
        "| none (quality control already reads the inference outputs instead of sampling the grid again) "
        "| {} | {} | - |",
        (lambda: f"{_lever('baseline'):.4f}", lambda: f"{_lever('baseline', 'median_s')['total']:.1f}"),
    ),
    *[
        (
            "docs/benchmarks.md",
            f"{row} | {{}} | {{}} | {kept} |",
            (
                lambda name=name: f"{_lever(name):.4f}",
                lambda name=name: f"{_lever(name, 'median_s')['total']:.1f}",
            ),
        )
        for row, name, kept in (
            ("| `num_points 2048` per latent step (was 4096)", "points2048", "yes"),
            ("| `inference_steps 100` (was 200)", "steps100", "no: `num_points` halves the fit for less Dice"),
            ("| `localiser_refine_steps 20` (was 50)", "refine20", "yes"),
            ("| `localiser_zooms [1.0]` (was 1.0, 0.9, 1.1)", "zooms1", "yes"),
        )
    ],
    (
        "docs/benchmarks.md",
        "| `output_radius_mm 100`: outputs read near the heart only | {} (every frame equal) | {} | yes |",
        (lambda: f"{_lever('region100'):.4f}", lambda: f"{_lever('region100', 'median_s')['total']:.1f}"),
    ),
    (
        "docs/benchmarks.md",
        "| {} ({}); code alone {} ({}) | {} ({}) | shipped in 0.13.0 |",
        (
            lambda: f"{_lever('combined'):.4f}",
            lambda: f"{_lever('region100_code'):.4f}",
            lambda: f"{_lever('combined', 'mean_code_dice'):.4f}",
            lambda: f"{_lever('region100_code', 'mean_code_dice'):.4f}",
            lambda: f"{_lever('combined', 'median_s')['total']:.1f}",
            lambda: f"{_lever('region100_code', 'median_s')['total']:.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "the written segmentation scores {} (0.12.0: {}; LV {}, myocardium {}, RV {};",
        (
            lambda: f"{_clean_test_dice('qc_v13/test/cases.json').mean():.3f}",
            lambda: f"{_clean_test_dice('qc/test/cases.json').mean():.3f}",
            *(lambda k=k: f"{_clean_test_dice('qc_v13/test/cases.json').mean(0)[k]:.3f}" for k in range(3)),
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
        "side by side with the unbounded cache, peaked at {} MB of resident memory against {} MB, in {} s against {} s",
        (
            lambda: str(_record("cohort_memory.json")["runs"]["B"]["peak_mb"]),
            lambda: str(_record("cohort_memory.json")["runs"]["A"]["peak_mb"]),
            lambda: f"{_record('cohort_memory.json')['runs']['B']['seconds']:.1f}",
            lambda: f"{_record('cohort_memory.json')['runs']['A']['seconds']:.1f}",
        ),
    ),
    (
        "docs/benchmarks.md",
        "| 1 process | {} s | {} | {} MB | | `torchrun --nproc_per_node 2` | {} s | {} ({}x) | {} MB |",
        (
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['runs']['1']['wall_s']:.1f}",
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['runs']['1']['cases_per_hour']:.0f}",
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['runs']['1']['peak_mb']:.0f}",
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['runs']['2']['wall_s']:.1f}",
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['runs']['2']['cases_per_hour']:.0f}",
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['ratio_2_to_1']:.2f}",
            lambda: f"{_record('cohort_throughput_v014.json')['cohort']['runs']['2']['peak_mb']:.0f}",
        ),
    ),
    # the history's measures by version, in benchmarks/README.md
    (
        "benchmarks/README.md",
        "LV EF MAE {} (0.4.0, `acdc_measures_v5/`), {} (0.5.0, `_v6/`), {} (0.7.0 without zooms, `_v7/`), {} (0.8.0, "
        "`_v8/`), {} (0.9.0, `_v9/`), {} (0.11.0, `_v10/`)",
        tuple(
            (lambda v=v: f"{_agreement(f'acdc_measures_v{v}/acdc_measures.json', 'lv_ef_pct'):.1f}")
            for v in range(5, 11)
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


def _page(page: str) -> str:
    return " ".join((REPO / page).read_text().split())  # line breaks inside a sentence do not matter


def _expected(text: str, numbers: tuple) -> str:
    return text.format(*(number() for number in numbers))


@pytest.mark.parametrize("page, text, numbers", HEADLINES, ids=[f"{p}: {t[:40]}" for p, t, _ in HEADLINES])
def test_headline_number_matches_its_record(page: str, text: str, numbers: tuple) -> None:
    expected = _expected(text, numbers)
    assert expected in _page(page), f"{page} should say: {expected}"


# a bold number: a value, optionally with its spread, a second value or a count ("0.794 ± 0.106", "7.6, +1.2", "4 / 4")
BOLD_NUMBER = re.compile(r"\*\*[-+]?\d[\d.]*(?: ± \d[\d.]*)?(?:, [-+]?\d[\d.]*)?(?: / \d+)?\*\*")


@pytest.mark.parametrize("page", PAGES)
def test_every_bold_number_is_checked(page: str) -> None:
    """A bold number is a headline: it must lie inside a text this module checks against a record."""
    content = _page(page)
    spans = []
    for text in (_expected(text, numbers) for p, text, numbers in HEADLINES if p == page):
        start = content.find(text)
        while start >= 0:
            spans.append((start, start + len(text)))
            start = content.find(text, start + 1)
    unchecked = [
        m.group(0) for m in BOLD_NUMBER.finditer(content) if not any(a <= m.start() and m.end() <= b for a, b in spans)
    ]
    assert not unchecked, f"{page}: bold numbers with no record check: {unchecked}"


def test_a_changed_record_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: the same entry with a record moved by one printed digit no longer matches."""
    page, text, numbers = next(h for h in HEADLINES if h[1].startswith("| Dice, code alone"))
    moved = json.loads(json.dumps(_record("acdc_cine/test_dice.json")))
    moved["dice"]["per-frame"]["code_all"]["mean"] += 0.001
    real = _record
    monkeypatch.setitem(globals(), "_record", lambda path: moved if path == "acdc_cine/test_dice.json" else real(path))
    assert _expected(text, numbers) not in _page(page)
