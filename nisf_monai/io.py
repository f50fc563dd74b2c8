"""Writing output files all-or-nothing.

A run over thousands of scans can be killed at any moment (a time limit, a full disk, Ctrl-C). A JSON, CSV or
PNG that was being written then must not be left half-written under its final name, where a later step or a
person would read it as complete. Every writer of the package goes through :func:`atomic_open`: the content
goes to a temporary file beside the target (same folder, so the same file system) and is renamed over the
target only once it is complete and flushed to disk. A failure or a kill before that leaves the previous file
untouched; at worst a hidden ``.<name>.*.tmp`` file remains, which nothing reads.

Also here: :func:`json_safe` (JSON has no NaN) and :func:`save_nifti`, the package's one NIfTI writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_figure",
    "json_safe",
    "save_nifti",
    "temporary_files",
]

_WRITE_MODES = ("w", "wt", "wb")


def temporary_files(path: str | os.PathLike) -> list[Path]:
    """Temporaries that an interrupted :func:`atomic_open` of ``path`` left behind (``.<name>.*.tmp``)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _readable_by_all(fd: int) -> None:
    """Give a temporary the permissions ``open()`` would give a new file: ``mkstemp`` makes it private, but an
    output is as readable as any other file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open ``path`` for writing so that it is replaced only when the ``with`` block completes.

    Yields a file object on a temporary file beside ``path`` (``kwargs`` go to :func:`open`, e.g.
    ``newline=""`` for :mod:`csv`). On a clean exit the file is flushed, synced and renamed over ``path``;
    on an exception it is removed and the exception propagates, so ``path`` keeps its previous content.
    Missing parent folders are created.
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_open writes a whole file: mode must be one of {_WRITE_MODES}, got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _readable_by_all(fd)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` all-or-nothing; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return str(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` to ``path`` all-or-nothing; returns the path."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return str(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kwargs: Any) -> str:
    """Write ``obj`` as JSON to ``path`` all-or-nothing; returns the path. The object is serialised before
    any file is opened, so one that cannot be serialised leaves no trace. ``kwargs`` go to :func:`json.dumps`."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs))


def atomic_save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """``fig.savefig`` (matplotlib) to ``path`` all-or-nothing; returns the path. The format comes from the
    extension (PNG by default), since the temporary file's name has none; ``kwargs`` go to ``savefig``."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".").lower() or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **kwargs)
    return str(path)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has none of them), numpy arrays and numbers as lists
    and Python numbers, mapping keys as strings; through dicts, lists and tuples."""
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_nifti(
    array: Any, affine: Any, path: str | os.PathLike, dtype: Any = None, time_unit: str | None = None
) -> str:
    """Write an array as NIfTI with the affine as sform and qform (scanner space), millimetre units (and
    ``time_unit``, e.g. ``"sec"``, when given); missing folders are created. Returns the path."""
    data = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm", t=time_unit)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    nib.save(image, str(path))
    return str(path)
