"""The bundle's classes: one label value per cardiac structure, as label maps, datalists, measures and
figures use them (``label_names`` in the bundle configs lists the same names in this order)."""

from __future__ import annotations

__all__ = ["DATALIST_LABELS", "LABELS", "STRUCTURES"]

LABELS = {"background": 0, "lv_blood_pool": 1, "lv_myocardium": 2, "rv_blood_pool": 3}
STRUCTURES = {name: value for name, value in LABELS.items() if value > 0}  # the foreground classes
DATALIST_LABELS = {str(value): name for name, value in LABELS.items()}  # a datalist's "labels" entry
