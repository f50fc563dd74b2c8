"""Renamed arguments, attributes and classes keep working for one release, with a ``FutureWarning``; after that
they raise an error that names the new name.

MONAI's :func:`monai.utils.deprecated_arg` / :func:`monai.utils.deprecated` do the work; they are given this
package's version, not MONAI's, so that ``since`` / ``removed`` refer to ``nisf_monai`` releases. Once the
version reaches ``RENAMED_REMOVED`` an old name raises ``monai.utils.DeprecatedError`` instead, a reminder to
delete the alias.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from monai.utils import DeprecatedError, deprecated, deprecated_arg
from monai.utils.module import version_leq

from nisf_monai import __version__

__all__ = ["RENAMED_REMOVED", "RENAMED_SINCE", "renamed_arg", "renamed_attribute", "renamed_class"]

# issue 12, "one vocabulary": subject -> case (latent table rows), CoordinateFrame -> CoordinateMapping
RENAMED_SINCE = "0.4.0"
RENAMED_REMOVED = "0.6.0"  # one release after the rename

T = TypeVar("T", type, Callable)


def renamed_arg(old: str, new: str) -> Callable[[T], T]:
    """Accept keyword ``old`` as ``new`` (with a ``FutureWarning``). The decorated callable keeps ``old`` in its
    signature (default None) and ignores it: the decorator has already passed its value on as ``new``."""
    return deprecated_arg(
        old,
        since=RENAMED_SINCE,
        removed=RENAMED_REMOVED,
        msg_suffix=f"Use `{new}` instead.",
        version_val=__version__,
        new_name=new,
    )


def renamed_class(new: type, old: str) -> type:
    """A subclass of ``new`` named ``old`` that warns when instantiated, so code written against the old name
    still runs (and ``isinstance(obj, new)`` holds for its objects)."""
    alias = type(
        old, (new,), {"__doc__": f"Deprecated alias of :class:`{new.__name__}`.", "__module__": new.__module__}
    )
    return deprecated(
        since=RENAMED_SINCE,
        removed=RENAMED_REMOVED,
        msg_suffix=f"Use `{new.__name__}` instead.",
        version_val=__version__,
    )(alias)


def renamed_attribute(old: str, new: str) -> property:
    """A property ``old`` that reads and writes attribute ``new``, with a ``FutureWarning`` on each use (an
    error from version ``RENAMED_REMOVED`` on, as for :func:`renamed_arg`)."""
    removed = version_leq(RENAMED_REMOVED, __version__)
    message = (
        f"Attribute `{old}` was removed in version {RENAMED_REMOVED}. Use `{new}` instead."
        if removed
        else f"Attribute `{old}` has been deprecated since version {RENAMED_SINCE}. It will be removed in version "
        f"{RENAMED_REMOVED}. Use `{new}` instead."
    )

    def warn() -> None:
        if removed:
            raise DeprecatedError(message)
        warnings.warn(message, FutureWarning, stacklevel=3)

    def fget(self: Any) -> Any:
        warn()
        return getattr(self, new)

    def fset(self: Any, value: Any) -> None:
        warn()
        setattr(self, new, value)

    return property(fget, fset, doc=f"Deprecated alias of ``{new}``.")
