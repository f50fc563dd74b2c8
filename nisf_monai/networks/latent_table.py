"""Per-subject latent codes of an auto-decoder, addressed by subject ID."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LatentTable"]

logger = logging.getLogger("nisf_monai")


class LatentTable(nn.Module):
    """One trainable code per training subject, looked up by subject ID rather than list position.

    Rows are held in sorted ID order and the IDs travel in the module's state, so a checkpoint restores
    each code onto its own subject whatever order the datalist comes in. Lookups produce sparse
    gradients by default: with ``torch.optim.SparseAdam`` each code then keeps its own optimizer moments
    and moves only on the steps where its subject is in the batch.

    Args:
        subject_ids: IDs of the training subjects (repeats are allowed and merged, e.g. several frames of
            one subject that share a code).
        latent_dim: size of each code.
        init_std: standard deviation of the N(0, init_std^2) initialisation (0.01, as in NISF).
        sparse: produce sparse gradients (use with ``SparseAdam``); dense ones otherwise.
        strict_subjects: when loading a state, fail unless it holds exactly these subjects; otherwise
            restore the subjects in common, keep fresh codes for new ones and log both counts.
    """

    def __init__(
        self,
        subject_ids: Sequence[str],
        latent_dim: int = 128,
        init_std: float = 0.01,
        sparse: bool = True,
        strict_subjects: bool = False,
    ) -> None:
        super().__init__()
        ids = sorted({str(s) for s in subject_ids})
        if not ids:
            raise ValueError("LatentTable needs at least one subject ID; the training datalist is empty.")
        self.subject_ids: list[str] = ids
        self._row = {s: i for i, s in enumerate(ids)}
        self.latent_dim = latent_dim
        self.sparse = sparse
        self.strict_subjects = strict_subjects
        self.weight = nn.Parameter(torch.randn(len(ids), latent_dim) * init_std)

    def __len__(self) -> int:
        return len(self.subject_ids)

    def rows(self, subject_ids: Sequence[str]) -> torch.Tensor:
        """Row indices (on the table's device) of the given subject IDs."""
        try:
            index = [self._row[str(s)] for s in subject_ids]
        except KeyError as err:
            raise KeyError(
                f"subject {err.args[0]!r} has no latent code; the table holds {len(self)} subjects "
                f"(e.g. {self.subject_ids[:3]}). Was the table built from another datalist?"
            ) from None
        return torch.as_tensor(index, dtype=torch.long, device=self.weight.device)

    def forward(self, subject_ids: Sequence[str]) -> torch.Tensor:
        """Codes ``(B, latent_dim)`` of the given subjects."""
        return F.embedding(self.rows(subject_ids), self.weight, sparse=self.sparse)

    def get_extra_state(self) -> dict[str, Any]:
        return {"subject_ids": list(self.subject_ids), "latent_dim": self.latent_dim}

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
        saved_ids = list(state_dict.get(extra_key, {}).get("subject_ids", []))
        if not saved_ids:
            error_msgs.append(f"{extra_key}: the checkpoint holds no subject IDs; it is not a LatentTable state.")
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
        common = [s for s in self.subject_ids if s in saved_set]
        new = len(self) - len(common)
        dropped = len(saved_ids) - len(common)
        if self.strict_subjects and (new or dropped):
            only_here = [s for s in self.subject_ids if s not in saved_set][:3]
            only_saved = sorted(saved_set - set(self.subject_ids))[:3]
            error_msgs.append(
                f"{weight_key}: the checkpoint holds {len(saved_ids)} subjects and this table {len(self)}; "
                f"{new} are missing from the checkpoint (e.g. {only_here}) and {dropped} are not in the datalist "
                f"(e.g. {only_saved}). Set strict_subjects to false to restore the {len(common)} in common."
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
                "latent table: restored %d codes by subject ID, %d new subjects start fresh, "
                "%d checkpoint subjects not in the datalist were dropped",
                len(common),
                new,
                dropped,
            )

    def same_subjects(self, state_dict: dict[str, Any]) -> bool:
        """Whether a saved table state holds exactly this table's subjects (then row-wise optimizer
        state can be restored as well)."""
        return list(state_dict.get("_extra_state", {}).get("subject_ids", [])) == self.subject_ids
