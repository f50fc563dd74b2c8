"""The cine model: time as a coordinate, one code per subject, inference per subject, 4D outputs and measures over
the cycle (issue 26)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import AFFINE, TINY_NET_ARGS, as_image, oblique_affine, run_bundle, tiny_net
from monai.data import MetaTensor

from nisf_monai.data import (
    GroupBatchSampler,
    assign_cardiac_phases,
    build_datalist,
    expand_cine_datalist,
    load_datalist,
    subject_of_case,
)
from nisf_monai.data.synthetic import generate_cine, generate_cohort, generate_subject
from nisf_monai.errors import DatalistError, InputDataError
from nisf_monai.geometry import LabelField
from nisf_monai.geometry.cycle import curve_phases, cycle_extremes, volume_curve
from nisf_monai.handlers import join_frames, qc_reference
from nisf_monai.inferers import HeartLocator, LatentOptimisationInferer
from nisf_monai.io import save_nifti
from nisf_monai.losses import NISFLoss
from nisf_monai.networks import NISFNet, saved_coord_dim
from nisf_monai.transforms import (
    PHASE_KEY,
    POSE_KEY,
    CardiacPhased,
    CoordinateGridd,
    CoordinateMapping,
    FlagLabelledd,
    heart_pose,
    with_subject_poses,
)

CINE_GRID = {"spacing": (4.0, 4.0, 10.0), "shape": (28, 28, 6)}


# ---------------------------------------------------------------------------------------------- time as a coordinate


def test_the_mapping_appends_the_phase_as_a_point_on_the_cycle() -> None:
    affine = oblique_affine((2.0, 1.5, 6.0), (-10.0, 4.0, 20.0), 0.4)
    spatial = CoordinateMapping(affine, (5, 4, 3), extent_mm=50.0)
    timed = CoordinateMapping(affine, (5, 4, 3), extent_mm=50.0, phase=0.25)
    assert (spatial.coord_dim, timed.coord_dim) == (3, 5)
    a, b = spatial.grid(affine, (5, 4, 3)), timed.grid(affine, (5, 4, 3))
    assert a.shape == (60, 3) and b.shape == (60, 5)
    torch.testing.assert_close(b[:, :3], a)  # the same place in space...
    quarter = torch.tensor([0.0, 1.0 / (2 * np.pi)]).expand(60, 2)
    torch.testing.assert_close(b[:, 3:], quarter, atol=1e-7, rtol=0)  # ...a quarter of the way round the cycle
    later = timed.with_phase(0.8).grid(affine, (5, 4, 3))
    torch.testing.assert_close(later[:, :3], a)
    assert timed.phase == pytest.approx(0.25)  # with_phase makes a copy
    # the cycle wraps: the last frame of a cycle lies as close to the first as to the one before it
    first, last, before = (
        CoordinateMapping(affine, (5, 4, 3), phase=t).grid(affine, (5, 4, 3))[0, 3:] for t in (0.0, 0.95, 0.9)
    )
    assert float((last - first).norm()) == pytest.approx(float((last - before).norm()), rel=1e-5)
    assert float((last - first).norm()) == pytest.approx(0.05, rel=0.01)  # circumference 1: a step of 0.05 in phase


def test_the_coordinate_grid_reads_the_phase_from_the_metadata() -> None:
    image = MetaTensor(torch.rand(1, 4, 3, 2), affine=torch.as_tensor(AFFINE))
    assert CoordinateGridd("image")({"image": image})["coords"].shape == (3, 4, 3, 2)
    image.meta[PHASE_KEY] = 0.5
    coords = CoordinateGridd("image")({"image": image})["coords"]
    assert coords.shape == (5, 4, 3, 2)
    torch.testing.assert_close(coords[3], torch.full((4, 3, 2), -1.0 / (2 * np.pi)))  # half way round the cycle
    torch.testing.assert_close(coords[4], torch.zeros(4, 3, 2), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------------- phases of frames


@pytest.mark.parametrize(
    "entry, phase, source",
    [
        ({"image": "a.nii.gz", "cardiac_phase": 0.4}, 0.4, "datalist"),
        ({"image": "cine.nii.gz", "frame": 5, "cine_length": 20}, 0.25, "cine"),
        ({"image": "a.nii.gz", "cine_frame": 3, "cine_length": 12}, 0.25, "cine_frame, 12 frames"),
        ({"image": "d/patient001_frame12.nii.gz", "cine_length": 30}, 11 / 30, "file name, 30 frames"),
        ({"image": "d/patient001_frame12.nii.gz"}, 11 / 30, "file name, 30 frames assumed"),
        ({"image": "d/patient001_frame01.nii.gz"}, 0.0, "file name, 30 frames assumed"),
        ({"image": "d/scan.nii.gz"}, 0.0, "none"),
    ],
)
def test_each_frame_gets_its_phase_by_the_documented_rules(entry: dict, phase: float, source: str) -> None:
    (assigned,) = assign_cardiac_phases([entry])
    assert assigned["cardiac_phase"] == pytest.approx(phase)
    assert assigned["phase_source"] == source


def test_impossible_phases_are_refused_with_the_file_named() -> None:
    with pytest.raises(DatalistError, match="a.nii.gz.*must lie in"):
        assign_cardiac_phases([{"image": "a.nii.gz", "cardiac_phase": 1.0}])
    with pytest.raises(DatalistError, match="does not lie in a cycle of 12"):
        assign_cardiac_phases([{"image": "a.nii.gz", "cine_frame": 12, "cine_length": 12}])


def test_the_phase_transform_puts_the_rules_phase_into_the_metadata() -> None:
    image = MetaTensor(torch.rand(1, 4, 3, 2), affine=torch.as_tensor(AFFINE), meta={"filename_or_obj": "x"})
    out = CardiacPhased("image", assumed_cine_length=20)({"image": image, "case": "patient007_frame05"})
    assert out["image"].meta[PHASE_KEY] == 0.0 and out["phase_source"] == "none"  # no index in the file's name
    image.meta["filename_or_obj"] = "/d/patient007_frame05.nii.gz"
    out = CardiacPhased("image", assumed_cine_length=20)({"image": image})
    assert out["image"].meta[PHASE_KEY] == pytest.approx(0.2) and out["cardiac_phase"] == pytest.approx(0.2)


def test_the_datalist_builder_records_phases_and_the_cycle_length_acdc_gives(tmp_path: Path) -> None:
    patient = tmp_path / "patient001"
    patient.mkdir()
    for frame in (1, 7):
        save_nifti(np.random.rand(8, 8, 2).astype(np.float32), AFFINE, patient / f"patient001_frame{frame:02d}.nii.gz")
        save_nifti(np.zeros((8, 8, 2), np.uint8), AFFINE, patient / f"patient001_frame{frame:02d}_gt.nii.gz")
    (patient / "Info.cfg").write_text("ED: 1\nES: 7\nGroup: NOR\nHeight: 170\nNbFrame: 24\nWeight: 70\n")
    entries = json.loads(Path(build_datalist(str(tmp_path))).read_text())["training"]
    assert [(e["subject"], e["cine_length"], e["cardiac_phase"]) for e in entries] == [
        ("patient001", 24, 0.0),
        ("patient001", 24, 6 / 24),
    ]
    assert {e["phase_source"] for e in entries} == {"file name, 24 frames"}
    assert subject_of_case("patient001_frame07") == "patient001" and subject_of_case("scan") == "scan"


# -------------------------------------------------------------------------------------------- training on a cycle


def test_unlabelled_frames_train_the_intensity_head_only() -> None:
    torch.manual_seed(0)
    seg, intensity = torch.randn(3, 4, 50), torch.randn(3, 1, 50)
    label, target = torch.randint(0, 4, (3, 1, 50)), torch.rand(3, 1, 50)
    latents = torch.randn(3, 8)
    loss = NISFLoss()
    labelled = torch.tensor([True, False, True])
    total = loss(seg, intensity, label, target, latents, labelled)
    mixed = dict(loss.terms)
    # the segmentation terms are those of the labelled samples alone, whatever the unlabelled one's label says
    loss(seg[[0, 2]], intensity[[0, 2]], label[[0, 2]], target[[0, 2]], latents[[0, 2]])
    assert mixed["dice"] == pytest.approx(loss.terms["dice"]) and mixed["bce_seg"] == pytest.approx(
        loss.terms["bce_seg"]
    )
    scrambled = label.clone()
    scrambled[1] = (scrambled[1] + 1) % 4
    assert float(loss(seg, intensity, scrambled, target, latents, labelled)) == pytest.approx(float(total))
    # the intensity term keeps every sample; a batch with no label has no segmentation term
    loss(seg, intensity, label, target, latents)
    assert mixed["bce_intensity"] == pytest.approx(loss.terms["bce_intensity"])
    none = loss(seg, intensity, label, target, latents, torch.zeros(3, dtype=torch.bool))
    assert loss.terms["dice"] == 0.0 and loss.terms["bce_seg"] == 0.0
    assert float(none) == pytest.approx(10.0 * loss.terms["bce_intensity"] + 1e-4 * loss.terms["latent_l2"])


def test_a_frame_without_a_label_is_flagged_and_given_an_empty_one() -> None:
    image = MetaTensor(torch.rand(1, 4, 3, 2), affine=torch.as_tensor(AFFINE))
    out = FlagLabelledd("label")({"image": image})
    assert out["labelled"] is False and out["label"].shape == image.shape and int(out["label"].sum()) == 0
    assert FlagLabelledd("label")({"image": image, "label": torch.ones(1, 4, 3, 2)})["labelled"] is True


def _labelled_frame(seed: int, phase: str, path: Path) -> dict:
    _, label, affine, _ = generate_subject(seed, phase, **CINE_GRID)
    save_nifti(label, affine, path)
    return {"label": str(path)}


def test_every_frame_of_a_subject_takes_the_pose_of_its_earliest_labelled_frame(tmp_path: Path) -> None:
    def load(entry: dict) -> dict:
        label = nib.load(entry["label"])
        return {"label": MetaTensor(torch.as_tensor(np.asarray(label.dataobj))[None], affine=label.affine)}

    ed = {**_labelled_frame(3, "ED", tmp_path / "ed.nii.gz"), "subject": "s", "case": "ed", "cardiac_phase": 0.0}
    es = {**_labelled_frame(3, "ES", tmp_path / "es.nii.gz"), "subject": "s", "case": "es", "cardiac_phase": 0.35}
    unlabelled = {"subject": "s", "case": "mid", "cardiac_phase": 0.6}
    other = {**_labelled_frame(4, "ES", tmp_path / "o.nii.gz"), "subject": "o", "case": "o", "cardiac_phase": 0.3}
    posed = with_subject_poses([es, unlabelled, ed, other], load)
    ed_pose = heart_pose(load(ed)["label"].as_tensor(), load(ed)["label"].affine)
    for entry in posed[:3]:
        np.testing.assert_allclose(entry[POSE_KEY], ed_pose.numpy())
    es_pose = heart_pose(load(es)["label"].as_tensor(), load(es)["label"].affine)
    assert not np.allclose(ed_pose.numpy(), es_pose.numpy())  # the ES frame's own pose is another one
    other_label = load(other)["label"]
    np.testing.assert_allclose(posed[3][POSE_KEY], heart_pose(other_label.as_tensor(), other_label.affine).numpy())
    with pytest.raises(DatalistError, match="subject 'u' has no labelled frame"):
        with_subject_poses([{"subject": "u", "case": "u1"}], load)


# --------------------------------------------------------------------------------------------- inference per subject


def test_batches_hold_whole_subjects_and_processes_share_subjects_not_frames() -> None:
    data = [{"subject": s, "case": f"{s}{k}"} for s, k in [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("b", 1)]]
    assert list(GroupBatchSampler(data, "subject", 1)) == [[0, 2], [1, 4], [3]]
    assert list(GroupBatchSampler(data, "subject", 2)) == [[0, 2, 1, 4], [3]]
    assert list(GroupBatchSampler(data, "case", 2)) == [[0, 1], [2, 3], [4]]  # the per-frame model's batches
    ranks = [list(GroupBatchSampler(data, "subject", 1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks == [[[0, 2], [3]], [[1, 4]]]
    # the per-frame model under torchrun: each frame its own batch, a subject's frames on one process
    ranks = [list(GroupBatchSampler(data, "case", 1, 2, r, shard_key="subject")) for r in (0, 1)]
    assert ranks == [[[0], [2], [3]], [[1], [4]]]
    with pytest.raises(InputDataError, match="3 subject group"):
        GroupBatchSampler(data, "case", 1, 4, 0, shard_key="subject")
    idle = [
        list(GroupBatchSampler(data, "case", 1, 4, r, shard_key="subject", every_rank_busy=False)) for r in range(4)
    ]
    assert idle == [[[0], [2]], [[1], [4]], [[3]], []]  # an inference may start more processes than subjects


def _cine_frames(seed: int = 3) -> list[MetaTensor]:
    """ED and ES of a synthetic subject as the bundle loads them: (1, X, Y, Z) in [0, 1] with their phases."""
    image, _, affine, info = generate_cine(seed, 10, **CINE_GRID)
    frames = []
    for k in (0, info["es_frame"]):
        volume = image[..., k] / image.max()
        frame = as_image(volume, affine, batch=False)
        frame.meta[PHASE_KEY] = k / 10
        frames.append(frame)
    return frames


def test_frames_of_one_subject_share_one_code_and_one_pose() -> None:
    network = tiny_net(coord_dim=5, num_classes=4)
    locator = HeartLocator(refine_steps=2)
    fit = LatentOptimisationInferer(num_steps=4, num_points=64, extent_mm=100.0, log_every=0, heart_locator=locator)
    joint = _cine_frames()
    codes = fit.fit(joint, network, groups=["s", "s"])
    torch.testing.assert_close(codes[0], codes[1])
    torch.testing.assert_close(joint[0].meta[POSE_KEY], joint[1].meta[POSE_KEY])
    apart = _cine_frames()
    separate = fit.fit(apart, network)
    assert not torch.allclose(separate[0], separate[1])  # alone, each frame gets its own code...
    assert not torch.allclose(apart[0].meta[POSE_KEY], apart[1].meta[POSE_KEY])  # ...and its own pose
    # the joint code is fitted to both frames: neither frame's own code
    assert not torch.allclose(codes[0], separate[0]) and not torch.allclose(codes[0], separate[1])


def test_the_qc_reference_fits_a_subjects_frames_with_one_code() -> None:
    network = tiny_net(coord_dim=5, num_classes=4)
    fit = LatentOptimisationInferer(num_steps=3, num_points=64, extent_mm=100.0, log_every=0)
    codes = torch.randn(3, network.latent_dim)
    names = ["background", "lv", "myo", "rv"]
    joint = qc_reference(fit, network, _cine_frames(), codes, names, groups=["s", "s"])
    apart = qc_reference(fit, network, _cine_frames(), codes, names)
    distance = joint["nearest_training_code_distance"]
    assert distance[0] == pytest.approx(distance[1])  # one code: one distance
    assert apart["nearest_training_code_distance"][0] != pytest.approx(apart["nearest_training_code_distance"][1])


def test_a_cine_network_reads_a_frame_without_a_phase_at_end_diastole(caplog: pytest.LogCaptureFixture) -> None:
    network = tiny_net(coord_dim=5)
    image = as_image(np.random.default_rng(0).random((6, 6, 2)), batch=False)
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        LatentOptimisationInferer(num_steps=1, num_points=16, log_every=0).fit([image], network)
    assert "no cardiac phase" in caplog.text and image.meta[PHASE_KEY] == 0.0


def test_a_per_frame_network_refuses_a_frame_with_a_phase() -> None:
    image = as_image(np.random.default_rng(0).random((6, 6, 2)), batch=False)
    image.meta[PHASE_KEY] = 0.3
    with pytest.raises(ValueError, match="set cine_model to false"):
        LatentOptimisationInferer(num_steps=1, num_points=16, log_every=0).fit([image], tiny_net())


def test_the_coordinate_count_is_read_from_saved_weights(tmp_path: Path) -> None:
    for coord_dim in (3, 5):
        path = tmp_path / f"model{coord_dim}.pt"
        torch.save(NISFNet(coord_dim=coord_dim, latent_dim=16, hidden_dim=16, num_layers=1).state_dict(), path)
        assert saved_coord_dim(path, latent_dim=16) == coord_dim
        torch.save({"model": torch.load(path)}, tmp_path / "wrapped.pt")
        assert saved_coord_dim(tmp_path / "wrapped.pt", latent_dim=16) == coord_dim
    assert saved_coord_dim(tmp_path / "missing.pt", default=3) == 3


# --------------------------------------------------------------------------------------------------- synthetic cycles


def test_a_synthetic_cycle_runs_from_ed_to_es_and_back_with_a_constant_myocardium() -> None:
    image, label, affine, info = generate_cine(7, 20, **CINE_GRID)
    assert image.shape == label.shape == (*CINE_GRID["shape"], 20) and info["ed_frame"] == 0
    _, ed_label, ed_affine, _ = generate_subject(7, "ED", **CINE_GRID)
    _, es_label, _, _ = generate_subject(7, "ES", **CINE_GRID)
    np.testing.assert_array_equal(label[..., 0], ed_label)  # the same heart as the per-frame cohort's ED and ES
    np.testing.assert_array_equal(label[..., info["es_frame"]], es_label)
    np.testing.assert_array_equal(affine, ed_affine)
    lv = np.array([f["lv_blood_pool"] for f in info["frames"]])
    assert int(np.argmax(lv)) == 0 and int(np.argmin(lv)) == info["es_frame"]
    assert 6 <= info["es_frame"] <= 8  # 30-40 % of the cycle
    assert np.all(np.diff(lv[: info["es_frame"] + 1]) < 0) and np.all(np.diff(lv[info["es_frame"] :]) > 0)
    assert np.ptp([f["lv_myocardium"] for f in info["frames"]]) < 0.12 * np.mean(
        [f["lv_myocardium"] for f in info["frames"]]
    )


def test_a_cine_cohort_with_ed_es_labels_lists_labelled_and_unlabelled_frames(tmp_path: Path) -> None:
    path = generate_cohort(
        str(tmp_path), num_subjects=2, num_validation=1, num_frames=10, cine_labels="ed_es", **CINE_GRID
    )
    items = assign_cardiac_phases(expand_cine_datalist(load_datalist(path, "training", keys=("image",))))
    assert len(items) == 10 and {i["subject"] for i in items} == {"synth000"}
    labelled = sorted((i["frame"], i["cardiac_phase"]) for i in items if "label" in i)
    es = json.loads(Path(path).read_text())["training"][0]["es_frame"]
    assert labelled == [(0, 0.0), (es, es / 10)]
    assert sorted(i["case"] for i in items) == [f"synth000_cine_t{k:02d}" for k in range(10)]


def test_the_default_cohort_places_its_ed_and_es_frames_in_the_cycle(tmp_path: Path) -> None:
    path = generate_cohort(str(tmp_path), num_subjects=1, num_validation=0, **CINE_GRID)
    ed, es = json.loads(Path(path).read_text())["training"]
    _, _, _, info = generate_cine(ed["seed"], 20, **CINE_GRID)
    assert (ed["phase"], ed["cardiac_phase"]) == ("ED", 0.0)
    assert (es["phase"], es["cardiac_phase"]) == ("ES", info["es_frame"] / 20)  # where the cine puts its ES frame


def test_frames_join_into_one_4d_file_with_the_cines_geometry(tmp_path: Path) -> None:
    affine = oblique_affine((2.0, 1.5, 6.0), (-10.0, 4.0, 20.0), 0.4)
    cine = nib.Nifti1Image(np.zeros((5, 4, 3, 3), np.float32), affine)
    cine.header.set_xyzt_units("mm", "msec")
    cine.header.set_zooms(cine.header.get_zooms()[:3] + (35.0,))
    nib.save(cine, str(tmp_path / "cine.nii.gz"))
    paths = []
    for k in range(3):
        paths.append(save_nifti(np.full((5, 4, 3), k, np.uint8), affine, tmp_path / f"cine_t{k:02d}_seg.nii.gz"))
    joined = nib.load(join_frames(paths, tmp_path / "cine_seg.nii.gz", tmp_path / "cine.nii.gz"))
    assert joined.shape == (5, 4, 3, 3)
    np.testing.assert_allclose(joined.affine, affine, atol=1e-5)
    assert joined.header.get_zooms()[3] == pytest.approx(35.0) and joined.header.get_xyzt_units()[1] == "msec"
    assert [int(np.asarray(joined.dataobj)[0, 0, 0, k]) for k in range(3)] == [0, 1, 2]


def test_the_volume_curve_finds_end_diastole_and_end_systole() -> None:
    _, label, affine, info = generate_cine(5, 20, **CINE_GRID)

    def field_at(phase: float) -> LabelField:  # the manual labels of the frame at that phase
        return LabelField(label[..., int(round(phase * 20)) % 20], affine)

    curve = volume_curve(field_at, curve_phases(20), affine, CINE_GRID["shape"], spacing=2.0, roi_margin_mm=None)
    ed, es = cycle_extremes(curve)
    assert (ed, es) == (0.0, info["es_frame"] / 20)
    true_lv = [f["lv_blood_pool"] for f in info["frames"]]
    np.testing.assert_allclose(curve.volumes["lv_blood_pool"], true_lv, rtol=0.15)
    assert len(curve.rows("s")) == 20


def test_the_curve_reads_a_box_around_the_heart_not_around_stray_blobs() -> None:
    _, label, affine, info = generate_cine(5, 4, **CINE_GRID)
    stray = label[..., 0].copy()
    stray[0:2, 0:2, :] = 1  # an "LV" blob in the field of view's corner, far from the heart
    field = LabelField(stray, affine)
    whole = volume_curve(lambda _: field, [0.0, 0.5], affine, CINE_GRID["shape"], spacing=4.0)
    centre = np.asarray(info["lv_center_mm"])
    boxed = volume_curve(
        lambda _: field, [0.0, 0.5], affine, CINE_GRID["shape"], spacing=4.0, heart_centre_mm=centre, heart_radius_mm=55
    )
    blob_ml = 4 * 4.0 * 4.0 * 10.0 * 6 / 1000.0
    assert whole.volumes["lv_blood_pool"][0] - boxed.volumes["lv_blood_pool"][0] == pytest.approx(blob_ml)
    assert boxed.volumes["lv_blood_pool"][0] == pytest.approx(info["frames"][0]["lv_blood_pool"], rel=0.1)


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cine_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A cine model trained for a few epochs on two synthetic cycles labelled at ED and ES only."""
    root = tmp_path_factory.mktemp("cine_bundle")
    data = tmp_path_factory.mktemp("cine_cohort")
    datalist = generate_cohort(
        str(data), num_subjects=2, num_validation=1, num_frames=8, cine_labels="ed_es", **CINE_GRID
    )
    run_bundle(
        "training",
        "train.json",
        root,
        "--datalist",
        datalist,
        "--cine_model",
        "True",
        "--max_epochs",
        "2",
        "--num_points",
        "256",
        "--val_interval",
        "2",
        "--val_max_steps",
        "2",
        "--val_monitor_every",
        "1",
        *TINY_NET_ARGS,
    )
    return root, Path(datalist)


