"""Quality control of fitted cases: <case>_qc.json beside the outputs, and a warning for out-of-distribution cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import REPO
from monai.data import MetaTensor

from nisf_monai.handlers import QualityControlHandler, case_quality, qc_reference
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.networks import NISFNet

LABELS = ["background", "lv_blood_pool", "lv_myocardium", "rv_blood_pool"]


class ConstantField(torch.nn.Module):
    """Predicts one class everywhere and a fixed intensity, whatever the code: QC numbers are then known."""

    latent_dim = 4
    num_classes = 4

    def __init__(self, label: int, intensity: float) -> None:
        super().__init__()
        self.label, self.logit = label, float(torch.logit(torch.tensor(intensity)))
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward_heads(self, coords, latent):
        seg = torch.full((coords.shape[0], 4, *coords.shape[2:]), -10.0)
        seg[:, self.label] = 10.0
        return seg, torch.full((coords.shape[0], 1, *coords.shape[2:]), self.logit)


def image(value: float = 0.5) -> MetaTensor:
    affine = torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0], dtype=torch.float64))
    return MetaTensor(torch.full((1, 10, 10, 4), value), affine=affine, meta={"filename_or_obj": "/data/case7.nii.gz"})


class Engine:
    def __init__(self, outputs):
        self.state = type("State", (), {"output": outputs})()


def test_numbers_of_a_known_fit():
    quality = case_quality(
        LatentOptimisationInferer(),
        ConstantField(1, 0.3),
        image(0.5),
        torch.zeros(4),
        LABELS,
        training_codes=torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),
    )
    assert abs(quality["reconstruction_error"] - 0.2) < 1e-5
    assert abs(quality["volume_ml"]["lv_blood_pool"] - 400 * 20 / 1000) < 1e-9  # 400 voxels of 20 mm^3
    assert quality["volume_ml"]["rv_blood_pool"] == 0.0
    assert abs(quality["nearest_training_code_distance"] - 1.0) < 1e-6


def test_reference_of_training_cases_leaves_their_own_codes_out():
    """A refitted training case measured against its own code would look closer than any new case can."""
    codes = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]])  # row 0: the case's own (trained) code
    inferer = LatentOptimisationInferer(num_steps=2, num_points=64)
    against_all = qc_reference(inferer, ConstantField(1, 0.3), [image(0.5)], codes, LABELS)
    leaving_own = qc_reference(inferer, ConstantField(1, 0.3), [image(0.5)], codes, LABELS, own_rows=[0])
    assert against_all["nearest_training_code_distance"][0] < 0.01  # the fitted code sits at its own row
    assert abs(leaving_own["nearest_training_code_distance"][0] - 5.0) < 0.01  # the nearest other code
    assert leaving_own["training_codes"] == against_all["training_codes"]  # QC still compares with every code
    with pytest.raises(ValueError, match="one row per image"):
        qc_reference(inferer, ConstantField(1, 0.3), [image(0.5)], codes, LABELS, own_rows=[0, 1])


def test_writes_json_and_warns_only_out_of_distribution(tmp_path, caplog):
    reference = tmp_path / "qc_reference.json"
    reference.write_text(
        json.dumps(
            {
                "reconstruction_error": [0.05, 0.1],
                "nearest_training_code_distance": [1.0],
                "training_codes": [[0.0, 0.0, 0.0, 0.0]],
            }
        )
    )
    inferer = LatentOptimisationInferer()
    good = QualityControlHandler(inferer, ConstantField(1, 0.45), tmp_path / "good", LABELS, reference)
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        good(Engine([{"image": image(0.5), "latent": torch.zeros(4)}]))
    written = json.loads((tmp_path / "good" / "case7_qc.json").read_text())
    assert written["warnings"] == [] and "QC" not in caplog.text

    bad = QualityControlHandler(inferer, ConstantField(0, 0.1), tmp_path / "bad", LABELS, reference)
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        bad(Engine([{"image": image(0.5), "latent": torch.full((4,), 3.0)}]))
    written = json.loads((tmp_path / "bad" / "case7_qc.json").read_text())
    assert any("no left ventricle" in w for w in written["warnings"])
    assert any("reconstruction error" in w for w in written["warnings"])
    assert any("nearest training code" in w for w in written["warnings"])
    assert "QC case7.nii.gz: no left ventricle found" in caplog.text


def test_without_reference_only_the_lv_check(tmp_path):
    handler = QualityControlHandler(
        LatentOptimisationInferer(), ConstantField(1, 0.9), tmp_path, LABELS, tmp_path / "missing.json"
    )
    assert handler.warnings(case_quality(handler.inferer, handler.network, image(), torch.zeros(4), LABELS)) == []


def test_real_network_runs(tmp_path):
    net = NISFNet(latent_dim=8, hidden_dim=8, num_layers=1)
    quality = case_quality(LatentOptimisationInferer(), net, image(), torch.zeros(8), LABELS)
    assert set(quality["volume_ml"]) == set(LABELS[1:]) and 0 <= quality["reconstruction_error"] <= 1


def test_records_the_heart_frame_of_the_case():
    from nisf_monai.transforms import POSE_KEY, pose_matrix

    case = image()
    case.meta[POSE_KEY] = pose_matrix([10.0, -5.0, 20.0], torch.eye(3))
    quality = case_quality(LatentOptimisationInferer(), ConstantField(1, 0.5), case, torch.zeros(4), LABELS)
    assert quality["heart_frame"]["origin_mm"] == [10.0, -5.0, 20.0]
    assert (
        case_quality(LatentOptimisationInferer(), ConstantField(1, 0.5), image(), torch.zeros(4), LABELS)["heart_frame"]
        is None
    )


# ---- real data: the shipped ACDC model against a model that has never seen a real heart ----------------------

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"
BUNDLE = REPO / "bundle"


def acdc_frame(name: str) -> MetaTensor:
    """A test-split ACDC frame as the bundle's preprocessing gives it (percentile scaling to [0, 1])."""
    from monai.transforms import LoadImage, ScaleIntensityRangePercentiles

    image = LoadImage(image_only=True, ensure_channel_first=True)(str(ACDC / name))
    return ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(image)


