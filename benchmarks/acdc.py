"""The ACDC bench: one entry point, one subcommand per kind of run.

    python benchmarks/acdc.py SUBCOMMAND [options]        # python benchmarks/acdc.py SUBCOMMAND --help

Every subcommand reads ACDC from ``../shared/data/acdc`` (``--data`` for another folder) with the split of
``../shared/data/README.md`` and writes a JSON record under ``benchmarks/results/``; the options they share (frames,
offset, steps, tag, ``--set`` overrides, threads, work folder) are spelled the same everywhere
(``benchmarks/acdc_common.py``). Read the test split once per reported configuration, never to choose a setting.
"""

from __future__ import annotations

import importlib
import sys

# subcommand: (module beside this file, arguments put before the user's, what it does)
SUBCOMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "train": ("acdc_levers", ("train",), "train NISF through train.json with --set overrides, under a CPU budget"),
    "evaluate": ("acdc_levers", ("evaluate",), "fit codes to frames of a trained run and record Dice per latent step"),
    "steps": ("acdc_levers", ("steps",), "inference_steps.json from validation evaluations"),
    "qc": ("acdc_levers", ("qc",), "qc_reference.json of a trained run"),
    "report": ("acdc_levers", ("report",), "a run-by-run table and learning curves from the evaluation records"),
    "diagnostics": ("acdc_diagnostics", (), "zero code, latent-space ceiling and intensity refits of one run"),
    "unet": ("acdc_unet", (), "the 2D MONAI UNet baseline under a CPU budget, scored on the test frames"),
    "measures": ("acdc_measures", (), "clinical measures (volumes, EF, LV mass) against the manual labels"),
    "measure-variants": ("acdc_measure_variants", (), "one fit per frame read several ways for the measures"),
    "interpolate": ("acdc_interpolation", (), "slices hidden from the fit against nearest and shape-based copies"),
    "localiser": ("acdc_localiser", (), "the heart localiser alone: its pose error, and its grid's Dice ceiling"),
    "cine": ("acdc_cine", (), "the cine model against the per-frame model: Dice, timing, mass change"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    return (__doc__ or "") + "\nsubcommands:\n" + "\n".join(lines)


def main(argv: list[str]) -> object:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv[0] not in SUBCOMMANDS:
        sys.exit(f"unknown subcommand {argv[0]!r}\n\n{usage()}")
    module, prefix, _ = SUBCOMMANDS[argv[0]]
    return importlib.import_module(module).main([*prefix, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
