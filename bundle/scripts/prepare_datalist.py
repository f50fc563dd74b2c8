"""Write a datalist for this bundle from an ACDC-style folder of ``NAME.nii.gz`` / ``NAME_gt.nii.gz`` pairs,
split by subject into ``training`` / ``validation`` / ``test`` (ACDC's split: patient number % 5 == 4 test,
% 10 == 2 validation, the rest training). Paths in the datalist are relative to it.

    python scripts/prepare_datalist.py --data_dir /data/acdc --output datalist.json
    python scripts/prepare_datalist.py --data_dir DIR --output datalist.json --label_mapping None

``--label_mapping acdc`` (the default) maps ACDC's values (1 RV, 2 myocardium, 3 LV blood pool) to the
bundle's classes; ``None`` keeps labels that already use them (0 background, 1 LV blood pool, 2 LV myocardium,
3 RV blood pool). Train on it with ``--datalist datalist.json``. Same as ``nisf-monai datalist``.
"""

from __future__ import annotations

import logging
import sys

try:
    import fire

    from nisf_monai.data import build_datalist
    from nisf_monai.errors import report_input_errors
except ImportError as error:
    sys.exit(f"{error}: this bundle needs the nisf_monai package; see docs/README.md ('Requirements').")


def prepare_datalist(data_dir: str, output: str | None = None, label_mapping: str | dict | None = "acdc") -> str:
    """Write the datalist and return its path.

    Args:
        data_dir: folder searched recursively for ``*_gt.nii.gz`` labels and their images.
        output: datalist path (default ``data_dir/datalist_nisf.json``).
        label_mapping: ``acdc``, a dict ``{file value: class}``, or None.
    """
    return build_datalist(data_dir, output=output, label_mapping=label_mapping)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report_input_errors()
    fire.Fire(prepare_datalist)
