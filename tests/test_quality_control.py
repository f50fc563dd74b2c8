"""Quality control of fitted cases: <case>_qc.json beside the outputs, and a warning for out-of-distribution cases."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, rotation, run_bundle
from monai.data import MetaTensor

from nisf_monai.handlers import QualityControlHandler, case_quality, qc_reference
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.networks import NISFNet
from nisf_monai.quality import QualityScore, class_agreement, shape_signals

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
    assert any("nearest training code" in w for w in written["warnings"])
    # recorded, but not a warning: on ACDC the error did not follow the segmentation's quality
    assert written["reconstruction_error"] == pytest.approx(0.4, abs=1e-5)
    assert not any("reconstruction" in w for w in written["warnings"]) and written["verdict"] == "check"
    assert "QC case7.nii.gz: no left ventricle found" in caplog.text


def test_without_reference_only_the_lv_check(tmp_path):
    handler = QualityControlHandler(
        LatentOptimisationInferer(), ConstantField(1, 0.9), tmp_path, LABELS, tmp_path / "missing.json"
    )
    assert handler.warnings(case_quality(handler.inferer, handler.network, image(), torch.zeros(4), LABELS)) == []


def test_real_network_numbers_are_those_of_its_sampled_outputs(tmp_path):
    """With a real network, the error and volumes are those of the labels and intensity it samples on the grid."""
    torch.manual_seed(0)
    net = NISFNet(latent_dim=8, hidden_dim=8, num_layers=1)
    inferer, case, code = LatentOptimisationInferer(), image(0.3), torch.randn(8)
    quality = case_quality(inferer, net, case, code, LABELS)
    mapping = inferer.frame_of(case[None])
    labels, recon = inferer.sample(net, code[None], mapping, mapping.affine, case.shape[1:])
    assert quality["reconstruction_error"] == pytest.approx(float((recon - 0.3).abs().mean()), rel=1e-5)
    for c, name in enumerate(LABELS[1:], start=1):
        assert quality["volume_ml"][name] == pytest.approx(float((labels == c).sum()) * 20 / 1000)


def test_qc_reads_the_inference_outputs_as_it_would_sample_them():
    """QC reuses the labels and reconstruction inference already read on the image's grid: same numbers."""
    net = NISFNet(latent_dim=8, hidden_dim=8, num_layers=1)
    inferer = LatentOptimisationInferer(num_steps=2, num_points=64, log_every=0)
    case = image(0.5)
    case.as_tensor()[0, 3:6] = 0.9
    (output,) = inferer.fit_and_sample([case], net)
    sampled = QualityControlHandler._sampled(output, case)
    assert sampled is not None
    reused = case_quality(inferer, net, case, output["latent"], LABELS, sampled=sampled)
    resampled = case_quality(inferer, net, case, output["latent"], LABELS)
    assert reused["signals"] == pytest.approx(resampled["signals"])
    moved = MetaTensor(case.as_tensor(), affine=case.affine.clone(), meta=dict(case.meta))
    moved.affine[0, 3] += 5.0
    assert QualityControlHandler._sampled(output, moved) is None  # another grid: QC samples its own


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


def _ring_heart() -> np.ndarray:
    """Labels (20, 20, 5): an LV disc ringed by myocardium in slices 0-4, an RV beside it."""
    labels = np.zeros((20, 20, 5), dtype=np.uint8)
    x, y = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    radius = np.hypot(x - 8, y - 8)
    labels[radius < 6] = 2
    labels[radius < 3.5] = 1
    labels[(np.abs(x - 16) < 2) & (np.abs(y - 8) < 4)] = 3
    return labels


def test_shape_signals_of_a_heart_and_of_broken_hearts():
    heart = _ring_heart()
    good = shape_signals(heart)
    assert good == {"lv_enclosure": 1.0, "lv_gap_slices": 0.0, "extra_pieces": 0.0, "missing_structures": 0.0}
    broken = heart.copy()
    broken[broken == 2] = 0  # no wall: the cavity touches background, the myocardium is missing
    broken[..., 2][broken[..., 2] == 1] = 0  # the LV vanishes mid-stack
    broken[0:2, 0:2, :] = 3  # a stray RV piece
    signals = shape_signals(broken)
    assert signals["lv_enclosure"] == 0.0 and signals["lv_gap_slices"] == 1.0
    assert signals["missing_structures"] == 1.0 and signals["extra_pieces"] == 2.0  # LV split in two, RV twice


def test_class_agreement_is_the_dice_of_two_label_maps():
    heart = _ring_heart()
    moved = np.roll(heart, 1, axis=0)
    agreement = class_agreement(heart, moved, (1, 2, 3))
    for c, value in agreement.items():
        a, b = heart == c, moved == c
        assert value == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert class_agreement(heart, heart, (1, 2, 3)) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_quality_score_predicts_flags_and_round_trips():
    score = QualityScore(["agreement_mean", "missing_structures"], [0.9, -0.3], 0.05, limit=0.75)
    assert score.predict({"agreement_mean": 0.9, "missing_structures": 0.0}) == pytest.approx(0.86)
    assert score.predict({"agreement_mean": 0.9, "missing_structures": 3.0}) == 0.0  # clipped to [0, 1]
    assert score.predict({"agreement_mean": 0.9}) is None and not score.flags(None)
    assert score.flags(0.7) and not score.flags(0.8)
    assert QualityScore.from_dict(json.loads(json.dumps(score.to_dict()))) == score
    with pytest.raises(ValueError, match="one weight per feature"):
        QualityScore(["a", "b"], [1.0], 0.0, 0.5)


