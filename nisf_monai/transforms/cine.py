"""What the cine model needs of each frame: its cardiac phase in the image's metadata, and a label or a flag saying
it has none.

The cine model (``cine_model`` in the bundle's configs) is one network ``f(x, y, z, t, h)`` with one code per subject.
A frame's phase ``t`` travels in its MetaTensor's metadata (``PHASE_KEY``), where
:class:`~nisf_monai.transforms.CoordinateGridd` and the inferer read it. Frames of a cine without a manual label
still train the intensity head: :class:`FlagLabelledd` gives them an empty label and ``labelled = False``, which
:class:`~nisf_monai.losses.NISFLoss` reads to leave them out of the segmentation terms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from nisf_monai.data.phases import ASSUMED_CINE_LENGTH, PHASE_SOURCE_KEY, phase_and_source
from nisf_monai.transforms.coordinates import PHASE_KEY

__all__ = ["LABELLED_KEY", "CardiacPhased", "FlagLabelledd"]

LABELLED_KEY = "labelled"


class CardiacPhased(MapTransform):
    """Puts the frame's cardiac phase into the metadata of ``keys`` (``PHASE_KEY``): the entry's ``cardiac_phase``,
    or, for an entry without one (a MONAI Label datastore item, a folder listed at inference), the phase the rules
    of :mod:`nisf_monai.data.phases` give it (also recorded in the entry, with ``phase_source``).

    Args:
        keys: images that get the phase (the image, and the label so that it follows the image).
        image_key: entry key of the image path, for the file-name rule.
        assumed_cine_length: frames per cycle when a frame's index is known but not its cycle's length.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        assumed_cine_length: int = ASSUMED_CINE_LENGTH,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.assumed_cine_length = int(assumed_cine_length)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(PHASE_KEY) is None:
            source = d.get(self.image_key)
            path = source.meta.get("filename_or_obj", "") if isinstance(source, MetaTensor) else source
            phase, how = phase_and_source({**d, self.image_key: path}, self.image_key, self.assumed_cine_length)
            d[PHASE_KEY], d[PHASE_SOURCE_KEY] = phase, how
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta[PHASE_KEY] = float(d[PHASE_KEY])
        return d


class FlagLabelledd(MapTransform):
    """Sets ``flag_key`` to whether the frame has a manual label, and gives a frame without one an all-background
    label of the image's shape, so that labelled and unlabelled frames of a cine share a batch. The loss reads the
    flag: an unlabelled frame trains the intensity head only.

    Args:
        keys: the label key.
        image_key: the image whose shape and affine an empty label takes.
        flag_key: where the flag goes.
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", flag_key: str = LABELLED_KEY) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            present = d.get(key) is not None
            if not present:
                image = d[self.image_key]
                empty = torch.zeros(image.shape, dtype=torch.uint8)
                d[key] = MetaTensor(empty, meta=dict(image.meta)) if isinstance(image, MetaTensor) else empty
            d[self.flag_key] = present
        return d
