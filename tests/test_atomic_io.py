"""Outputs are never half-written: every JSON, CSV, PNG (and mesh and checkpoint) file the package writes goes
through ``nisf_monai.io.atomic_open``, and a failure or a kill in the middle of a write leaves the previous file."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nisf_monai.geometry.measures import write_csv
from nisf_monai.handlers import atomic_save
from nisf_monai.io import (
    atomic_open,
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    temporary_files,
)

PACKAGE = Path(__file__).resolve().parents[1] / "nisf_monai"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_write_replaces_the_whole_file(tmp_path: Path) -> None:
    """A write creates missing folders, replaces the old content completely, leaves no temporary file and gives
    the file the permissions a plain ``open()`` would."""
    path = tmp_path / "new" / "folder" / "report.json"
    atomic_write_json(path, {"a": [1, 2, 3]})
    atomic_write_json(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert atomic_write_text(tmp_path / "t.txt", "line\n") == str(tmp_path / "t.txt")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert temporary_files(path) == [] and sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    with open(tmp_path / "plain.json", "w") as f:
        f.write("{}")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)


def test_failure_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """An exception after half of the new content was written leaves the previous file as it was and removes
    the temporary file."""
    path = tmp_path / "rows.csv"
    atomic_write_text(path, "old,content\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(path, "w") as f:
        f.write("new,half")
        f.flush()
        assert temporary_files(path) and path.read_text() == "old,content\n"  # the half is elsewhere
        raise RuntimeError("disk full")
    assert path.read_text() == "old,content\n"
    assert temporary_files(path) == []


def test_process_killed_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """A process killed (SIGKILL: no cleanup at all) while writing leaves the previous file intact; what it had
    written sits in a hidden temporary file that nothing reads."""
    path = tmp_path / "measures.json"
    atomic_write_json(path, {"version": 1})
    script = (
        "import os, signal, sys\n"
        "from nisf_monai.io import atomic_open\n"
        "with atomic_open(sys.argv[1], 'w') as f:\n"
        '    f.write(\'{"version": 2, "cut": \')\n'
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert json.loads(path.read_text()) == {"version": 1}
    left = temporary_files(path)
    assert len(left) == 1 and left[0].read_text() == '{"version": 2, "cut": '


def test_unserialisable_json_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "qc.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"ok": object()})
    assert json.loads(path.read_text()) == {"ok": True} and temporary_files(path) == []


def test_figure_is_written_as_png_and_a_failing_one_keeps_the_previous(tmp_path: Path) -> None:
    """A matplotlib figure is written as PNG although the temporary file has no extension; a figure whose
    drawing fails half-way leaves the previous PNG."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "figures" / "curve.png"
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    atomic_save_figure(fig, path, dpi=50)
    plt.close(fig)
    previous = path.read_bytes()
    assert previous.startswith(PNG_SIGNATURE)

    class HalfDrawnFigure:
        def savefig(self, f, **kwargs) -> None:
            assert kwargs["format"] == "png"
            f.write(PNG_SIGNATURE + b"half a picture")
            raise ValueError("a text label could not be rendered")

    with pytest.raises(ValueError, match="could not be rendered"):
        atomic_save_figure(HalfDrawnFigure(), path)
    assert path.read_bytes() == previous and temporary_files(path) == []


def test_package_csv_writer_keeps_the_previous_file_on_failure(tmp_path: Path) -> None:
    """``write_csv`` (measures.csv, volumes.csv, agreement.csv) failing on its second row leaves the previous
    CSV, not a file holding a header and one row."""

    class Unformattable(float):
        def __format__(self, spec: str) -> str:
            raise ValueError("cannot format this value")

    path = tmp_path / "measures.csv"
    write_csv(path, [{"subject": "p1", "lv_edv_ml": 120.0}])
    previous = path.read_text()
    with pytest.raises(ValueError, match="cannot format"):
        write_csv(path, [{"subject": "p1", "lv_edv_ml": 130.0}, {"subject": "p2", "lv_edv_ml": Unformattable(1.0)}])
    assert path.read_text() == previous and "120.0000" in previous
    assert temporary_files(path) == []


def test_checkpoint_save_keeps_the_previous_file_on_failure(tmp_path: Path) -> None:
    """``atomic_save`` (model.pt, training_state.pt) goes through the same helper: an object that fails to
    pickle leaves the previous checkpoint loadable."""
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):  # "cannot pickle a local object"
        atomic_save({"w": torch.zeros(3), "bad": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert temporary_files(path) == []


def test_atomic_open_refuses_appending(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        with atomic_open(tmp_path / "log.txt", "a"):
            pass


# a direct write (file opened for writing, write_text/write_bytes, json.dump, savefig, savetxt to a path) anywhere
# else in the package would bypass the helper
DIRECT_WRITE = re.compile(
    r"""\bopen\([^)]*["'](?:w|wb|wt|a|ab|x|w\+)["']|\.write_text\(|\.write_bytes\(|json\.dump\(|\.savefig\(|\.to_csv\("""
)


def test_every_package_writer_goes_through_the_helper() -> None:
    """No module but ``nisf_monai/io.py`` writes a file directly (NIfTI images are written by nibabel and
    MONAI's ``SaveImage``, outside this rule)."""
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")):
        if source == PACKAGE / "io.py":
            continue
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if DIRECT_WRITE.search(line):
                offenders.append(f"{source.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
    assert DIRECT_WRITE.search('with open(path, "w", newline="") as f:') and DIRECT_WRITE.search("fig.savefig(p)")
    assert not DIRECT_WRITE.search('with atomic_open(path, "w") as f:') and not DIRECT_WRITE.search(
        "with open(path) as f:"
    )


def test_temporary_names_match_what_resume_cleans_up(tmp_path: Path) -> None:
    """The temporaries are ``.<name>.*.tmp``: the pattern ``TrainingStateHandler`` removes after a killed save."""
    path = tmp_path / "training_state.pt"
    with pytest.raises(KeyboardInterrupt), atomic_open(path, "wb") as f:
        names = [p.name for p in tmp_path.iterdir()]
        f.write(b"x")
        raise KeyboardInterrupt
    assert len(names) == 1 and re.fullmatch(r"\.training_state\.pt\..+\.tmp", names[0])
    assert not os.path.exists(path)
