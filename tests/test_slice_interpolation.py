"""Label-interpolation baselines for held-out slices (nearest slice, shape-based) and hidden-slice scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nisf_monai.baselines import (
    hidden_slice_dice,
    nearest_slice_labels,
    scored_slices,
    shape_based_labels,
    signed_distance,
)
from nisf_monai.handlers import HiddenSliceReport


def disc_stack(radii: list[float], size: int = 40, value: int = 1) -> np.ndarray:
    """(size, size, Z) labels: a centred disc of the given radius (pixels) in each slice."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    r = np.hypot(i - (size - 1) / 2, j - (size - 1) / 2)
    return np.stack([np.where(r <= rad, value, 0) for rad in radii], axis=-1).astype(np.uint8)


def test_signed_distance_is_exact_signed_and_respects_anisotropic_spacing() -> None:
    mask = np.zeros((9, 11), bool)
    mask[4, 5] = True
    d = signed_distance(mask, spacing=(2.0, 0.5))
    assert d[4, 5] == pytest.approx(
        -0.5
    )  # inside: minus the distance to the nearest outside pixel (0.5 mm along axis 1)
    assert d[4, 6] == pytest.approx(0.5) and d[5, 5] == pytest.approx(2.0)
    assert d[7, 9] == pytest.approx(np.hypot(3 * 2.0, 4 * 0.5), rel=1e-5)
    block = np.zeros((12, 12), bool)
    block[3:9, 3:9] = True
    d = signed_distance(block)
    assert (d[block] < 0).all() and (d[~block] > 0).all()
    assert d[5, 5] == pytest.approx(-3.0)  # 3 pixels from the nearest outside pixel (row or column 2)
    assert signed_distance(np.zeros((4, 4), bool)).min() > 1e5 and signed_distance(np.ones((4, 4), bool)).max() < -1e5


def test_signed_distance_equals_brute_force_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    spacing = (1.3, 0.7)
    for density in (0.05, 0.5, 0.9):
        mask = rng.random((23, 17)) < density
        mask[0, 0], mask[-1, -1] = True, False  # neither empty nor full
        i, j = np.nonzero(np.ones_like(mask))
        points = np.stack([i * spacing[0], j * spacing[1]], axis=1)
        dist = np.linalg.norm(points[:, None] - points[None], axis=-1)  # all pairs
        inside, flat = mask.ravel(), np.full(mask.size, np.nan)
        flat[~inside] = dist[~inside][:, inside].min(axis=1)
        flat[inside] = -dist[inside][:, ~inside].min(axis=1)
        np.testing.assert_allclose(signed_distance(mask, spacing), flat.reshape(mask.shape), rtol=1e-5, atol=1e-5)


def test_nearest_slice_copies_the_nearest_kept_slice_ties_to_the_lower() -> None:
    label = np.stack([np.full((3, 3), z, np.uint8) for z in range(7)], axis=-1)  # slice z holds value z
    out = nearest_slice_labels(label, [0, 2, 5])
    assert [int(out[0, 0, z]) for z in range(7)] == [0, 0, 2, 2, 5, 5, 5]  # 1: tie 0/2 -> 0; 3: 2 (dist 1) ; 4: 5
    out_bool = nearest_slice_labels(label, np.isin(np.arange(7), [0, 2, 5]))
    np.testing.assert_array_equal(out, out_bool)
    # along another axis
    np.testing.assert_array_equal(
        nearest_slice_labels(np.moveaxis(label, -1, 0), [0, 2, 5], axis=0), np.moveaxis(out, -1, 0)
    )


def test_shape_based_reproduces_kept_slices_and_interpolates_a_linear_disc() -> None:
    """A disc whose radius grows linearly: shape-based recovers the hidden slices almost exactly and beats
    nearest-slice copying, which is off by one radius step."""
    radii = [4, 6, 8, 10, 12, 14, 16]
    label = disc_stack(radii)
    kept = [0, 2, 4, 6]
    sdf = shape_based_labels(label, kept, num_classes=2)
    nn = nearest_slice_labels(label, kept)
    np.testing.assert_array_equal(sdf[..., kept], label[..., kept])
    hidden = scored_slices(kept, len(radii))
    assert hidden.tolist() == [1, 3, 5]
    dice_sdf = hidden_slice_dice(sdf, label, hidden, 2)[0]
    dice_nn = hidden_slice_dice(nn, label, hidden, 2)[0]
    assert dice_sdf > 0.97 and dice_nn < 0.85 and dice_sdf > dice_nn + 0.1
    # the interpolated area lies between the neighbours' areas, close to the true one
    for z in hidden:
        assert (label[..., z - 1] > 0).sum() < (sdf[..., z] > 0).sum() < (label[..., z + 1] > 0).sum()


def test_shape_based_classes_and_tapering() -> None:
    """Two classes are interpolated independently; a structure missing on one side shrinks, not jumps."""
    lv = disc_stack([6, 6, 6], value=1)
    ring = disc_stack([10, 10, 10], value=2)
    label = np.where(lv > 0, 1, ring)
    label[..., 2] = np.where(disc_stack([10], value=2)[..., 0] > 0, 2, 0)  # slice 2: myocardium disc only, no LV
    out = shape_based_labels(label, [0, 2], num_classes=3)
    middle = out[..., 1]
    assert set(np.unique(middle)) == {0, 1, 2}
    lv_area = (middle == 1).sum()
    assert 0 < lv_area < (label[..., 0] == 1).sum()  # the LV cavity tapers towards slice 2
    # the outer contour of the myocardium is the same in both kept slices, so it stays
    np.testing.assert_array_equal(middle > 0, label[..., 0] > 0)
    assert out.dtype == label.dtype


