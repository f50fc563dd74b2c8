"""Per-case latent codes of an auto-decoder, addressed by case ID.

A case is one entry of the training datalist (one image, or one frame of a cine series); several cases of one
patient may share an ID, and so a code. The saved state holds the IDs under ``case_ids``; states written before
the rename (issue 12) hold them under ``subject_ids`` and load all the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import deprecated
from torch import nn

from nisf_monai import __version__
from nisf_monai.deprecation import RENAMED_REMOVED, RENAMED_SINCE, renamed_arg, renamed_attribute

__all__ = ["LatentTable", "saved_case_ids"]

logger = logging.getLogger("nisf_monai")

IDS_KEY = "case_ids"  # key of the IDs in the table's saved extra state
OLD_IDS_KEY = "subject_ids"  # the same key in files written before the rename; still read


def saved_case_ids(state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The case IDs of a saved table state (``[]`` if it holds none), under either key, so that training states
    and snapshots written before the rename still resume."""
    extra = state_dict.get(prefix + "_extra_state", {})
    if not isinstance(extra, Mapping):
        return []
    return list(extra.get(IDS_KEY, extra.get(OLD_IDS_KEY, [])))


class LatentTable(nn.Module):
    """One trainable code per training case, looked up by case ID rather than list position.

    Rows are held in sorted ID order and the IDs travel in the module's state, so a checkpoint restores
    each code onto its own case whatever order the datalist comes in. Lookups produce sparse
    gradients by default: with ``torch.optim.SparseAdam`` each code then keeps its own optimizer moments
    and moves only on the steps where its case is in the batch.

    Args:
        case_ids: IDs of the training cases (repeats are allowed and merged, e.g. several frames of
            one patient that share a code).
        latent_dim: size of each code.
        init_std: standard deviation of the N(0, init_std^2) initialisation (0.01, as in NISF).
        sparse: produce sparse gradients (use with ``SparseAdam``); dense ones otherwise.
        strict_cases: when loading a state, fail unless it holds exactly these cases; otherwise
            restore the cases in common, keep fresh codes for new ones and log both counts.
        subject_ids: former name of ``case_ids``, removed in 0.6.0 (raises an error naming ``case_ids``).
        strict_subjects: former name of ``strict_cases``, removed in 0.6.0 (raises an error naming it).
    """

    # the names before issue 12, for code that still reads or sets them (a FutureWarning each time)
    subject_ids = renamed_attribute("subject_ids", "case_ids")
    strict_subjects = renamed_attribute("strict_subjects", "strict_cases")

    @renamed_arg("subject_ids", "case_ids")
    @renamed_arg("strict_subjects", "strict_cases")
    def __init__(
        self,
        case_ids: Sequence[str],
        latent_dim: int = 128,
        init_std: float = 0.01,
        sparse: bool = True,
        strict_cases: bool = False,
        subject_ids: Sequence[str] | None = None,
        strict_subjects: bool | None = None,
    ) -> None:
        # subject_ids / strict_subjects: the decorators have passed their values on as case_ids / strict_cases
        super().__init__()
        ids = sorted({str(s) for s in case_ids})
        if not ids:
            raise ValueError("LatentTable needs at least one case ID; the training datalist is empty.")
        self.case_ids: list[str] = ids
        self._row = {s: i for i, s in enumerate(ids)}
        self.latent_dim = latent_dim
        self.sparse = sparse
        self.strict_cases = strict_cases
        self.weight = nn.Parameter(torch.randn(len(ids), latent_dim) * init_std)

    def __len__(self) -> int:
        return len(self.case_ids)

    def rows(self, case_ids: Sequence[str]) -> torch.Tensor:
        """Row indices (on the table's device) of the given case IDs."""
        try:
            index = [self._row[str(s)] for s in case_ids]
        except KeyError as err:
            raise KeyError(
                f"case {err.args[0]!r} has no latent code; the table holds {len(self)} cases "
                f"(e.g. {self.case_ids[:3]}). Was the table built from another datalist?"
            ) from None
        return torch.as_tensor(index, dtype=torch.long, device=self.weight.device)

    def forward(self, case_ids: Sequence[str]) -> torch.Tensor:
        """Codes ``(B, latent_dim)`` of the given cases."""
        return F.embedding(self.rows(case_ids), self.weight, sparse=self.sparse)

    def get_extra_state(self) -> dict[str, Any]:
        return {IDS_KEY: list(self.case_ids), "latent_dim": self.latent_dim}

    def set_extra_state(self, state: Any) -> None:
        # the ID map is applied while loading the weights (see _load_from_state_dict)
        pass

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight_key, extra_key = prefix + "weight", prefix + "_extra_state"
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            return
        saved = state_dict[weight_key]
        saved_ids = saved_case_ids(state_dict, prefix)
        if not saved_ids:
            error_msgs.append(f"{extra_key}: the checkpoint holds no case IDs; it is not a LatentTable state.")
            return
        if saved.ndim != 2 or saved.shape != (len(saved_ids), saved.shape[1]):
            error_msgs.append(f"{weight_key}: expected {len(saved_ids)} rows, found shape {tuple(saved.shape)}.")
            return
        if saved.shape[1] != self.latent_dim:
            error_msgs.append(
                f"{weight_key}: the checkpoint's codes have latent_dim {saved.shape[1]}, this table has "
                f"{self.latent_dim}; set latent_dim to {saved.shape[1]} or train a new table."
            )
            return
        saved_set = set(saved_ids)
        common = [s for s in self.case_ids if s in saved_set]
        new = len(self) - len(common)
        dropped = len(saved_ids) - len(common)
        if self.strict_cases and (new or dropped):
            only_here = [s for s in self.case_ids if s not in saved_set][:3]
            only_saved = sorted(saved_set - set(self.case_ids))[:3]
            error_msgs.append(
                f"{weight_key}: the checkpoint holds {len(saved_ids)} cases and this table {len(self)}; "
                f"{new} are missing from the checkpoint (e.g. {only_here}) and {dropped} are not in the datalist "
                f"(e.g. {only_saved}). Set strict_cases to false to restore the {len(common)} in common."
            )
            return
        saved_row = {s: i for i, s in enumerate(saved_ids)}
        with torch.no_grad():
            if common:
                target = self.rows(common)
                source = torch.as_tensor([saved_row[s] for s in common], dtype=torch.long)
                self.weight[target] = saved[source].to(self.weight)
        if new or dropped:
            logger.info(
                "latent table: restored %d codes by case ID, %d new cases start fresh, "
                "%d checkpoint cases not in the datalist were dropped",
                len(common),
                new,
                dropped,
            )

    def same_cases(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether a saved table state holds exactly this table's cases (then row-wise optimizer
        state can be restored as well)."""
        return saved_case_ids(state_dict) == self.case_ids

    @deprecated(
        since=RENAMED_SINCE, removed=RENAMED_REMOVED, msg_suffix="Use `same_cases` instead.", version_val=__version__
    )
    def same_subjects(self, state_dict: Mapping[str, Any]) -> bool:
        """Deprecated name of :meth:`same_cases`."""
        return self.same_cases(state_dict)
