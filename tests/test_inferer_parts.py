"""The inferer built from parts: the bundle's settings choose the parts, and a new objective is a new fit term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CONFIGS, REPO, as_image, tiny_net
from monai.bundle import ConfigParser

from nisf_monai.inferers import (
    FitTerm,
    HeartLocator,
    HeartRegion,
    HeartWeighting,
    IntensityTerm,
    LatentOptimisationInferer,
    LocaliserBlend,
    LocaliserGuide,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (10, 10, 3)


def image():
    i, j, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    return as_image((0.2 + 0.6 / (1 + np.exp(np.hypot(i - 4.5, j - 4.5) - 3))).astype(np.float32))


def parsed_inferer(config: str = "inference.json", key: str = "inferer", **overrides) -> LatentOptimisationInferer:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    parser.update({"bundle_root": str(REPO / "bundle"), "device": "$torch.device('cpu')", **overrides})
    return parser.get_parsed_content(key)


def test_the_bundle_settings_choose_the_parts() -> None:
    shipped = parsed_inferer()
    assert shipped.heart_locator is not None and shipped.localiser is not None
    assert shipped.fit_terms == [IntensityTerm(), LocaliserGuide(3.0)]
    assert shipped.fit_weighting == HeartWeighting(40.0)
    assert shipped.output_blend == LocaliserBlend(0.5, bridge_hidden=True)
    assert shipped.output_region == HeartRegion(100.0)
    volume = parsed_inferer(heart_frame=False)
    assert volume.heart_locator is None and volume.fit_weighting is None and volume.output_region is None
    plain = parsed_inferer(heart_sigma_mm=None, output_radius_mm=None, localiser_weight=0.0, localiser_blend=0.0)
    assert plain.fit_weighting is None and plain.output_region is None
    assert not plain.fit_terms[1].takes_part(plain.localiser) and not plain.output_blend.active
    paper = parsed_inferer(fit_terms=[{"_target_": "nisf_monai.inferers.IntensityTerm"}])
    assert paper.fit_terms == [IntensityTerm()]
    validation = parsed_inferer("train.json", "validate#inferer")
    assert isinstance(validation.heart_locator, HeartLocator) and validation.fit_weighting == HeartWeighting(40.0)
    assert parsed_inferer("train.json", "validate#inferer", heart_frame=False).heart_locator is None


class Shrink(FitTerm):
    """A new lever: pull every drawn point's segmentation toward background with weight ``weight``."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.seen_targets: list[tuple[int, ...]] = []

    def targets(self, image, localiser):
        return torch.zeros(1, image[0, 0].numel())

    def point_loss(self, seg_logits, intensity_logit, targets):
        self.seen_targets.append(tuple(targets.shape))
        return -self.weight * torch.log_softmax(seg_logits, dim=1)[:, 0]


def test_a_new_fit_term_joins_the_fit_without_a_new_argument() -> None:
    net = tiny_net(2, num_classes=3)
    settings = {"num_steps": 20, "num_points": 32, "learning_rate": 0.1, "extent_mm": 20.0, "log_every": 0}
    alone = LatentOptimisationInferer(**settings).fit(image(), net)
    idle = LatentOptimisationInferer(**settings, fit_terms=[IntensityTerm(), Shrink(0.0)]).fit(image(), net)
    torch.testing.assert_close(idle, alone, rtol=0, atol=0)  # a term that costs nothing changes nothing
    shrink = Shrink(20.0)
    pulled_code = LatentOptimisationInferer(**settings, fit_terms=[IntensityTerm(), shrink]).fit(image(), net)
    assert shrink.seen_targets[0] == (1, 1, 32)  # its own row of the targets, at the drawn points
    read = LatentOptimisationInferer(**settings, chunk_size=4096)
    mapping = read.frame_of(image())

    def background(code):
        seg, _ = read.sample(net, code, mapping, mapping.affine, SHAPE, probabilities=True)
        return float(seg[:, 0].mean())

    assert background(pulled_code) > background(alone) + 0.05


def test_the_fit_needs_a_term_that_takes_part() -> None:
    with pytest.raises(ValueError, match="fit_terms is empty"):
        LatentOptimisationInferer(fit_terms=[])
    guide_only = LatentOptimisationInferer(num_steps=1, num_points=8, log_every=0, fit_terms=[LocaliserGuide(1.0)])
    with pytest.raises(ValueError, match="none of the fit terms takes part"):
        guide_only.fit(image(), tiny_net())  # no localiser: the guide sits out and nothing is left
    with pytest.raises(ValueError, match="heart_sigma_mm must be positive"):
        HeartWeighting(0.0)
