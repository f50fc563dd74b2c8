"""MONAI Label drives the bundle: the real ``monailabel`` package's ``BundleInferTask`` and ``BundleTrainTask``.

monailabel 0.8.5 is installed without its dependencies (they would pull a CUDA torch through torchvision and
sam2), plus the few modules it imports (the ``label`` extra); see the README. Its
``monailabel.transform.post`` imports ``make_grid`` and ``save_image`` from ``torchvision.utils`` at import
time, for 2D image utilities these tests never call. torchvision's PyPI wheels are CUDA builds that fail to
import beside the CPU torch, so when torchvision is missing (or broken) a shim of that one module, whose
functions raise if called, stands in for it while these tests run. Everything else is monailabel's own code.

The module skips, saying why, when monailabel or one of its import-time dependencies is not installed. The
glue (:func:`nisf_monai.data.case_ids`, :class:`nisf_monai.transforms.CaseIDd` and
:class:`nisf_monai.transforms.ProbabilitiesToLabelsd`) is tested without monailabel.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_MODEL, SYNTHETIC_MODEL_SETTINGS
from helpers import REPO
from monai.data import MetaTensor

from nisf_monai.data import case_ids, generate_subject
from nisf_monai.errors import DatalistError
from nisf_monai.transforms import CaseIDd, ProbabilitiesToLabelsd

BUNDLE = REPO / "bundle"
INSTALL = 'pip install -c requirements/cpu.txt -e ".[label]" && pip install --no-deps monailabel==0.8.5'
LABELS = {"lv_blood_pool": 1, "lv_myocardium": 2, "rv_blood_pool": 3}


# --- the glue, without monailabel -----------------------------------------------------------------------------


def test_case_ids_name_datastore_entries_by_file_and_keep_given_ids() -> None:
    data = [
        {"image": "/ds/a_01.nii.gz", "label": "/ds/labels/final/a_01.nii.gz"},
        {"image": "/ds/b.nii", "case": "b_t03"},
    ]
    assert case_ids(data) == ["a_01", "b_t03"]
    assert CaseIDd("image")(data[0])["case"] == "a_01"
    assert CaseIDd("image")(data[1])["case"] == "b_t03"


def test_case_ids_refuse_two_images_with_one_name() -> None:
    with pytest.raises(DatalistError, match="'a'"):
        case_ids([{"image": "/one/a.nii.gz"}, {"image": "/two/a.nii.gz"}])


def test_probabilities_become_labels_and_label_maps_pass_unchanged() -> None:
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    probs = MetaTensor(torch.softmax(torch.randn(4, 5, 6, 3), dim=0), affine=affine)
    out = ProbabilitiesToLabelsd("pred")({"pred": probs})["pred"]
    assert out.shape == (1, 5, 6, 3) and out.dtype == torch.uint8
    assert torch.equal(out[0].long(), probs.argmax(0))
    torch.testing.assert_close(out.affine, affine)
    labels = MetaTensor(torch.randint(0, 4, (1, 5, 6, 3), dtype=torch.uint8), affine=affine)
    assert ProbabilitiesToLabelsd("pred")({"pred": labels})["pred"] is labels
    batch = MetaTensor(torch.softmax(torch.randn(2, 4, 5, 6, 3), dim=1))
    batch.is_batch = True
    assert ProbabilitiesToLabelsd("pred")({"pred": batch})["pred"].shape == (2, 1, 5, 6, 3)


# --- the real monailabel ----------------------------------------------------------------------------------------


def _torchvision_shim() -> dict[str, types.ModuleType]:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision is a test shim here (see tests/test_monailabel.py)")

    package, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
    utils.make_grid = utils.save_image = unavailable  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    return {"torchvision": package, "torchvision.utils": utils}


@pytest.fixture(scope="module")
def monailabel() -> Iterator[types.SimpleNamespace]:
    """monailabel's bundle tasks and local datastore, imported with the torchvision shim if needed."""
    if importlib.util.find_spec("monailabel") is None:
        pytest.skip(f"monailabel is not installed; to run these tests: {INSTALL}")
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    shimmed = False
    try:
        importlib.import_module("torchvision.utils")
    except Exception:  # missing, or a CUDA wheel that cannot load beside the CPU torch
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        sys.modules.update(_torchvision_shim())
        shimmed = True
    try:
        infer = importlib.import_module("monailabel.tasks.infer.bundle")
        train = importlib.import_module("monailabel.tasks.train.bundle")
        local = importlib.import_module("monailabel.datastore.local")
        yield types.SimpleNamespace(
            BundleInferTask=infer.BundleInferTask,
            BundleTrainTask=train.BundleTrainTask,
            LocalDatastore=local.LocalDatastore,
        )
    except ImportError as err:
        pytest.skip(f"monailabel is installed but cannot be imported ({err}); install what it imports: {INSTALL}")
    finally:
        if shimmed:  # later tests see torchvision as it was
            for name in ("torchvision", "torchvision.utils"):
                sys.modules.pop(name, None)
            sys.modules.update(saved)


