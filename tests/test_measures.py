"""Clinical measures: volumes, ejection fractions and mass read at a fine spacing match the synthetic
generator's closed-form values; label maps keep their disc sums; the measuring run and its bundle config
write what they promise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_MODEL, SYNTHETIC_MODEL_SETTINGS
from helpers import CONFIGS, REPO
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from torch import nn

from nisf_monai.data import generate_cohort, synthetic
from nisf_monai.geometry import (
    MYOCARDIAL_DENSITY,
    LabelField,
    MeasureRun,
    NetworkField,
    agreement,
    cardiac_measures,
    class_volumes,
    ejection_fraction,
    footprint_grid,
    load_weights,
    measure_frame,
    structure_meshes,
    voxel_volume_ml,
)
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.networks import NISFNet

pytestmark = pytest.mark.usefixtures("single_thread")


class SyntheticHeartNet(nn.Module):
    """A 'network' whose segmentation is the generator's continuous heart (network coordinates -> world mm
    through the coordinate mapping -> the generator's own point labels), so measures can be checked against its
    closed-form volumes through the same sampling path as a real model."""

    num_classes = 4
    latent_dim = 1

    def __init__(self, seed: int, phase: str) -> None:
        super().__init__()
        self.heart = synthetic._heart(synthetic._draw_parameters(seed), phase)
        self.mapping = None

    def forward_heads(self, points: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        world = points[0].T.double() * self.mapping.extent_mm + self.mapping.centre
        labels = torch.as_tensor(synthetic._label_points(world.numpy(), self.heart)).long()
        return 20.0 * torch.nn.functional.one_hot(labels, 4).T.float()[None], torch.zeros(1, 1, labels.numel())


def heart_field(seed: int, phase: str, affine: np.ndarray, shape) -> NetworkField:
    net = SyntheticHeartNet(seed, phase)
    inferer = LatentOptimisationInferer(num_steps=0, chunk_size=1 << 18, log_every=0)
    image = MetaTensor(torch.zeros(1, 1, *shape), affine=torch.as_tensor(affine))
    field = NetworkField(net, inferer, torch.zeros(1), inferer.frame_of(image))
    net.mapping = field.frame
    return field


# ---- the arithmetic -----------------------------------------------------------------------------------


def test_volumes_ejection_fraction_and_mass() -> None:
    label = np.zeros((10, 10, 10), dtype=np.uint8)
    label[:4] = 1  # 400 voxels
    label[4:5] = 2  # 100
    label[5:7, :5] = 3  # 100
    volumes = class_volumes(label, voxel_ml=0.002)
    assert volumes == pytest.approx({"lv_blood_pool": 0.8, "lv_myocardium": 0.2, "rv_blood_pool": 0.2})
    probs = np.stack(
        [np.full(label.shape, 0.1), np.full(label.shape, 0.6), np.full(label.shape, 0.2), np.full(label.shape, 0.1)]
    )
    assert class_volumes(probs, 1.0)["lv_blood_pool"] == 1000.0  # argmax: LV wins everywhere
    assert class_volumes(probs, 1.0, mode="probability") == pytest.approx(
        {"lv_blood_pool": 600.0, "lv_myocardium": 200.0, "rv_blood_pool": 100.0}
    )
    assert ejection_fraction(120.0, 48.0) == pytest.approx(60.0)
    assert math.isnan(ejection_fraction(0.0, 0.0))
    ed = {"lv_blood_pool": 150.0, "lv_myocardium": 100.0, "rv_blood_pool": 160.0}
    es = {"lv_blood_pool": 60.0, "lv_myocardium": 101.0, "rv_blood_pool": 80.0}
    m = cardiac_measures(ed, es)
    assert m["lv_ef_pct"] == pytest.approx(60.0) and m["rv_ef_pct"] == pytest.approx(50.0)
    assert m["lv_sv_ml"] == pytest.approx(90.0) and m["lv_mass_g"] == pytest.approx(105.0)  # ED myocardium x 1.05
    assert math.isnan(cardiac_measures(ed, None)["lv_ef_pct"])


def test_agreement_statistics() -> None:
    predicted, reference = [11.0, 19.0, 33.0, float("nan")], [10.0, 20.0, 30.0, 40.0]
    stats = agreement(predicted, reference)
    diff = np.array([1.0, -1.0, 3.0])
    assert stats["n"] == 3  # the NaN pair is dropped
    assert stats["mae"] == pytest.approx(5 / 3) and stats["bias"] == pytest.approx(1.0)
    assert stats["sd_diff"] == pytest.approx(diff.std(ddof=1))
    assert stats["loa_upper"] == pytest.approx(1.0 + 1.96 * diff.std(ddof=1))
    assert stats["pearson_r"] == pytest.approx(np.corrcoef([11, 19, 33], [10, 20, 30])[0, 1])
    assert math.isnan(agreement([1.0], [2.0])["pearson_r"])


# ---- fine grids and label maps ------------------------------------------------------------------------


def test_fine_grid_nests_in_the_voxels() -> None:
    _, _, affine, _ = synthetic.generate_subject(4, "ED", shape=(8, 6, 5), oblique=True)
    fine, shape = footprint_grid(affine, (8, 6, 5), 1.0)
    assert shape == [16, 12, 40]  # 1.5 mm -> 2 x 0.75 mm, 8 mm -> 8 x 1 mm
    np.testing.assert_allclose(np.linalg.norm(fine[:3, :3], axis=0), [0.75, 0.75, 1.0], atol=1e-6)
    assert voxel_volume_ml(fine) * np.prod(shape) == pytest.approx(voxel_volume_ml(affine) * 8 * 6 * 5)
    # the mean of the fine centres inside a voxel is that voxel's centre
    centres = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(8)], dtype=float)
    np.testing.assert_allclose((centres @ fine[:3, :3].T + fine[:3, 3]).mean(axis=0), affine[:3, 3], atol=1e-6)
    coarse, coarse_shape = footprint_grid(affine, (8, 6, 5), 4.0)
    assert coarse_shape == [3, 2, 10]  # merged in-plane (at least 2 voxels per cell), split along the slices


def test_labels_read_finely_keep_their_disc_sums() -> None:
    _, label, affine, info = synthetic.generate_subject(6, "ES", oblique=True)
    native = class_volumes(label, voxel_volume_ml(affine))
    for spacing, margin in ((1.0, 10.0), (0.5, 3.0), (None, None)):
        result = measure_frame(LabelField(label, affine), affine, label.shape, spacing, margin)
        assert result.volumes == pytest.approx(native, rel=1e-9)
    # the generator's sub-voxel disc sums agree with its own label counts to about 1 %
    assert native["lv_blood_pool"] == pytest.approx(info["lv_blood_pool_ml"], rel=0.02)


# ---- against the generator's analytic values ----------------------------------------------------------


def test_fine_measures_match_the_generator_on_a_cohort() -> None:
    """Two generated subjects, ED and ES, read at 1 mm (0.75 x 0.75 x 1 mm, nested in the 1.5 x 1.5 x 8 mm
    voxels) through ``inferer.sample`` from a field that is the generator's continuous heart.

    Tolerances: at 1 mm the flat basal plane of each cavity falls anywhere between two fine voxel centres,
    an error of up to half a voxel times the basal area (about 0.5 mm x 9 cm^2 = 0.45 ml, 1 % of a 45 ml
    end-systolic cavity), plus voxelisation of the curved walls; so 2 % on volumes, and EF within 1.5
    points (EF = 1 - ESV / EDV moves by about (ESV / EDV) x (the two relative errors)).
    """
    thin_rv = {}
    for seed in (11, 12):
        volumes, infos = {}, {}
        for phase in ("ED", "ES"):
            _, label, affine, info = synthetic.generate_subject(seed, phase)
            result = measure_frame(heart_field(seed, phase, affine, label.shape), affine, label.shape, 1.0)
            volumes[phase], infos[phase] = result.volumes, info
            assert result.volumes["lv_blood_pool"] == pytest.approx(info["lv_blood_pool_continuous_ml"], rel=0.02)
            assert result.volumes["lv_myocardium"] == pytest.approx(info["lv_myocardium_continuous_ml"], rel=0.02)
            meshes = structure_meshes(result.probabilities, result.affine)
            for name, mesh in meshes.items():  # the surfaces enclose the voxel volumes
                assert mesh.volume / 1000 == pytest.approx(result.volumes[name], rel=0.01)
            if seed == 11:
                # the RV has no closed form: compare with the generator's own disc sum over 1 mm slices
                _, _, _, thin = synthetic.generate_subject(seed, phase, spacing=(1.5, 1.5, 1.0), shape=(96, 96, 80))
                thin_rv[phase] = (result.volumes["rv_blood_pool"], thin["rv_blood_pool_ml"])
        measures = cardiac_measures(volumes["ED"], volumes["ES"])
        assert measures["lv_ef_pct"] == pytest.approx(100 * infos["ED"]["target_ejection_fraction"], abs=1.5)
        assert measures["lv_mass_g"] == pytest.approx(
            MYOCARDIAL_DENSITY * infos["ED"]["lv_myocardium_continuous_ml"], rel=0.02
        )
        # the generator conserves the myocardium between ED and ES; so does the measured one
        assert volumes["ES"]["lv_myocardium"] == pytest.approx(volumes["ED"]["lv_myocardium"], rel=0.02)
    for measured, reference in thin_rv.values():
        assert measured == pytest.approx(reference, rel=0.02)
    # and the 8 mm disc sums differ from the continuous heart by more than that: the fine reading matters
    _, _, _, info = synthetic.generate_subject(11, "ED")
    assert abs(info["rv_blood_pool_ml"] / thin_rv["ED"][1] - 1) > 0.04


def test_region_of_interest_loses_nothing() -> None:
    _, label, affine, _ = synthetic.generate_subject(12, "ED", oblique=True)
    field = heart_field(12, "ED", affine, label.shape)
    with_roi = measure_frame(field, affine, label.shape, 3.0, roi_margin_mm=10.0)
    whole = measure_frame(field, affine, label.shape, 3.0, roi_margin_mm=None)
    assert np.prod(with_roi.roi_shape) < 0.75 * np.prod(whole.roi_shape)
    assert with_roi.volumes == whole.volumes


def test_trained_model_measures_an_unseen_subject() -> None:
    """A model trained on the synthetic cohort (``tests/data/synthetic_model``), fitted to a subject it has not
    seen with lean settings (50 steps of 2048 points, 2.5 mm). Over three unseen subjects the LV volumes
    were within 15 % and EF within 7 points of the analytic values; a wrong grid, slab or region would be
    off by far more."""
    net = load_weights(NISFNet(), SYNTHETIC_MODEL / "model.pt")
    extent_mm = SYNTHETIC_MODEL_SETTINGS["extent_mm"]  # the volume frame: no heart locator
    inferer = LatentOptimisationInferer(num_steps=50, num_points=2048, log_every=0, extent_mm=extent_mm)
    images, infos = [], []
    for phase in ("ED", "ES"):
        image, _, affine, info = synthetic.generate_subject(202, phase)
        low, high = np.percentile(image, [0.5, 99.5])
        image = np.clip((image - low) / (high - low), 0, 1)
        images.append(MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=torch.as_tensor(affine)))
        infos.append(info)
    latent = inferer.fit(images, net)
    volumes = [
        measure_frame(
            NetworkField(net, inferer, latent[b], inferer.frame_of(images[b][None])),
            np.asarray(images[b].affine),
            images[b].shape[1:],
            2.5,
        ).volumes
        for b in range(2)
    ]
    measures = cardiac_measures(*volumes)
    assert measures["lv_edv_ml"] == pytest.approx(infos[0]["lv_blood_pool_continuous_ml"], rel=0.2)
    assert measures["lv_esv_ml"] == pytest.approx(infos[1]["lv_blood_pool_continuous_ml"], rel=0.2)
    assert measures["lv_ef_pct"] == pytest.approx(100 * infos[0]["target_ejection_fraction"], abs=10)


# ---- the measuring run and its bundle config ----------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    return Path(
        generate_cohort(str(folder), num_subjects=2, shape=(40, 40, 6), spacing=(3.0, 3.0, 12.0), num_validation=1)
    )


def test_measure_run_from_labels_reproduces_the_disc_sums(cohort: Path, tmp_path: Path) -> None:
    """``source='labels'`` sends the manual labels through the fine-grid path: every measure must equal
    the disc sum from the same labels (MAE 0), and every output must be written."""
    from monai.transforms import Compose, LoadImaged

    from nisf_monai.data import load_datalist

    items = load_datalist(str(cohort), "training") + load_datalist(str(cohort), "validation")
    for item in items[2:]:
        item.pop("phase")  # the second subject's ED / ES from the LV volumes instead
    preprocessing = Compose([LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True)])
    net = NISFNet(latent_dim=4, hidden_dim=8, num_layers=1)
    report = MeasureRun(
        net,
        None,
        preprocessing,
        items,
        tmp_path,
        source="labels",
        spacing=2.0,
        mesh_format="stl",
        max_surface_figures=1,
    ).run()
    assert sorted(report["measures"]["labels"]) == ["synth000", "synth001"]
    for stats in report["agreement"].values():
        assert stats["n"] == 2 and stats["mae"] == pytest.approx(0.0, abs=1e-9)
    assert report["subjects"]["synth001"]["phase_rule"].startswith("largest / smallest manual")
    assert report["subjects"]["synth001"]["ed_case"] == "synth001_ED"
    json.loads((tmp_path / "measures.json").read_text())  # valid JSON (no NaN)
    for name in (
        "measures.csv",
        "volumes.csv",
        "agreement.csv",
        "figures/bland_altman.png",
        "figures/scatter.png",
        "figures/synth000_surfaces.png",
        "meshes/synth000_ED_lv_myocardium.stl",
        "segmentations/synth001_ES_fine_seg.nii.gz",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    header = (tmp_path / "measures.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["subject", "source", "ed_case", "es_case"] and "lv_mass_g" in header


def test_bundle_measuring_config_runs(cohort: Path, tmp_path: Path) -> None:
    """``inference.json`` + ``measure.json`` build a working ``measuring`` run (labels as the source, so no
    fitting is needed here; the NISF source is the same object with the shipped network)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "measure.json")])
    parser.update(
        {
            "bundle_root": str(REPO / "bundle"),
            "datalist_file": str(cohort),
            "section": "training",
            "output_dir": str(tmp_path),
            "measure_source": "labels",
            "measure_spacing": 3.0,
            "device": "cpu",
        }
    )
    measurer = parser.get_parsed_content("measurer")
    assert isinstance(measurer, MeasureRun) and measurer.ckpt_path.endswith("model.pt")
    parser.get_parsed_content("measuring")
    rows = (tmp_path / "measures.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("synth000,labels,synth000_ED,synth000_ES")


def test_weights_of_another_network_give_one_clear_error(tmp_path) -> None:
    """A snapshot of another layout (here ``{"network", "latents"}``) or a file that is no state_dict names
    ``ckpt_path`` instead of failing inside torch's ``load_state_dict``."""
    from nisf_monai.errors import SettingsError

    snapshot = tmp_path / "snapshot.pt"
    torch.save({"network": NISFNet().state_dict(), "latents": {}}, snapshot)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    for path in (snapshot, tensor):
        with pytest.raises(SettingsError, match="ckpt_path: the weights in .* do not fit this network"):
            load_weights(NISFNet(), path)
