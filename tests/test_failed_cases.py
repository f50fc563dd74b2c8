"""Runs over many cases account for the ones that failed: a run in which every case failed exits non-zero; a run in
which some failed says how many in its last log line and lists them in ``<output_dir>/failed_cases.txt``."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, run_bundle
from monai.data import DataLoader
from monai.data.utils import no_collation
from monai.handlers import MeanDice, from_engine
from monai.transforms import AsDiscreted, Compose, ScaleIntensityRangePercentilesd

from nisf_monai.data import FAILED_CASES_FILENAME, SkippingDataset, report_failed_cases, write_failed_cases
from nisf_monai.engines import LatentOptimisationEvaluator
from nisf_monai.errors import NoUsableCaseError
from nisf_monai.geometry import PlaneRun
from nisf_monai.handlers import FailedCasesHandler
from nisf_monai.inferers import LatentOptimisationInferer
from nisf_monai.networks import NISFNet
from nisf_monai.transforms import LoadCased, ValidateCased

pytestmark = pytest.mark.usefixtures("single_thread")

AFFINE = np.diag([4.0, 4.0, 10.0, 1.0])
SHAPE = (12, 12, 3)


def write_case(folder: Path, name: str, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[3:7, 3:7, :] = 1
    label[7:9, 3:7, :] = 2
    label[9:11, 3:7, :] = 3
    image = (rng.random(SHAPE) + label).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, AFFINE), str(folder / f"{name}_gt.nii.gz"))
    return {"image": str(folder / f"{name}.nii.gz"), "label": str(folder / f"{name}_gt.nii.gz")}


def write_broken(folder: Path, name: str = "broken") -> dict[str, str]:
    """A truncated image (with a readable label) that ``LoadCased`` refuses."""
    good = write_case(folder, name, seed=9)
    data = Path(good["image"]).read_bytes()
    Path(good["image"]).write_bytes(data[:120])
    return good


# ---------------------------------------------------------------------------------------------- the file and the line


def test_write_failed_cases_lists_sources_and_reasons_and_clears_a_stale_list(tmp_path: Path) -> None:
    failed = [("/d/a.nii.gz", "/d/a.nii.gz: cannot read this image: truncated"), ("/d/b.nii.gz", "NaN\nvoxels")]
    path = write_failed_cases(tmp_path / "out", failed)
    assert path == str(tmp_path / "out" / FAILED_CASES_FILENAME)
    assert Path(path).read_text() == "/d/a.nii.gz\tcannot read this image: truncated\n/d/b.nii.gz\tNaN voxels\n"
    assert write_failed_cases(tmp_path / "out", []) is None  # a later run where nothing failed
    assert not Path(path).exists()


def test_report_failed_cases_raises_when_nothing_was_done(caplog: pytest.LogCaptureFixture) -> None:
    failed = [(f"/d/c{i}.nii.gz", "unreadable") for i in range(7)]
    with pytest.raises(NoUsableCaseError, match=r"all 7 case\(s\) failed, nothing was produced \(listed in L\)"):
        report_failed_cases(failed, 0, "L")
    with caplog.at_level(logging.WARNING, logger="nisf_monai"):
        report_failed_cases(failed, 3, "L")
        report_failed_cases([], 3, None)  # nothing failed: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "7 case(s) were skipped and 3 done (listed in L): "
        "/d/c0.nii.gz, /d/c1.nii.gz, /d/c2.nii.gz, /d/c3.nii.gz, /d/c4.nii.gz, ..."
    ]


# ---------------------------------------------------------------------------------------------- the evaluator


def evaluator(cases: list[dict], output_dir: Path, with_metric: bool) -> LatentOptimisationEvaluator:
    """The evaluate.json arrangement, small: SkippingDataset, lists of cases per batch (batch size 1, so a
    batch can be wholly skipped), MeanDice from ``from_engine``, and the failed-cases handler."""
    transform = Compose(
        [
            LoadCased(["image", "label"], image_only=True, ensure_channel_first=True),
            ValidateCased(label_key="label", num_classes=4),
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        ]
    )
    loader = DataLoader(SkippingDataset(cases, transform), batch_size=1, collate_fn=no_collation)
    torch.manual_seed(0)
    network = NISFNet(latent_dim=4, num_classes=4, hidden_dim=8, num_layers=1)
    metric = {"mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))}
    return LatentOptimisationEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=network,
        inferer=LatentOptimisationInferer(num_steps=1, num_points=32, log_every=0),
        postprocessing=AsDiscreted(["pred", "label"], to_onehot=4) if with_metric else None,
        key_val_metric=metric if with_metric else None,
        val_handlers=[FailedCasesHandler(output_dir)],
        decollate=False,
    )


def test_evaluator_with_some_failed_cases_scores_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A wholly skipped batch does not reach the metric (MONAI's ``from_engine`` would fail on it); the metric covers
    the good cases, the file lists the bad one, and the last log line counts both."""
    cases = [write_broken(tmp_path), write_case(tmp_path, "good1", 1), write_case(tmp_path, "good2", 2)]
    engine = evaluator(cases, tmp_path / "out", with_metric=True)
    with caplog.at_level(logging.INFO):
        engine.run()
    assert np.isfinite(engine.state.metrics["mean_dice"])
    assert engine.state.num_cases_done == 2 and engine.state.skipped_cases == [cases[0]["image"]]
    lines = (tmp_path / "out" / FAILED_CASES_FILENAME).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cases[0]['image']}\tcannot read this image")
    assert caplog.records[-1].getMessage() == (
        f"1 case(s) were skipped and 2 done (listed in {tmp_path / 'out' / FAILED_CASES_FILENAME}): {cases[0]['image']}"
    )


