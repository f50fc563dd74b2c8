"""Errors about the user's data, and a compact report of them at the command line.

MONAI's bundle runner wraps an exception raised while a config is built in several layers of
``RuntimeError``; a user whose label file holds a wrong value should read one line that names the file
and the problem, not a hundred lines of traceback. :func:`report_input_errors` installs an exception
hook that does that for :class:`InputDataError` and prints everything else as usual.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = [
    "InputDataError",
    "InvalidCaseError",
    "DatalistError",
    "MissingFileError",
    "SettingsError",
    "NoUsableCaseError",
    "report_input_errors",
    "find_input_error",
]

TRACEBACK_ENV = "NISF_MONAI_TRACEBACK"


class InputDataError(ValueError):
    """A problem with the user's files or datalist (not with the code); the message says which and why."""


class InvalidCaseError(InputDataError):
    """A case (image and label files) that cannot be used."""


class DatalistError(InputDataError):
    """A datalist that is malformed or inconsistent."""


class MissingFileError(DatalistError, FileNotFoundError):
    """A datalist entry or folder that points to nothing."""


class NoUsableCaseError(InputDataError):
    """Every case of a run failed, so it produced nothing; each case's reason was logged as it failed."""


class SettingsError(InputDataError):
    """A setting (config id) whose value a run cannot use (see :mod:`nisf_monai.settings`). The message is
    ``<setting>: <what is wrong>; <what would be accepted>``: complete, so no traceback hint goes with it."""

    def __init__(self, setting: str, problem: str, accepted: str) -> None:
        super().__init__(f"{setting}: {problem}; {accepted}")
        self.setting, self.problem, self.accepted = setting, problem, accepted


def find_input_error(error: BaseException | None) -> InputDataError | None:
    """The first :class:`InputDataError` in an exception's cause/context chain, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputDataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_input_errors() -> None:
    """Make an uncaught :class:`InputDataError` print as one line (``NISF_MONAI_TRACEBACK=1`` restores the
    full traceback; a :class:`SettingsError` says all there is, so it gets no hint about it). Idempotent;
    other exceptions keep the current hook."""
    previous = sys.excepthook
    if getattr(previous, "_nisf_monai", False):
        return

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        found = find_input_error(error)
        if found is None or os.environ.get(TRACEBACK_ENV):
            previous(kind, error, tb)
            return
        hint = "" if isinstance(found, SettingsError) else f"\n(set {TRACEBACK_ENV}=1 to see the full traceback)"
        print(f"ERROR: {found}{hint}", file=sys.stderr)

    hook._nisf_monai = True  # type: ignore[attr-defined]
    sys.excepthook = hook