def test_the_score_sets_the_verdict_and_the_summary_merges_runs(tmp_path, caplog):
    """A score on the missing-structure count flags a case whose network finds only background; the cohort CSV
    keeps the rows of an earlier run for other cases."""
    reference = tmp_path / "qc_reference.json"
    score = QualityScore(["missing_structures"], [-0.3], 0.95, limit=0.75)
    reference.write_text(json.dumps({"score": score.to_dict()}))
    inferer = LatentOptimisationInferer()
    first = QualityControlHandler(inferer, ConstantField(1, 0.5), tmp_path, LABELS, reference)
    first(Engine([{"image": image(0.5), "latent": torch.zeros(4)}]))
    first.write_summary()
    written = json.loads((tmp_path / "case7_qc.json").read_text())
    assert written["predicted_dice"] == pytest.approx(0.95 - 0.3 * 2)  # myocardium and RV missing
    assert written["verdict"] == "check" and "predicted Dice 0.35, below the limit 0.75" in written["warnings"][0]

    second = QualityControlHandler(inferer, ConstantField(1, 0.5), tmp_path, LABELS, reference)
    other = image(0.5)
    other.meta["filename_or_obj"] = "/data/case8.nii.gz"
    with caplog.at_level(logging.INFO, logger="nisf_monai"):
        second(Engine([{"image": other, "latent": torch.zeros(4)}]))
        second.write_summary()
    with open(tmp_path / "qc_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case7", "case8"] and {r["verdict"] for r in rows} == {"check"}
    assert float(rows[0]["lv_blood_pool_ml"]) == pytest.approx(8.0) and float(rows[1]["seconds"]) >= 0.0
    assert "2 of 2 cases flagged" in caplog.text  # the whole folder: this run and the earlier one


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
    # the synthetic model reads the volume frame: no heart locator
    inferer = LatentOptimisationInferer(num_steps=steps, num_points=4096, log_every=0, extent_mm=settings["extent_mm"])
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
    # without a reference only the LV check can fire: a network that never saw a real heart finds none in one
    assert quality["verdict"] == "check" and quality["volume_ml"]["lv_blood_pool"] < 5.0
    assert [w.split(" (")[0] for w in quality["warnings"]] == ["no left ventricle found"], quality["warnings"]


@pytest.mark.skipif(not ACDC.is_dir(), reason=f"ACDC data not found at {ACDC} (see ../shared/data/README.md)")
def test_shipped_bundle_verdicts_on_a_real_frame_turned_and_inverted(tmp_path):
    """``run inference`` with the shipped model on a real frame, on the same voxels under a rigid affine (a scanner's
    oblique frame) and on its inverted contrast: the first two pass with the same labels, the third is flagged by
    the score."""
    import nibabel as nib

    frame = nib.load(str(ACDC / "patient019" / "patient019_frame01.nii.gz"))
    voxels = np.asarray(frame.dataobj).astype(np.float32)
    turn = np.eye(4)
    turn[:3, :3] = rotation(0.8, 1.2)  # about the volume's centre, then 40 mm along x
    centre = frame.affine[:3, :3] @ (np.array(voxels.shape) / 2.0) + frame.affine[:3, 3]
    turn[:3, 3] = centre - turn[:3, :3] @ centre + np.array([40.0, 0.0, 0.0])
    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(voxels, frame.affine), str(data / "given.nii.gz"))
    nib.save(nib.Nifti1Image(voxels, turn @ frame.affine), str(data / "turned.nii.gz"))
    nib.save(nib.Nifti1Image(voxels.max() - voxels, frame.affine), str(data / "inverted.nii.gz"))
    out = tmp_path / "out"
    run_bundle("inference", "inference.json", BUNDLE, "--dataset_dir", str(data), "--output_dir", str(out))
    qc = {name: json.loads((out / f"{name}_qc.json").read_text()) for name in ("given", "turned", "inverted")}
    limit = json.loads((BUNDLE / "models" / "qc_reference.json").read_text())["score"]["limit"]
    assert qc["given"]["verdict"] == qc["turned"]["verdict"] == "pass", qc["turned"]["warnings"]
    assert (
        qc["given"]["predicted_dice"] > limit
        and abs(qc["turned"]["predicted_dice"] - qc["given"]["predicted_dice"]) < 0.02
    )
    given, turned = (np.asarray(nib.load(str(out / f"{n}_seg.nii.gz")).dataobj) > 0 for n in ("given", "turned"))
    assert 2 * (given & turned).sum() / (given.sum() + turned.sum()) >= 0.97
    assert qc["inverted"]["verdict"] == "check" and qc["inverted"]["predicted_dice"] < limit
    assert any(w.startswith("predicted Dice") for w in qc["inverted"]["warnings"])