def qc_of(model: Path, settings: dict, reference: Path | None, tmp_path: Path, steps: int, frame: str) -> dict:
    net = NISFNet()
    net.load_state_dict(torch.load(model, map_location="cpu", weights_only=True))
    net.eval()
    inferer = LatentOptimisationInferer(num_steps=steps, num_points=4096, log_every=0, **settings)
    image = acdc_frame(frame)
    latent = inferer.fit([image], net)[0]
    handler = QualityControlHandler(inferer, net, tmp_path, LABELS, reference)
    handler(Engine([{"image": image, "latent": latent}]))
    return json.loads(next(tmp_path.glob("*_qc.json")).read_text())


@pytest.mark.skipif(not ACDC.is_dir(), reason=f"ACDC data not found at {ACDC} (see ../shared/data/README.md)")
def test_synthetic_model_on_a_real_frame_warns(tmp_path):
    from conftest import SYNTHETIC_MODEL, SYNTHETIC_MODEL_SETTINGS

    quality = qc_of(
        SYNTHETIC_MODEL / "model.pt",
        SYNTHETIC_MODEL_SETTINGS,
        None,
        tmp_path,
        20,
        "patient019/patient019_frame01.nii.gz",
    )
    assert quality["warnings"], quality


@pytest.mark.skipif(not ACDC.is_dir(), reason=f"ACDC data not found at {ACDC} (see ../shared/data/README.md)")
def test_shipped_model_on_a_real_test_frame_does_not_warn(tmp_path):
    """A test-split frame, fitted as inference.json fits it (the shipped localiser's pose, refined; its guided fit)."""
    from monai.bundle import ConfigParser

    from nisf_monai.inferers import HeartLocator, load_localiser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    config = {
        key: parser.get_parsed_content(key)
        for key in (
            "localiser_in_plane_mm",
            "localiser_channels",
            "localiser_res_units",
            "localiser_refine_steps",
            "extent_mm",
            "localiser_weight",
            "heart_sigma_mm",
            "heart_reference_volume_ml",
            "localiser_rotations",
            "localiser_zooms",
        )
    }
    localiser = load_localiser(
        BUNDLE / "models" / "localiser.pt",
        in_plane_mm=config["localiser_in_plane_mm"],
        channels=config["localiser_channels"],
        num_res_units=config["localiser_res_units"],
        reference_volume_ml=config["heart_reference_volume_ml"],
        rotations=config["localiser_rotations"],
        zooms=config["localiser_zooms"],
    )
    locator = HeartLocator(localiser=localiser, refine_steps=config["localiser_refine_steps"])
    settings = {
        "heart_frame": True,
        "extent_mm": config["extent_mm"],
        "heart_locator": locator,
        "localiser_weight": config["localiser_weight"],
        "heart_sigma_mm": config["heart_sigma_mm"],
    }
    steps = json.loads((BUNDLE / "models" / "inference_steps.json").read_text())["inference_steps"]
    quality = qc_of(
        BUNDLE / "models" / "model.pt",
        settings,
        BUNDLE / "models" / "qc_reference.json",
        tmp_path,
        steps,
        "patient019/patient019_frame01.nii.gz",
    )
    assert quality["warnings"] == [], quality
    assert quality["volume_ml"]["lv_blood_pool"] > 20.0 and quality["heart_frame"] is not None
