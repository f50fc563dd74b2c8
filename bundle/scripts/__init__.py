"""Bundle-local entry points, thin wrappers over the ``nisf_monai`` package (which must be installed):

- ``prepare_datalist.py``: a datalist from an ACDC-style folder;
- ``make_synthetic.py``: the synthetic cohort the bundle trains on by default;
- ``export.py``: the network or the heart localiser as TorchScript.

Run them from anywhere, e.g. ``python scripts/export.py --help`` in the bundle folder.
"""
