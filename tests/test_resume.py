"""Interrupting and resuming training, and loading checkpoints safely.

The first test kills a real bundle training process with SIGKILL and resumes it; the others exercise
``TrainingStateHandler`` in process: ``weights_only`` loading and a clear message for every setting that
makes a saved state unusable.
"""

from __future__ import annotations

import argparse
import pickle
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_NET_ARGS, bundle_command, bundle_env, run_bundle
from ignite.engine import Engine

from nisf_monai.data.synthetic import generate_cohort
from nisf_monai.errors import InputDataError, find_input_error
from nisf_monai.handlers.training_state import CheckpointError, TrainingStateHandler, describe_state_mismatch
from nisf_monai.networks import LatentTable, NISFNet

TINY = ["--num_points", "128", "--batch_size", "2", *TINY_NET_ARGS]
ITERATIONS_PER_EPOCH = 2  # 2 training subjects x 2 phases, batch size 2


def training_command(root: Path, datalist: str, max_epochs: int, *extra: str) -> list[str]:
    return bundle_command(
        "training", "train.json", root, "--datalist", datalist, "--max_epochs", str(max_epochs), *TINY, *extra
    )


def run_training(
    root: Path, datalist: str, max_epochs: int, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    return run_bundle(
        "training",
        "train.json",
        root,
        "--datalist",
        datalist,
        "--max_epochs",
        str(max_epochs),
        *TINY,
        *extra,
        check=check,
        timeout=300,
    )


def saved_epoch(path: Path) -> int:
    """The epoch of a training state being rewritten by another process; 0 while it is not (yet) readable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["trainer"]["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError):
        return 0


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality of saved states: tensors bit for bit (dtype and shape included), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def temporaries(models: Path) -> list[Path]:
    return sorted(models.glob(".*.tmp"))


def test_killed_training_resumes_where_it_stopped(tmp_path: Path) -> None:
    """SIGKILL a real training run after epoch 2: both files still load (no partial file under the final
    name); a rerun of the finished epoch count trains a new round from the saved state (optimizer step counts
    continue); a rerun with more epochs continues the counters and the optimizers' step counts."""
    root, data = tmp_path / "bundle", tmp_path / "data"
    root.mkdir()
    datalist = generate_cohort(str(data), num_subjects=3, shape=(24, 24, 4), spacing=(4.0, 4.0, 10.0), num_validation=1)
    models = root / "models"
    state_path, model_path = models / "training_state.pt", models / "model.pt"

    # 1. start a run that would outlast the test, kill it once it has saved epoch 2 or later
    with open(tmp_path / "first_run.log", "w") as log:
        proc = subprocess.Popen(
            training_command(root, datalist, 100_000), cwd=root, env=bundle_env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while saved_epoch(state_path) < 2:
                assert proc.poll() is None, (tmp_path / "first_run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not reach epoch 2 in time"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # 2. whatever the kill interrupted, the files under their final names are complete
    killed = torch.load(state_path, map_location="cpu", weights_only=True)
    model = torch.load(model_path, map_location="cpu", weights_only=True)
    assert model.keys() == killed["network"].keys()
    epoch, iteration = killed["trainer"]["epoch"], killed["trainer"]["iteration"]
    assert epoch >= 2 and iteration == epoch * ITERATIONS_PER_EPOCH
    # a save cut short leaves at most a hidden temporary; plant one to check the next run removes it
    (models / ".training_state.pt.stale.tmp").write_bytes(b"partial")
    assert temporaries(models)

    # 3. rerun of the finished count: a new round of `epoch` epochs from the saved weights, codes and optimizer
    #    moments (what MONAI Label's repeated training requests with one max_epochs need), not a silent no-op
    out = run_training(root, datalist, epoch)
    log = out.stdout + out.stderr
    assert f"{state_path} finished at epoch {epoch} (max_epochs {epoch}): training {epoch} more epochs" in log
    assert temporaries(models) == []
    again = torch.load(state_path, map_location="cpu", weights_only=True)
    steps_so_far = iteration + epoch * ITERATIONS_PER_EPOCH
    assert again["trainer"] == {"epoch": epoch, "iteration": epoch * ITERATIONS_PER_EPOCH}
    assert {int(s["step"]) for s in again["optimizer"]["state"].values()} == {
        steps_so_far
    }  # moments restored, then stepped
    assert int(again["latent_optimizer"]["state"][0]["step"]) == steps_so_far
    assert again["latent_table"]["_extra_state"] == killed["latent_table"]["_extra_state"]
    assert any(not torch.equal(again["network"][k], killed["network"][k]) for k in killed["network"])  # it trained

    # 4. rerun with more epochs: resumes at the saved epoch and counts on from there
    out = run_training(root, datalist, epoch + 2)
    assert f"resumed from {state_path} at epoch {epoch}" in out.stdout + out.stderr
    final = torch.load(state_path, map_location="cpu", weights_only=True)
    assert final["trainer"] == {"epoch": epoch + 2, "iteration": (epoch + 2) * ITERATIONS_PER_EPOCH}
    adam_steps = {int(s["step"]) for s in final["optimizer"]["state"].values()}
    assert adam_steps == {steps_so_far + 2 * ITERATIONS_PER_EPOCH}  # moments continued, not restarted
    assert int(final["latent_optimizer"]["state"][0]["step"]) == steps_so_far + 2 * ITERATIONS_PER_EPOCH
    assert final["latent_table"]["_extra_state"] == killed["latent_table"]["_extra_state"]
    assert not torch.equal(final["latent_table"]["weight"], again["latent_table"]["weight"])  # it did train

    # 5. the same bundle with another latent_dim stops with one line saying so
    out = run_training(root, datalist, epoch + 3, "--latent_dim", "8", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "latent_dim 16 in checkpoint vs 8 in config" in errors[0], out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- in process

IDS = ["s1", "s2", "s3"]


def parts(
    ids=IDS,
    latent_dim: int = 4,
    num_classes: int = 4,
    hidden_dim: int = 8,
    num_layers: int = 2,
    strict: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = NISFNet(latent_dim=latent_dim, num_classes=num_classes, hidden_dim=hidden_dim, num_layers=num_layers)
    table = LatentTable(ids, latent_dim=latent_dim, strict_cases=strict)
    return {
        "network": net,
        "latent_table": table,
        "optimizer": torch.optim.Adam(net.parameters(), lr=1e-2),
        "latent_optimizer": torch.optim.SparseAdam(table.parameters(), lr=1e-2),
    }


def train_step(p: dict[str, Any], ids=IDS) -> None:
    loss = p["network"](torch.rand(len(ids), 3, 8) - 0.5, p["latent_table"](ids)).square().mean()
    p["optimizer"].zero_grad()
    p["latent_optimizer"].zero_grad()
    loss.backward()
    p["optimizer"].step()
    p["latent_optimizer"].step()


def engine_at(epoch: int = 0) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = epoch, epoch * 3
    return engine


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A training state (latent_dim 4, 4 classes, hidden 8, 2 layers, cases s1..s3) after one step."""
    p = parts()
    train_step(p)
    TrainingStateHandler(tmp_path, **p).save(engine_at(5))
    return tmp_path


def plain_types_only(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and plain_types_only(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(plain_types_only(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool))


def test_checkpoints_load_with_weights_only(saved: Path) -> None:
    """Both files load with torch.load(weights_only=True) and hold tensors and plain types only."""
    state = torch.load(saved / "training_state.pt", weights_only=True)
    model = torch.load(saved / "model.pt", weights_only=True)
    assert plain_types_only(state) and plain_types_only(model)
    assert state["trainer"] == {"epoch": 5, "iteration": 15}
    assert all(isinstance(v, torch.Tensor) for v in model.values())


def test_state_that_is_not_weights_is_refused_unrun(tmp_path: Path) -> None:
    """A training_state.pt holding a pickled object (which could run code) is refused, not unpickled."""
    torch.save({"payload": argparse.Namespace(epoch=1)}, tmp_path / "training_state.pt")
    handler = TrainingStateHandler(tmp_path, **parts())
    with pytest.raises(CheckpointError, match="unreadable"):
        handler.load(engine_at())


def test_truncated_state_names_file(saved: Path) -> None:
    """A truncated state file (copied in part) fails with one message naming it."""
    path = saved / "training_state.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="training_state.pt: the file is unreadable") as err:
        TrainingStateHandler(saved, **parts()).load(engine_at())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"latent_dim": 8}, "latent_dim 4 in checkpoint vs 8 in config"),
        ({"num_classes": 3}, "number of classes 4 in checkpoint vs 3 in config"),
        ({"hidden_dim": 12}, "hidden_dim 8 in checkpoint vs 12 in config"),
        ({"num_layers": 3}, "num_layers 2 in checkpoint vs 3 in config"),
    ],
)
def test_mismatched_setting_is_named(saved: Path, change: dict, message: str) -> None:
    """Resuming with another latent_dim, class count, width or depth names that setting with both values,
    at attach time (before the run) and at load time, and changes nothing."""
    p = parts(**change)
    before = {k: v.clone() for k, v in p["network"].state_dict().items()}
    handler = TrainingStateHandler(saved, **p)
    with pytest.raises(CheckpointError, match=message) as err:
        handler.attach(Engine(lambda e, b: None))
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, InputDataError)
    assert "training_state.pt" in str(err.value) and "\n" not in str(err.value)
    wrapped = RuntimeError("Failed to instantiate component")  # how the bundle runner wraps it
    wrapped.__cause__ = err.value
    assert find_input_error(wrapped) is err.value
    with pytest.raises(CheckpointError, match=message):
        handler.load(engine_at())
    for k, v in p["network"].state_dict().items():
        assert torch.equal(v, before[k])


def test_describe_state_mismatch_none_when_compatible(saved: Path) -> None:
    """Compatible shapes give no message (the case set is the table's business)."""
    state = torch.load(saved / "training_state.pt", weights_only=True)
    p = parts(ids=["s1", "other"])
    assert describe_state_mismatch(state, p["network"], p["latent_table"]) is None


def test_other_cases_strict_fails_naming_them(saved: Path) -> None:
    """With strict_cases, another case set fails and names cases on either side."""
    handler = TrainingStateHandler(saved, **parts(ids=["s1", "s2", "s9"], strict=True))
    with pytest.raises(CheckpointError, match="cases differ") as err:
        handler.load(engine_at())
    assert "s9" in str(err.value) and "s3" in str(err.value)


def test_other_cases_mapped_when_not_strict(saved: Path) -> None:
    """Without strict_cases the codes in common are restored by ID, new cases keep fresh codes,
    the network and epoch are restored and the row-wise latent optimizer restarts."""
    state = torch.load(saved / "training_state.pt", weights_only=True)
    p = parts(ids=["s3", "s1", "s9"], seed=1)
    fresh = p["latent_table"](["s9"]).detach().clone()
    engine = engine_at()
    TrainingStateHandler(saved, **p).load(engine)
    old = LatentTable(IDS, latent_dim=4)
    old.load_state_dict(state["latent_table"])
    torch.testing.assert_close(p["latent_table"](["s1", "s3"]), old(["s1", "s3"]), rtol=0, atol=0)
    torch.testing.assert_close(p["latent_table"](["s9"]), fresh, rtol=0, atol=0)
    assert engine.state.epoch == 5
    assert len(p["latent_optimizer"].state_dict()["state"]) == 0
    assert torch.equal(p["network"].state_dict()["seg_head.weight"], state["network"]["seg_head.weight"])


def test_state_written_before_the_rename_resumes(saved: Path) -> None:
    """A training_state.pt of the versions that saved the IDs as ``subject_ids`` (issue 12 renamed them
    ``case_ids``) resumes in full: the strict case check passes, codes come back by ID, the latent optimizer's
    moments and the epoch are restored; the next save writes ``case_ids``."""
    state = torch.load(saved / "training_state.pt", weights_only=True)
    extra = state["latent_table"]["_extra_state"]
    state["latent_table"]["_extra_state"] = {"subject_ids": extra.pop("case_ids"), **extra}
    torch.save(state, saved / "training_state.pt")  # as the old code wrote it
    assert set(torch.load(saved / "training_state.pt", weights_only=True)["latent_table"]["_extra_state"]) == {
        "subject_ids",
        "latent_dim",
    }
    p = parts(ids=list(reversed(IDS)), strict=True, seed=1)
    handler = TrainingStateHandler(saved, **p)
    engine = engine_at()
    handler.load(engine)
    old = LatentTable(IDS, latent_dim=4)
    old.load_state_dict(state["latent_table"])
    torch.testing.assert_close(p["latent_table"](IDS), old(IDS), rtol=0, atol=0)
    torch.testing.assert_close(p["latent_table"](IDS), state["latent_table"]["weight"], rtol=0, atol=0)
    assert engine.state.epoch == 5
    assert len(p["latent_optimizer"].state_dict()["state"]) == 1
    handler.save(engine)
    resaved = torch.load(saved / "training_state.pt", weights_only=True)["latent_table"]["_extra_state"]
    assert resaved == {"case_ids": sorted(IDS), "latent_dim": 4}


def test_stale_temporaries_removed_at_start(saved: Path) -> None:
    """Temporaries of a killed save are removed when training starts; the real files stay."""
    stale = [saved / ".training_state.pt.abc.tmp", saved / ".model.pt.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    other = saved / ".notes.tmp"
    other.write_bytes(b"keep")
    handler = TrainingStateHandler(saved, **parts())
    handler.load(engine_at())
    assert not any(p.exists() for p in stale)
    assert other.exists() and (saved / "training_state.pt").exists() and (saved / "model.pt").exists()