def _write_case(
    path: Path, seed: int, label_path: Path | None = None, oblique: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    image, label, affine, _ = generate_subject(seed, "ED", spacing=(3.0, 3.0, 8.0), shape=(48, 48, 8), oblique=oblique)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    if label_path is not None:
        nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return label, affine


def _dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return 2.0 * np.sum((a == c) & (b == c)) / max(np.sum(a == c) + np.sum(b == c), 1)


def test_bundle_infer_task_returns_labels_on_the_input_grid(monailabel: types.SimpleNamespace, tmp_path: Path) -> None:
    """The bundle, as MONAI Label loads it, segments an oblique synthetic case with a model trained on the synthetic
    cohort (the shipped ACDC model is for real scans); the label file it writes has the input's shape and affine,
    and lines up with the true anatomy (Dice), not merely the right size."""
    image = tmp_path / "case.nii.gz"
    truth, affine = _write_case(image, seed=7, oblique=True)
    bundle = tmp_path / "bundle"
    shutil.copytree(
        BUNDLE, bundle, ignore=shutil.ignore_patterns("data", "logs", "eval", "training_state.pt", "*.pt", "*.json")
    )
    shutil.copytree(BUNDLE / "configs", bundle / "configs", dirs_exist_ok=True)
    shutil.copy(SYNTHETIC_MODEL / "model.pt", bundle / "models" / "model.pt")
    task = monailabel.BundleInferTask(str(bundle), {})
    assert task.is_valid() and task.labels == LABELS
    task.bundle_config.update(SYNTHETIC_MODEL_SETTINGS)
    task.bundle_config["inference_steps"] = 20  # the synthetic model selected 75 (its inference_steps.json); 20 do here
    result, info = task({"image": str(image)})
    try:
        seg = nib.load(result)
        assert seg.shape == truth.shape
        np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
        labels = np.asarray(seg.dataobj)
    finally:
        os.remove(result)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    assert info["label_names"] == LABELS
    for c in (1, 2, 3):
        assert _dice(labels, truth, c) > 0.6, f"class {c}: Dice {_dice(labels, truth, c):.2f}"


def _request(max_epochs: int, val_split: float) -> dict:
    return {"model": "nisf", "max_epochs": max_epochs, "val_split": val_split, "multi_gpu": False}


@pytest.fixture(scope="module")
def label_training(
    monailabel: types.SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
) -> types.SimpleNamespace:
    """A copy of the shipped bundle trained by ``BundleTrainTask`` for one epoch on a datastore of 5 cases,
    one of which MONAI Label holds out for validation."""
    root = tmp_path_factory.mktemp("monailabel")
    bundle = root / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("data", "logs", "eval", "training_state.pt"))
    config = json.loads((bundle / "configs" / "train.json").read_text())
    config.update({"num_points": 1024, "val_interval": 1, "val_max_steps": 4, "val_monitor_every": 2})  # quick
    (bundle / "configs" / "train.json").write_text(json.dumps(config, indent=4))

    store = root / "datastore"
    (store / "labels" / "final").mkdir(parents=True)
    names = [f"study{i:02d}" for i in range(5)]
    for i, name in enumerate(names):
        _write_case(store / f"{name}.nii.gz", 100 + i, store / "labels" / "final" / f"{name}.nii.gz")
    datastore = monailabel.LocalDatastore(str(store), extensions=("*.nii.gz",), auto_reload=False)
    assert len(datastore.datalist()) == 5

    task = monailabel.BundleTrainTask(str(bundle), {})
    assert task.is_valid()
    task(_request(max_epochs=1, val_split=0.2), datastore)
    return types.SimpleNamespace(
        bundle=bundle, store=store, names=names, task=task, config=config, LocalDatastore=monailabel.LocalDatastore
    )


def test_bundle_train_task_sizes_the_latent_table_from_the_datastore(label_training: types.SimpleNamespace) -> None:
    """MONAI Label replaces ``train#dataset#data`` with its datastore's image/label pairs (no case IDs): the
    latent table holds exactly the training cases of that list, named by file, and one epoch updates the model
    loaded from the bundle; validation runs on MONAI Label's split."""
    models = label_training.bundle / "models"
    state = torch.load(models / "training_state.pt", weights_only=True)
    ids = state["latent_table"]["_extra_state"]["case_ids"]
    assert len(ids) == 4 and set(ids) < set(label_training.names)  # 5 cases, one held out for validation
    assert state["latent_table"]["weight"].shape == (4, label_training.config["latent_dim"])
    assert state["trainer"]["epoch"] == 1
    shipped = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    trained = torch.load(models / "model.pt", weights_only=True)
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)
    assert (models / "model_best.pt").is_file()  # validation ran on MONAI Label's held-out case


def test_a_second_train_request_trains_on_the_grown_datastore(label_training: types.SimpleNamespace) -> None:
    """After a case is labelled, MONAI Label trains again with the same max_epochs: the table follows the new
    data list (6 codes), and the model should change again."""
    store, models = label_training.store, label_training.bundle / "models"
    _write_case(store / "study05.nii.gz", 105, store / "labels" / "final" / "study05.nii.gz")
    datastore = label_training.LocalDatastore(str(store), extensions=("*.nii.gz",), auto_reload=False)
    before = torch.load(models / "model.pt", weights_only=True)
    label_training.task(_request(max_epochs=1, val_split=0.0), datastore)
    state = torch.load(models / "training_state.pt", weights_only=True)
    assert state["latent_table"]["_extra_state"]["case_ids"] == [*label_training.names, "study05"]
    after = torch.load(models / "model.pt", weights_only=True)
    assert any(not torch.equal(after[k], before[k]) for k in before), "the second request trained no epoch"