def test_a_cine_model_trains_with_one_code_per_subject(cine_bundle: tuple[Path, Path]) -> None:
    root, _ = cine_bundle
    state = torch.load(root / "models" / "training_state.pt", weights_only=False)
    table = state["latent_table"] if "latent_table" in state else state["latents"]
    assert table["_extra_state"]["case_ids"] == ["synth000"]  # one code for the 8 frames of the training subject
    assert saved_coord_dim(root / "models" / "model.pt", latent_dim=16) == 5


def test_a_4d_cine_in_gives_a_4d_segmentation_out(cine_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = cine_bundle
    data = tmp_path / "in"
    data.mkdir()
    source = datalist.parent / "synth001_cine.nii.gz"
    (data / "cine.nii.gz").write_bytes(source.read_bytes())
    run_bundle(
        "inference",
        "inference.json",
        root,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--inference_steps",
        "2",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    seg, cine = nib.load(str(tmp_path / "out" / "cine_seg.nii.gz")), nib.load(str(source))
    assert seg.shape == cine.shape and seg.shape[3] == 8
    np.testing.assert_allclose(seg.affine, cine.affine, atol=1e-4)
    assert nib.load(str(tmp_path / "out" / "cine_recon.nii.gz")).shape == cine.shape
    assert not list((tmp_path / "out").glob("cine_t0*_seg.nii.gz"))  # the frames' files were joined
    assert len(list((tmp_path / "out").glob("cine_t*_qc.json"))) == 8  # quality control for every frame


def test_per_frame_files_of_a_subject_are_fitted_together_and_written_apart(
    cine_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    root, datalist = cine_bundle
    data = tmp_path / "in"
    data.mkdir()
    cine = nib.load(str(datalist.parent / "synth001_cine.nii.gz"))
    for k in (0, 3):
        save_nifti(np.asarray(cine.dataobj)[..., k], cine.affine, data / f"patient9_frame{k + 1:02d}.nii.gz")
    result = run_bundle(
        "inference",
        "inference.json",
        root,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--inference_steps",
        "2",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    for k in (1, 4):
        seg = nib.load(str(tmp_path / "out" / f"patient9_frame{k:02d}_seg.nii.gz"))
        assert seg.shape == cine.shape[:3]
        np.testing.assert_allclose(seg.affine, cine.affine, atol=1e-4)
    assert "no cardiac phase" not in result.stderr + result.stdout  # phases from the file names


def _measure_cycle(root: Path, datalist: Path, tmp_path: Path, inference_steps: int, curve_phases: int) -> Path:
    """The ``measuring`` run on a tiny grid with the tiny network; returns its output folder."""
    out = tmp_path / "measures"
    run_bundle(
        "measuring",
        ["inference.json", "measure.json"],
        root,
        "--datalist_file",
        str(datalist),
        "--output_dir",
        str(out),
        "--inference_steps",
        str(inference_steps),
        "--measure_spacing",
        "4.0",
        "--curve_phases",
        str(curve_phases),
        "--curve_spacing",
        "4.0",
        "--mesh_format",
        "None",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    return out


def test_measures_over_the_cycle_come_with_a_volume_curve(cine_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = cine_bundle
    out = _measure_cycle(root, datalist, tmp_path, inference_steps=2, curve_phases=5)
    curve = (out / "volume_curves.csv").read_text().splitlines()
    assert curve[0].startswith("subject,phase,lv_blood_pool_ml") and len(curve) == 1 + 5
    assert [line.split(",")[1] for line in curve[1:]] == ["0.0000", "0.2000", "0.4000", "0.6000", "0.8000"]
    assert (out / "figures" / "synth001_volume_curve.png").is_file()
    report = json.loads((out / "measures.json").read_text())
    subject = report["subjects"]["synth001"]
    assert subject["phase_rule"] == "datalist phase"  # the datalist names its ED and ES frames...
    es = json.loads(datalist.read_text())["validation"][0]["es_frame"]
    assert (subject["ed_phase"], subject["es_phase"]) == (0.0, es / 8)  # ...and the curve is marked at theirs
    assert report["settings"]["curve_phases"] == 5


def test_without_named_frames_ed_and_es_are_the_curves_extremes(cine_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, datalist = cine_bundle
    unnamed = tmp_path / "datalist.json"
    cine = str(datalist.parent / "synth001_cine.nii.gz")
    unnamed.write_text(json.dumps({"validation": [{"image": cine, "subject": "s1"}]}))
    out = _measure_cycle(root, unnamed, tmp_path, inference_steps=1, curve_phases=4)
    report = json.loads((out / "measures.json").read_text())
    subject = report["subjects"]["s1"]
    assert subject["phase_rule"] == "largest / smallest LV blood pool of the code over 4 phases"
    curve = [row for row in csv.DictReader((out / "volume_curves.csv").open())]
    lv = [float(row["lv_blood_pool_ml"]) for row in curve]
    phases = [float(row["phase"]) for row in curve]
    assert subject["ed_phase"] == phases[int(np.argmax(lv))] and subject["es_phase"] == phases[int(np.argmin(lv))]
    assert subject["ed_case"] == f"phase {subject['ed_phase']:.3f}"


def test_evaluation_scores_the_labelled_frames_of_a_subjects_cine(
    cine_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    root, datalist = cine_bundle
    out = tmp_path / "eval"
    result = run_bundle(
        "evaluating",
        ["inference.json", "evaluate.json"],
        root,
        "--datalist_file",
        str(datalist),
        "--section",
        "validation",
        "--output_dir",
        str(out),
        "--inference_steps",
        "2",
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    rows = (out / "mean_dice_raw.csv").read_text().splitlines()[1:]
    es = json.loads(datalist.read_text())["validation"][0]["es_frame"]
    scored = sorted(Path(row.split(",")[0]).name for row in rows)
    assert scored == ["synth001_cine_t00.nii.gz", f"synth001_cine_t{es:02d}.nii.gz"]  # its ED and ES frames
    assert "6 of 8 frames have no label and are left out of scoring" in result.stdout + result.stderr