def test_extrapolated_slices_copy_the_nearest_and_are_not_scored_by_default() -> None:
    label = disc_stack([4, 6, 8, 10, 12])
    out = shape_based_labels(label, [1, 3], num_classes=2)
    np.testing.assert_array_equal(out[..., 0], label[..., 1])
    np.testing.assert_array_equal(out[..., 4], label[..., 3])
    assert scored_slices([1, 3], 5).tolist() == [2]
    assert scored_slices([1, 3], 5, include_extrapolated=True).tolist() == [0, 2, 4]
    with pytest.raises(ValueError):
        scored_slices([], 5)


def test_hidden_slice_dice_matches_hand_counts_and_ignores_other_slices() -> None:
    label = np.zeros((4, 4, 3), np.uint8)
    pred = np.zeros_like(label)
    label[:2, :2, 1] = 1  # 4 voxels
    pred[:2, :1, 1] = 1  # 2 voxels, all correct
    pred[:, :, 0] = 1  # wrong but on an unscored slice
    dice = hidden_slice_dice(pred, label, [1], 3)
    assert dice[0] == pytest.approx(2 * 2 / 6) and np.isnan(dice[1])  # class 2 absent: NaN


def test_report_scores_hidden_slices_and_writes_outputs(tmp_path: Path) -> None:
    label = disc_stack([4, 6, 8, 10, 12, 14])
    affine = torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0], dtype=torch.float64))
    image = MetaTensor(
        torch.as_tensor(label[None], dtype=torch.float32), affine=affine, meta={"filename_or_obj": "/d/disc.nii.gz"}
    )
    mask = torch.zeros((1, *label.shape), dtype=torch.bool)
    mask[..., ::2] = True  # slices 0, 2, 4 kept; 1, 3 scored; 5 extrapolated
    report = HiddenSliceReport(tmp_path, ["background", "disc"], settings={"keep": "every_other"})
    record = report.score(
        {"image": image, "label": torch.as_tensor(label[None]), "pred": torch.as_tensor(label[None]), "mask": mask}
    )
    assert record["scored_slices"] == [1, 3] and record["kept_slices"] == [0, 2, 4]
    assert record["dice"]["nisf"] == [1.0]  # the prediction is the truth
    assert record["dice"]["shape_based"][0] > record["dice"]["nearest"][0]
    report._write()
    saved = json.loads((tmp_path / "hidden_slice_dice.json").read_text())
    assert saved["summary"]["nisf"]["disc"][0] == 1.0 and saved["num_scored_slices"] == 2
    rows = (tmp_path / "hidden_slice_dice.csv").read_text().splitlines()
    assert rows[0] == "case,method,disc,mean,scored_slices" and any(r.startswith("disc,shape_based,") for r in rows)
    assert (tmp_path / "hidden_slice_dice_examples.png").stat().st_size > 0
    with pytest.raises(ValueError, match="target_spacing"):
        report.score(
            {"image": image, "label": torch.as_tensor(label[None]), "pred": torch.zeros(1, 3, 3, 3), "mask": mask}
        )


def test_interpolating_config_runs_and_writes_its_outputs(tmp_path: Path) -> None:
    """The bundle's `interpolating` config (inference.json + evaluate.json + interpolate.json) on two small
    synthetic cases with a tiny untrained network: every other slice hidden, all three methods scored."""
    import nibabel as nib
    from monai.bundle import ConfigParser

    from nisf_monai.data import generate_cohort
    from nisf_monai.networks import NISFNet

    datalist = Path(
        generate_cohort(
            str(tmp_path / "synth"), num_subjects=2, shape=(24, 24, 6), spacing=(5.0, 5.0, 10.0), num_validation=1
        )
    )
    # a mask in the datalist for the first case: only its first 12 rows may be used
    # (relative path, like image and label)
    content = json.loads(datalist.read_text())
    first = content["validation"][0]
    reference = nib.load(str(datalist.parent / first["image"]))
    half = np.zeros((24, 24, 6), np.uint8)
    half[:12] = 1
    nib.save(nib.Nifti1Image(half, reference.affine), str(datalist.parent / "half_mask.nii.gz"))
    first["mask"] = "half_mask.nii.gz"
    datalist.write_text(json.dumps(content))
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(NISFNet(latent_dim=8, hidden_dim=16, num_layers=2).state_dict(), tmp_path / "models" / "model.pt")
    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / name) for name in ("inference.json", "evaluate.json", "interpolate.json")])
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "dataset_dir": str(tmp_path / "synth"),
            "section": "validation",
            "output_dir": str(tmp_path / "out"),
            "inference_steps": 3,
            "num_points": 128,
            "batch_size": 2,
            "latent_dim": 8,
            "hidden_dim": 16,
            "num_layers": 2,
            "device": "$torch.device('cpu')",
        }
    )
    parser.get_parsed_content("interpolating")
    saved = json.loads((tmp_path / "out" / "hidden_slice_dice.json").read_text())
    assert saved["num_cases"] == 2 and saved["settings"]["keep_slices"] == "every_other"
    assert all(c["kept_slices"] == [0, 2, 4] and c["scored_slices"] == [1, 3] for c in saved["cases"])
    # the datalist mask and the hidden slices combine: half the rows of half the slices
    assert [c["kept_voxel_fraction"] for c in saved["cases"]] == [0.25, 0.5]
    assert set(saved["summary"]) == {"nisf", "nearest", "shape_based", "nisf_all_slices"}
    assert (tmp_path / "out" / "hidden_slice_dice_examples.png").stat().st_size > 0
    assert len((tmp_path / "out" / "hidden_slice_dice.csv").read_text().splitlines()) == 1 + 2 * 4
