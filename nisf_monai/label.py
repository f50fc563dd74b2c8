"""Glue for MONAI Label's ``BundleInferTask`` and ``BundleTrainTask``.

MONAI Label drives the bundle through config ids (``preprocessing``, ``inferer``, ``postprocessing``,
``network_def``; ``train#dataset#data``, ``validate#dataset#data``, ``train#trainer#max_epochs``,
``train#handlers``, ``device``). Two things differ from the bundle's own runs, and these helpers absorb them:

- its inference calls ``inferer(image, network)``, which returns class probabilities like any MONAI
  inferer, whereas the bundle's evaluator writes label maps directly; :class:`ProbabilitiesToLabelsd`
  lets one ``postprocessing`` serve both;
- its training replaces the data list with its datastore's ``{"image", "label"}`` pairs, which carry no
  case IDs, while the latent codes are keyed by case ID; :func:`case_ids` and :class:`CaseIDd` give such
  entries the ID the bundle's own datalists give them (the image's file name).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from nisf_monai.data import case_name
from nisf_monai.errors import DatalistError

__all__ = ["CaseIDd", "ProbabilitiesToLabelsd", "case_ids"]


def _case_of(item: Mapping[Hashable, Any], case_key: str, image_key: str) -> str:
    if item.get(case_key) is not None:
        return str(item[case_key])
    if image_key not in item:
        raise DatalistError(f"datalist entry {dict(item)} has neither a {case_key!r} ID nor an {image_key!r} path.")
    return case_name(str(item[image_key]))


def case_ids(data: Sequence[Mapping[Hashable, Any]], case_key: str = "case", image_key: str = "image") -> list[str]:
    """The case ID of each entry: its ``case_key`` if set, else its image's file name without folder and
    NIfTI suffix (as :func:`nisf_monai.data.load_datalist` names cases).

    Sizing the latent table with this makes it follow whatever data list the config is given, including
    the one MONAI Label substitutes for ``train#dataset#data``.

    Raises:
        DatalistError: an ID taken from a file name names more than one entry (which would otherwise
            share one latent code silently).
    """
    ids = [_case_of(item, case_key, image_key) for item in data]
    counts = Counter(ids)
    repeated = sorted({case for item, case in zip(data, ids) if item.get(case_key) is None and counts[case] > 1})
    if repeated:
        raise DatalistError(
            f"case ID {repeated[0]!r} (an image's file name) names more than one entry; case IDs key the latent "
            "codes, so list each image once, with a unique file name or its own 'case' entry."
        )
    return ids


class CaseIDd(MapTransform):
    """Sets ``case_key`` from the image's file name when an entry has none (see :func:`case_ids`); entries
    that carry an ID keep it. Put it first in the training preprocessing, before the image is loaded.

    Args:
        keys: the image key whose path names the case.
        case_key: entry key of the case ID (the trainer's ``latent_key``).
    """

    def __init__(self, keys: KeysCollection = "image", case_key: str = "case") -> None:
        super().__init__(keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.case_key) is None:
            key = self.first_key(d)
            d[self.case_key] = _case_of(d, self.case_key, str(key))
        return d


class ProbabilitiesToLabelsd(MapTransform):
    """Class probabilities ``(M, *S)`` (M > 1) become uint8 labels ``(1, *S)`` by argmax; a tensor with one
    channel is already a label map and passes unchanged. The metadata (affine) is kept.

    ``LatentOptimisationInferer.__call__`` (used by MONAI Label) returns probabilities; the bundle's
    evaluator (``fit_and_sample``) returns labels. With this transform first, one ``postprocessing``
    serves both. A batched MetaTensor ``(B, C, *S)`` (``is_batch``) is reduced over its dim 1, anything
    else over dim 0.

    Args:
        keys: prediction keys.
    """

    def __init__(self, keys: KeysCollection = "pred", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if not isinstance(pred, torch.Tensor):
                pred = torch.as_tensor(pred)
            channel_dim = 1 if getattr(pred, "is_batch", False) else 0
            if pred.shape[channel_dim] > 1:
                pred = pred.argmax(dim=channel_dim, keepdim=True).to(torch.uint8)
            d[key] = pred
        return d
