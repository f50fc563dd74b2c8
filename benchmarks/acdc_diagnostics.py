"""Where does an ACDC-trained NISF model lose its Dice (``acdc.py diagnostics``)? Three diagnostics on one run of
``acdc.py train``:

1. **Zero code** (latent step 0) on validation frames: the population-average prediction.
2. **Ceiling**: validation codes fitted with the frozen network to the *segmentation* loss (labels known): the
   best any code can do; low means the prior (network, training, alignment) holds the Dice back.
3. **Is intensity informative?** Training frames' codes refitted from zero on intensity alone, against the
   Dice of their trained codes: if refitted codes fall far below trained ones, the test-time objective (not
   the latent space) loses the Dice.
Plus the bundle's test-time fit on validation (intensity), the number users get.

    python benchmarks/acdc.py diagnostics --name C_heart --frames 10

Prints a table and writes ``diagnostics.json`` beside the run (each part also leaves its evaluation JSON).
"""

from __future__ import annotations

import acdc_levers
import numpy as np
from acdc_common import add_options, command_parser, write_record


def run(name: str, frames: int, steps: str, threads: int, pose: str, extra: list[str]) -> dict:
    """Each part's evaluation result, by label."""
    parts = {
        "zero code + intensity fit (validation)": [
            "--part",
            "validation",
            "--objective",
            "intensity",
            "--steps",
            steps,
        ],
        "ceiling: fit to labels (validation)": [
            "--part",
            "validation",
            "--objective",
            "segmentation",
            "--steps",
            steps,
        ],
        "trained codes (training)": ["--part", "training", "--objective", "trained"],
        "refit on intensity (training)": ["--part", "training", "--objective", "intensity", "--steps", steps],
    }
    results = {}
    for label, args in parts.items():
        argv = ["evaluate", "--name", name, "--frames", str(frames), "--threads", str(threads), "--pose", pose, *args]
        for item in extra:
            argv += ["--set", item]
        results[label] = acdc_levers.main(argv)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = command_parser("diagnostics", __doc__)
    ap.add_argument("--name", required=True, help="a run of acdc.py train")
    add_options(ap, "frames", "steps", "threads", "set", frames=10, steps="0,100,300")
    ap.add_argument("--pose", default="label", choices=("label", "estimate"))
    args = ap.parse_args(argv)
    results = run(args.name, args.frames, args.steps, args.threads, args.pose, args.set)
    print(f"\n{args.name}: mean Dice (LV / Myo / RV), {args.frames} frames per part")
    summary = {}
    for label, result in results.items():
        best = int(np.nanargmax(result["mean_dice"]))
        summary[label] = {
            "step0": result["mean_dice"][0],
            "best": result["mean_dice"][best],
            "best_step": result["steps"][best],
            "class_dice": result["class_dice"][best],
        }
        classes = " / ".join(f"{d:.2f}" for d in result["class_dice"][best])
        print(
            f"  {label:<42} step 0: {result['mean_dice'][0]:.3f}   best (step {result['steps'][best]}): "
            f"{result['mean_dice'][best]:.3f} ({classes})"
        )
    out = write_record(acdc_levers.WORK / args.name / "diagnostics.json", {"settings": vars(args), "summary": summary})
    print(f"written {out}")


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
