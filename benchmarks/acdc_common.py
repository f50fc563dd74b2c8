"""What every ACDC subcommand of ``benchmarks/acdc.py`` shares: paths, the data's split, the shared options, Dice
and the JSON record.

The split is the one of ``../shared/data/README.md`` (test: patient number 4 mod 5; validation: 2 mod 10; training:
the rest), built by :func:`nisf_monai.data.build_datalist`. Every subcommand takes the same spelling of the options
it shares with the others (``--data``, ``--frames``, ``--offset``, ``--steps``, ``--tag``, ``--set``, ``--threads``,
``--work-dir``), so one run can be repeated with another subcommand without translating its arguments.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.metrics import DiceMetric

from nisf_monai.data import build_datalist, load_datalist, split_of

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DATA = REPO.parent / "shared" / "data" / "acdc"
RESULTS = REPO / "benchmarks" / "results"
CLASSES = ("LV", "Myo", "RV")  # bundle classes 1, 2, 3
NUM_CLASSES = 4


def command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of one subcommand, named as the user types it (``acdc.py NAME``), with its module's docstring."""
    return argparse.ArgumentParser(
        prog=f"acdc.py {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_options(parser: argparse.ArgumentParser, *names: str, **defaults: Any) -> None:
    """Add the shared options ``names`` (``data``, ``work_dir``, ``frames``, ``offset``, ``steps``, ``tag``, ``set``,
    ``threads``) to ``parser``; ``defaults`` sets a subcommand's own default, e.g. ``frames=10``."""
    specs: dict[str, tuple[str, dict]] = {
        "data": ("--data", {"default": str(DATA), "help": "ACDC folder (patientNNN/ and datalist.json)"}),
        "work_dir": ("--work-dir", {"default": "", "help": "folder the records are written to"}),
        "frames": ("--frames", {"type": int, "default": 0, "help": "first N frames of the part (0: all)"}),
        "offset": (
            "--offset",
            {"type": int, "default": 0, "help": "skip this many frames (or patients) first, to split a part"},
        ),
        "steps": ("--steps", {"default": "0,50,100,200,400", "help": "comma-separated latent steps scored"}),
        "tag": ("--tag", {"default": "", "help": "suffix of the record's file name"}),
        "set": (
            "--set",
            {
                "action": "append",
                "default": [],
                "metavar": "KEY=VALUE",
                "help": "config override (repeatable; the value is read as JSON when it parses)",
            },
        ),
        "threads": ("--threads", {"type": int, "default": 1, "help": "torch threads (one per process by default)"}),
    }
    for name in names:
        flag, spec = specs[name]
        parser.add_argument(flag, **{**spec, **({"default": defaults[name]} if name in defaults else {})})


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings into config overrides; a value is parsed as JSON where it can be, else kept a string."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def steps_of(text: str) -> list[int]:
    """``"0,100,200"`` -> ``[0, 100, 200]``."""
    return [int(s) for s in text.split(",") if s.strip()]


def require_data(data: str | Path) -> Path:
    """The ACDC folder, or exit with where it was looked for (ACDC is not distributed with the repository)."""
    path = Path(data)
    if not path.is_dir():
        sys.exit(f"ACDC data not found at {path} (see ../shared/data/README.md)")
    return path


def acdc_datalist(work: Path, parts: str = "split", data: str | Path = DATA) -> str:
    """The bundle datalist of the shared split, written into ``work``; ``parts='final'`` trains on training +
    validation (the shipped model's 60 patients)."""
    work.mkdir(parents=True, exist_ok=True)
    datalist = build_datalist(str(data), str(work / "datalist.json"))
    if parts == "final":
        full = json.loads(Path(datalist).read_text())
        full["training"] = full["training"] + full["validation"]
        datalist = str(work / "datalist_final.json")
        Path(datalist).write_text(json.dumps(full, indent=2))
    return datalist


def frames_of(datalist: str, part: str, frames: int = 0, offset: int = 0) -> list[dict]:
    """Frames ``offset .. offset + frames`` of one part, in the datalist's order (``frames`` 0: to the end)."""
    return load_datalist(datalist, part)[offset:][: frames or None]


def first_patients(entries: list[dict], limit: int) -> list[dict]:
    """The entries of the first ``limit`` patients (``subject``, sorted), both frames each; all when ``limit`` is 0."""
    if not limit:
        return entries
    keep = set(sorted({e["subject"] for e in entries})[:limit])
    return [e for e in entries if e["subject"] in keep]


def data_frames(part: str, data: str | Path = DATA) -> list[dict]:
    """The frames of one part of the split as the data's own ``datalist.json`` lists them (``id``, ``patient``,
    ``phase``, ``image``, ``label`` relative to ``data``), sorted by frame id; for runs that take files, not a
    bundle datalist."""
    frames = json.loads((Path(data) / "datalist.json").read_text())["frames"]
    return sorted((f for f in frames if split_of(int(f["patient"][-3:])) == part), key=lambda f: f["id"])


def dice_of(pred: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """Per-class Dice (LV, Myo, RV) of two label maps of one shape, with MONAI's DiceMetric on one-hot
    ``[1, C, ...]`` (background excluded; a class absent from both gives NaN)."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    p = F.one_hot(torch.as_tensor(pred).long(), NUM_CLASSES).movedim(-1, 0)[None]
    g = F.one_hot(torch.as_tensor(label).long(), NUM_CLASSES).movedim(-1, 0)[None]
    return metric(p, g)[0].numpy()


def write_record(path: str | Path, record: dict) -> Path:
    """Write one run's record as indented JSON (folders made as needed) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` gives it (timings mean little without it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def compute_seconds() -> float:
    """Process CPU time per torch thread: wall-clock time on an idle machine, and not shrunk by other processes."""
    return time.process_time() / max(1, torch.get_num_threads())


def inference_config(overrides: dict[str, Any] | None = None, *extra_configs: str) -> ConfigParser:
    """The bundle's ``inference.json`` (then ``extra_configs`` in order) with top-level ids overridden, as
    ``python -m monai.bundle run`` would read it with ``--id value``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), *extra_configs])
    parser.update({"bundle_root": str(REPO / "bundle"), **(overrides or {})})
    return parser


def fit_overrides(settings: dict[str, Any]) -> dict[str, Any]:
    """``--set`` settings of a latent fit as overrides of ``train.json``'s ``validate#inferer`` arguments. The inferer's
    arguments pass through; the levers that became parts of the inferer in 0.14.0 (``localiser_weight``,
    ``heart_sigma_mm``, ``draw_near_heart``) are given as those parts, so older runs' command lines still work."""
    out = dict(settings)
    if "localiser_weight" in out:
        out["fit_terms"] = [
            {"_target_": "nisf_monai.inferers.IntensityTerm"},
            {"_target_": "nisf_monai.inferers.LocaliserGuide", "weight": out.pop("localiser_weight")},
        ]
    if "heart_sigma_mm" in out or "draw_near_heart" in out:
        sigma = out.pop("heart_sigma_mm", "@heart_sigma_mm")
        weighting = {"_target_": "nisf_monai.inferers.HeartWeighting", "sigma_mm": sigma}
        weighting["draw"] = bool(out.pop("draw_near_heart", True))
        out["fit_weighting"] = weighting if sigma else None
    return out


def through_entry_point(module: str) -> NoReturn:
    """Exit with where a subcommand's module is run from now, so an old ``python benchmarks/MODULE.py`` command line
    fails loudly instead of doing nothing."""
    sys.exit(
        f"{Path(module).name} is a subcommand module: run python benchmarks/acdc.py SUBCOMMAND (--help lists them)"
    )
