"""The shipped bundle's written labels, pinned: the inferer as ``inference.json`` builds it, with the shipped weights,
on a synthetic frame, must write the labels stored in ``data/written_labels.npz``. A refactor of the inferer that
changes what it writes (the fit's objective, the pose, the output mixing, the output region) fails here.

The stored labels were made by the inferer of version 0.13.0; after an intended change of behaviour, write them
again with ``python tests/test_written_labels.py`` and say why in the commit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, REPO
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from nisf_monai.data.synthetic import generate_subject

STORED = Path(__file__).resolve().parent / "data" / "written_labels.npz"
# few steps and points, so the check runs in seconds; every part of the shipped pipeline still takes part
QUICK = {"inference_steps": 8, "num_points": 512, "localiser_refine_steps": 4}
RUNS = {
    "default": {},
    "hidden_slices": {},  # every other slice masked: the localiser's blend bridges the gap
    "at_2mm": {"target_spacing": [2.0, 2.0, 4.0]},
    "no_localiser_terms": {"localiser_weight": 0.0, "localiser_blend": 0.0, "output_radius_mm": 0.0},
}


def shipped_parts(**overrides: object) -> tuple[object, torch.nn.Module]:
    """The inferer and network of ``inference.json`` with the shipped weights and ``overrides`` (top-level ids)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(REPO / "bundle"), "device": "$torch.device('cpu')", **QUICK, **overrides})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(REPO / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True))
    return parser.get_parsed_content("inferer"), network.eval()


def demo_frame() -> MetaTensor:
    """The synthetic oblique frame inference segments when no data is given, scaled to [0, 1] as the bundle scales."""
    image, _, affine, _ = generate_subject(7, "ED", oblique=True)
    low, high = np.percentile(image, [0.5, 99.5])
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return MetaTensor(torch.as_tensor(scaled)[None], affine=torch.as_tensor(affine))


def written(run: str) -> dict[str, np.ndarray]:
    """The labels and code the shipped inferer writes for ``run`` of :data:`RUNS`."""
    inferer, network = shipped_parts(**RUNS[run])
    image = demo_frame()
    masks = None
    if run == "hidden_slices":
        mask = torch.zeros(image.shape, dtype=torch.bool)
        mask[..., ::2] = True
        masks = [mask]
    torch.manual_seed(0)
    (output,) = inferer.fit_and_sample([image], network, masks=masks)
    return {"labels": output["pred"].numpy(), "code_labels": output["code_labels"].numpy(), "code": output["latent"]}


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    return dict(np.load(STORED))


@pytest.mark.parametrize("run", list(RUNS))
def test_written_labels_are_unchanged(run: str, stored: dict[str, np.ndarray]) -> None:
    out = written(run)
    assert out["labels"].max() > 0, "the pinned case must contain a heart"
    np.testing.assert_array_equal(out["labels"], stored[f"{run}/labels"])
    np.testing.assert_array_equal(out["code_labels"], stored[f"{run}/code_labels"])
    np.testing.assert_allclose(out["code"].numpy(), stored[f"{run}/code"], atol=1e-5)


if __name__ == "__main__":
    arrays = {}
    for name in RUNS:
        for key, value in written(name).items():
            arrays[f"{name}/{key}"] = np.asarray(value)
        print(name, {k: v.shape for k, v in arrays.items() if k.startswith(name)}, file=sys.stderr)
    np.savez_compressed(STORED, **arrays)