class FailingOn(LatentOptimisationInferer):
    """Fails while fitting the case whose file name contains ``name``, as a NaN or too little memory would."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.name = name

    def fit(self, inputs, network, *args, **kwargs):
        if any(self.name in str(image.meta.get("filename_or_obj", "")) for image in inputs):
            raise RuntimeError("the fit diverged\nsecond line")
        return super().fit(inputs, network, *args, **kwargs)


def test_a_case_failing_in_its_fit_is_listed_and_the_run_goes_on(tmp_path: Path) -> None:
    cases = [write_case(tmp_path, "good1", 1), write_case(tmp_path, "bad", 2), write_case(tmp_path, "good2", 3)]
    engine = evaluator(cases, tmp_path / "out", with_metric=True)
    engine.inferer = FailingOn("bad", num_steps=1, num_points=32, log_every=0)
    engine.run()
    assert engine.state.num_cases_done == 2 and np.isfinite(engine.state.metrics["mean_dice"])
    lines = (tmp_path / "out" / FAILED_CASES_FILENAME).read_text().splitlines()
    assert lines == [f"{cases[1]['image']}\tRuntimeError: the fit diverged"]


@pytest.mark.parametrize("with_metric", [True, False])
def test_evaluator_where_every_case_failed_raises(tmp_path: Path, with_metric: bool) -> None:
    """Every case skipped: the run stops before its metrics (none can be computed) and raises, naming the list."""
    cases = [write_broken(tmp_path, "b1"), write_broken(tmp_path, "b2")]
    engine = evaluator(cases, tmp_path / "out", with_metric)
    with pytest.raises(NoUsableCaseError, match=r"all 2 case\(s\) failed"):
        engine.run()
    assert len((tmp_path / "out" / FAILED_CASES_FILENAME).read_text().splitlines()) == 2
    assert "mean_dice" not in engine.state.metrics


def test_evaluator_counts_restart_with_each_run(tmp_path: Path) -> None:
    """Validation runs the same evaluator every few epochs: counts are per run, and a run without failures (the
    broken file was replaced meanwhile) removes the list the earlier run wrote."""
    broken, good = write_broken(tmp_path), write_case(tmp_path, "good", 1)
    engine = evaluator([broken, good], tmp_path / "out", with_metric=False)
    engine.run()
    assert engine.state.skipped_cases == [broken["image"]] and engine.state.num_cases_done == 1
    assert (tmp_path / "out" / FAILED_CASES_FILENAME).is_file()
    write_case(tmp_path, "broken", 3)
    engine.run()
    assert engine.state.skipped_cases == [] and engine.state.failed_cases == [] and engine.state.num_cases_done == 2
    assert not (tmp_path / "out" / FAILED_CASES_FILENAME).exists()


# ---------------------------------------------------------------------------------------------- geometry runs


def plane_run(cases: list[dict], output_dir: Path) -> PlaneRun:
    torch.manual_seed(0)
    network = NISFNet(latent_dim=4, num_classes=4, hidden_dim=8, num_layers=1)
    transform = Compose(
        [
            LoadCased("image", image_only=True, ensure_channel_first=True),
            ValidateCased(label_key=None),
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        ]
    )
    datalist = [{"image": c["image"]} for c in cases]
    return PlaneRun(
        network,
        LatentOptimisationInferer(num_steps=1, num_points=32, log_every=0),
        transform,
        datalist,
        output_dir,
        spacing=4.0,
        size=[6, 6],
        u=[1, 0, 0],
        v=[0, 0, 1],
        centre=[20.0, 20.0, 10.0],
    )


def test_plane_run_lists_failed_cases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken, good = write_broken(tmp_path), write_case(tmp_path, "good", 1)
    with caplog.at_level(logging.INFO):
        written = plane_run([broken, good], tmp_path / "out").run()
    assert [w["case"] for w in written] == ["good"]
    assert (tmp_path / "out" / FAILED_CASES_FILENAME).read_text().startswith(f"{broken['image']}\t")
    assert caplog.records[-1].getMessage().startswith("1 case(s) were skipped and 1 done")
    with pytest.raises(NoUsableCaseError, match=r"all 1 case\(s\) failed"):
        plane_run([broken], tmp_path / "out2").run()
    assert (tmp_path / "out2" / FAILED_CASES_FILENAME).is_file()


# ---------------------------------------------------------------------------------------------- the bundle, as run


def run_inference(data: Path, out: Path) -> subprocess.CompletedProcess:
    return run_bundle(
        "inference",
        "inference.json",
        REPO / "bundle",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--inference_steps",
        "2",
        "--num_points",
        "256",
        cwd=data.parent,
        check=False,
        timeout=300,
        OMP_NUM_THREADS="1",
    )


def test_inference_run_with_a_bad_case_lists_it_and_says_how_many(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good, broken = write_case(data, "good"), write_broken(data)
    result = run_inference(data, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    listed = tmp_path / "out" / FAILED_CASES_FILENAME
    last = result.stdout.strip().splitlines()[-1]
    assert last.endswith(f"1 case(s) were skipped and 1 done (listed in {listed}): {broken['image']}"), last
    assert listed.read_text().startswith(f"{broken['image']}\tcannot read this image")
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz")) == ["good_seg.nii.gz"]
    assert Path(good["image"]).is_file()


def test_inference_run_where_every_case_failed_exits_non_zero(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    broken = write_broken(data)
    result = run_inference(data, tmp_path / "out")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    listed = tmp_path / "out" / FAILED_CASES_FILENAME
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert errors == [f"ERROR: all 1 case(s) failed, nothing was produced (listed in {listed})."], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert listed.read_text().startswith(f"{broken['image']}\t")
    assert not list((tmp_path / "out").glob("*_seg.nii.gz"))
