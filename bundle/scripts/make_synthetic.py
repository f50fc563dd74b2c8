"""Generate the synthetic short-axis cohort the bundle trains on when no datalist is given: per subject an ED
and an ES frame (``synthNNN_ED.nii.gz``, labels ``*_gt.nii.gz``) and a ``datalist.json`` whose last
``num_validation`` subjects form the ``validation`` section.

    python scripts/make_synthetic.py                                   # data/synthetic of this bundle
    python scripts/make_synthetic.py --output_dir DIR --num_subjects 4 --shape "[64,64,8]"

An existing ``datalist.json`` in ``output_dir`` is kept (training does the same); ``--overwrite True`` writes
the cohort again (as ``nisf-monai synthetic`` does).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import fire

    from nisf_monai.data import ensure_synthetic_cohort, generate_cohort
except ImportError as error:
    sys.exit(f"{error}: this bundle needs the nisf_monai package; see docs/README.md ('Requirements').")

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "synthetic"


def make_synthetic(
    output_dir: str = str(DEFAULT_DIR),
    num_subjects: int = 12,
    seed: int = 0,
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
    shape: Sequence[int] = (96, 96, 10),
    phases: str | Sequence[str] = ("ED", "ES"),
    num_validation: int = 2,
    overwrite: bool = False,
) -> str:
    """Write the cohort (unless ``output_dir`` already holds a datalist) and return the datalist's path.

    Args:
        output_dir: where images, labels and ``datalist.json`` go.
        num_subjects: subjects; each has one frame per phase.
        seed: cohort seed (the same seed gives the same subjects).
        spacing: voxel size in mm (in-plane, in-plane, slice).
        shape: array shape.
        phases: ``ED``, ``ES`` or both (comma separated on the command line).
        num_validation: subjects in the ``validation`` section (at least one subject stays for training).
        overwrite: write the cohort even if ``output_dir`` has a datalist.
    """
    settings = {
        "num_subjects": num_subjects,
        "seed": seed,
        "spacing": spacing,
        "shape": shape,
        "phases": phases,
        "num_validation": num_validation,
    }
    if overwrite:
        return generate_cohort(str(output_dir), **settings)
    return ensure_synthetic_cohort(str(output_dir), **settings)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fire.Fire(make_synthetic)
