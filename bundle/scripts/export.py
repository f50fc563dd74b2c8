"""Export the bundle's network (``models/model.pt``) or heart localiser (``models/localiser.pt``) as
TorchScript with MONAI's ``ckpt_export``; the file also carries the bundle's metadata and configs.

    python scripts/export.py                                   # models/model.pt -> models/model.ts
    python scripts/export.py --network localiser               # models/localiser.pt -> models/localiser.ts
    python scripts/export.py --ckpt_file my.pt --filepath my.ts --latent_dim 64

Any other ``--id value`` overrides a config id (the sizes a checkpoint was trained with, for instance). The
same as ``python -m monai.bundle ckpt_export network_def --config_file configs/inference.json ...``. The
exported network takes coordinates ``(B, 3, *spatial)`` and an optional code ``(B, latent_dim)``; the latent
fit of a new image still needs the bundle's inferer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:
    import fire

    from nisf_monai.errors import MissingFileError, SettingsError, report_input_errors
except ImportError as error:
    sys.exit(f"{error}: this bundle needs the nisf_monai package; see docs/README.md ('Requirements').")

BUNDLE = Path(__file__).resolve().parents[1]
# network -> (its config id, the configs that define it, the default checkpoint name)
NETWORKS = {
    "model": ("network_def", ["inference.json"], "model"),
    "localiser": ("localiser_def", ["train.json", "train_localiser.json"], "localiser"),
}


def export(
    network: str = "model",
    ckpt_file: str | None = None,
    filepath: str | None = None,
    bundle_root: str = str(BUNDLE),
    **overrides: Any,
) -> str:
    """Write the TorchScript file and return its path.

    Args:
        network: ``model`` (the NISF network) or ``localiser`` (the 2D UNet that finds the heart).
        ckpt_file: the weights (default ``models/<network name>.pt`` of ``bundle_root``).
        filepath: the TorchScript file (default: ``ckpt_file`` with the suffix ``.ts``).
        bundle_root: the bundle folder whose configs define the network.
        overrides: other config ids, e.g. ``--hidden_dim 64``.
    """
    if network not in NETWORKS:
        raise SettingsError("network", f"{network!r} is not a network of this bundle", "give 'model' or 'localiser'")
    net_id, config_names, name = NETWORKS[network]
    root = Path(bundle_root).resolve()
    configs = root / "configs"
    ckpt = Path(ckpt_file) if ckpt_file else root / "models" / f"{name}.pt"
    if not ckpt.is_file():
        raise MissingFileError(f"{ckpt}: no such checkpoint (train the {network} first, or pass --ckpt_file).")
    target = Path(filepath) if filepath else ckpt.with_suffix(".ts")
    target.parent.mkdir(parents=True, exist_ok=True)
    from monai.bundle import ckpt_export  # imported here: a wrong path above fails fast

    ckpt_export(
        net_id,
        filepath=str(target),
        ckpt_file=str(ckpt),
        meta_file=str(configs / "metadata.json"),
        config_file=[str(configs / c) for c in config_names],
        bundle_root=str(root),
        **overrides,
    )
    return str(target)


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(export)
