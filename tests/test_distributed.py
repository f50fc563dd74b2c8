"""Multi-process training (``multi_gpu_train.json``): two gloo ranks on the CPU against one process.

Two ranks with batch ``B`` must take the same steps as one process with batch ``2B`` over the same frames:
the network through DDP, the latent table through ``sync_latent_gradients``. The frames come from a shuffled
``DistributedSampler``, so a case sits on different ranks from epoch to epoch and sometimes on both in
one step. Only rank 0 writes checkpoints; every rank resumes from them.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import CONFIGS, run_command
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from nisf_monai.data import GroupBatchSampler, expand_cine_datalist, load_datalist
from nisf_monai.data.synthetic import generate_cohort
from nisf_monai.distributed import (
    NISFHeads,
    data_parallel,
    distributed_sampler,
    sync_latent_gradients,
    unwrap_network,
)
from nisf_monai.engines import NISFTrainer
from nisf_monai.errors import InputDataError
from nisf_monai.handlers import CheckpointError, TrainingStateHandler, training_state
from nisf_monai.losses import NISFLoss
from nisf_monai.networks import LatentTable, NISFNet

RANKS, BATCH, EPOCHS, FRAMES, POINTS, LATENT = 2, 2, 3, 8, 64, 8
SEED = 7


def frames() -> list[dict[str, Any]]:
    """``FRAMES`` point sets of ``FRAMES // 2`` cases (two frames each, sharing a case ID and so a code)."""
    g = torch.Generator().manual_seed(0)
    return [
        {
            "coords": torch.rand(3, POINTS, generator=g) - 0.5,
            "image": torch.rand(1, POINTS, generator=g),
            "label": torch.randint(0, 4, (1, POINTS), generator=g),
            "case": f"case{i // 2}",
            "index": i,
        }
        for i in range(FRAMES)
    ]


def build(seed: int, save_dir: Path, resume: bool = False) -> tuple[Any, ...]:
    """Network, table, both optimizers and a TrainingStateHandler, initialised from ``seed``."""
    torch.manual_seed(seed)
    network = NISFNet(latent_dim=LATENT, hidden_dim=16, num_layers=2)
    table = LatentTable([f["case"] for f in frames()], latent_dim=LATENT)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    latent_optimizer = torch.optim.SparseAdam(table.parameters(), lr=1e-2)
    handler = TrainingStateHandler(save_dir, network, table, optimizer, latent_optimizer, resume=resume)
    return network, table, optimizer, latent_optimizer, handler


def train(network, table, optimizer, latent_optimizer, handler, loader: DataLoader, epochs: int) -> list[list[int]]:
    """Runs ``NISFTrainer`` and returns the frame indices of every step."""
    trainer = NISFTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        latent_table=table,
        latent_optimizer=latent_optimizer,
        loss_function=NISFLoss(),
        train_handlers=[handler],
        decollate=False,
        amp=False,
    )
    seen: list[list[int]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.batch["index"].tolist()))
    trainer.run()
    return seen


def snapshot(network, table, latent_optimizer) -> dict[str, Any]:
    return {
        "network": {k: v.detach().clone() for k, v in network.state_dict().items()},
        "ids": list(table.case_ids),
        "codes": table.weight.detach().clone(),
        "moments": {k: torch.as_tensor(v).clone() for k, v in latent_optimizer.state[table.weight].items()},
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: train, save (rank 0), resume everywhere, and check a mismatched resume fails on all ranks."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    out, save_dir = Path(out_dir), Path(out_dir) / "models"
    writes = []
    atomic_save = training_state.atomic_save
    training_state.atomic_save = lambda obj, path: (writes.append(str(path)), atomic_save(obj, path))
    try:
        # another seed on rank 1: DDP and the table broadcast must bring it onto rank 0's start
        network, table, optimizer, latent_optimizer, handler = build(SEED + rank, save_dir)
        data = frames()
        sampler = distributed_sampler(data, shuffle=True)
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
        with pytest.raises(ValueError, match="data_parallel"):  # DDP over NISFNet would sync the segmentation head only
            other = NISFNet(latent_dim=LATENT, hidden_dim=16, num_layers=2)
            NISFTrainer(
                device="cpu",
                max_epochs=1,
                train_data_loader=loader,
                network=DistributedDataParallel(other),
                optimizer=optimizer,
                latent_table=table,
                latent_optimizer=latent_optimizer,
                loss_function=NISFLoss(),
            )
        seen = train(data_parallel(network), table, optimizer, latent_optimizer, handler, loader, EPOCHS)
        result = {"seen": seen, "trained": snapshot(network, table, latent_optimizer), "writes": writes}
        dist.barrier()  # rank 0's last save is on disk

        fresh = build(100 + rank, save_dir, resume=True)
        engine = Engine(lambda e, b: None)
        fresh[-1].load(engine)
        result["resumed"] = snapshot(*fresh[:2], fresh[3])
        result["resumed_epoch"] = engine.state.epoch

        # a rank that finds no state (another file system) while the others resume is refused on all ranks
        elsewhere = build(0, save_dir if rank == 0 else out / "empty", resume=True)[-1]
        try:
            elsewhere.load(Engine(lambda e, b: None))
            result["mismatch"] = None
        except CheckpointError as err:
            result["mismatch"] = str(err)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        training_state.atomic_save = atomic_save
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("ddp")
    # fork: the ranks inherit this process's imports (spawning would import torch and MONAI twice more)
    mp.start_processes(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=RANKS, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)], out


@pytest.fixture(scope="module")
def single(ranks: tuple[list[dict[str, Any]], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process, batch 2B: step t holds the frames both ranks had at their step t."""
    results, _ = ranks
    steps = [a + b for a, b in zip(results[0]["seen"], results[1]["seen"], strict=True)]
    network, table, optimizer, latent_optimizer, handler = build(SEED, tmp_path_factory.mktemp("single"))
    loader = DataLoader(frames(), batch_sampler=steps)
    assert train(network, table, optimizer, latent_optimizer, handler, loader, 1) == steps
    return snapshot(network, table, latent_optimizer)


def test_frames_move_between_ranks(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    """The run exercises what can go wrong: a case on both ranks in one step, a case on another rank
    from one epoch to the next, and steps where some case is in no batch (its code must not move)."""
    results, _ = ranks
    steps_per_epoch = FRAMES // (RANKS * BATCH)
    case = [[{i // 2 for i in r["seen"][t]} for t in range(len(r["seen"]))] for r in results]
    both = [t for t in range(len(case[0])) if case[0][t] & case[1][t]]
    assert both, "no step had one case on both ranks"
    on_rank0 = [set().union(*case[0][e * steps_per_epoch : (e + 1) * steps_per_epoch]) for e in range(EPOCHS)]
    assert len({frozenset(s) for s in on_rank0}) > 1, "the sampler gave rank 0 the same cases every epoch"
    assert any(len(case[0][t] | case[1][t]) < FRAMES // 2 for t in range(len(case[0])))
    assert len(results[0]["seen"]) == EPOCHS * steps_per_epoch


def test_two_ranks_match_one_process_with_twice_the_batch(
    ranks: tuple[list[dict[str, Any]], Path], single: dict[str, Any]
) -> None:
    """Network weights, every code and SparseAdam's moments after 6 steps: equal on both ranks (bit for bit)
    and equal to one process with batch 2B within 1e-5."""
    results, _ = ranks
    a, b = results[0]["trained"], results[1]["trained"]
    for key in a["network"]:
        assert torch.equal(a["network"][key], b["network"][key]), key
    assert torch.equal(a["codes"], b["codes"])
    for key in a["moments"]:
        assert torch.equal(a["moments"][key], b["moments"][key]), key
    for key, value in single["network"].items():
        torch.testing.assert_close(a["network"][key], value, rtol=0, atol=1e-5, msg=key)
    assert a["ids"] == single["ids"]
    torch.testing.assert_close(a["codes"], single["codes"], rtol=0, atol=1e-5)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(a["moments"][key], single["moments"][key], rtol=1e-4, atol=1e-7, msg=key)
    assert int(a["moments"]["step"]) == int(single["moments"]["step"]) == len(results[0]["seen"])
    # the codes did train (a comparison of untouched tables would prove nothing)
    start = build(SEED, Path("/nonexistent"))[1].weight.detach()
    assert (single["codes"] - start).abs().max() > 1e-3


def test_only_rank_zero_writes_and_every_rank_resumes(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    results, out = ranks
    assert results[1]["writes"] == []
    assert results[0]["writes"] and {Path(p).name for p in results[0]["writes"]} == {"model.pt", "training_state.pt"}
    saved = torch.load(out / "models" / "training_state.pt", weights_only=True)
    assert saved["trainer"]["epoch"] == EPOCHS
    assert set(torch.load(out / "models" / "model.pt", weights_only=True)) == set(results[0]["trained"]["network"])
    trained = results[0]["trained"]
    for r in results:
        resumed = r["resumed"]
        assert r["resumed_epoch"] == EPOCHS
        assert resumed["ids"] == sorted(set(resumed["ids"])) == sorted({f["case"] for f in frames()})
        assert resumed["codes"].shape == (len(resumed["ids"]), LATENT)
        assert torch.equal(resumed["codes"], trained["codes"])
        for key, value in trained["network"].items():
            assert torch.equal(resumed["network"][key], value), key
        for key, value in trained["moments"].items():
            assert torch.equal(resumed["moments"][key], value), key


def test_resume_from_different_files_fails_on_every_rank(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    results, _ = ranks
    for r in results:
        assert r["mismatch"] is not None and "different training states" in r["mismatch"]


def test_sync_is_a_no_op_in_one_process() -> None:
    table = LatentTable(["a", "b", "c"], latent_dim=4)
    table(["a", "a"]).sum().backward()
    before = table.weight.grad.coalesce()
    sync_latent_gradients(table)
    assert torch.equal(table.weight.grad.to_dense(), before.to_dense())


def test_checkpoints_hold_the_plain_network_keys(tmp_path: Path) -> None:
    """Handed a wrapped network, the handler saves the keys an unwrapped NISFNet loads (no ``module.``)."""
    network, table, optimizer, latent_optimizer, _ = build(SEED, tmp_path)
    wrapped = torch.nn.DataParallel(NISFHeads(network))
    assert unwrap_network(wrapped) is network
    handler = TrainingStateHandler(tmp_path, wrapped, table, optimizer, latent_optimizer)
    handler.save(Engine(lambda e, b: None))
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == set(network.state_dict())


def test_too_few_validation_items_for_the_ranks() -> None:
    with pytest.raises(InputDataError, match="validation set has 1 item.*2 ranks"):
        distributed_sampler(
            [{"image": 0}], shuffle=False, even_divisible=False, name="validation", num_replicas=2, rank=0
        )
    sampler = distributed_sampler(list(range(3)), shuffle=False, even_divisible=False, num_replicas=2, rank=1)
    assert list(sampler) == [1]  # validation shards cover each item once, without padding


def test_too_few_validation_subjects_for_the_ranks() -> None:
    """The validation batch sampler shares whole groups among ranks; a rank left without one is a setup error
    (it would leave the others waiting in the metric's all-gather), and two groups on two ranks split evenly."""
    frames = [{"case": f"p1_{t}", "subject": "p1"} for t in range(2)]
    with pytest.raises(InputDataError, match="1 subject group.*2 ranks"):
        GroupBatchSampler(frames, group_key="subject", num_replicas=2, rank=1)
    both = frames + [{"case": "p2_0", "subject": "p2"}]
    assert [list(GroupBatchSampler(both, "subject", num_replicas=2, rank=r)) for r in (0, 1)] == [[[0, 1]], [[2]]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_id: str, configs: list[str], root: Path, *overrides: str) -> list[str]:
    """``torchrun --nproc_per_node 2 -m monai.bundle run`` of bundle configs merged in order."""
    merged = "[" + ",".join(f"'{CONFIGS / c}'" for c in configs) + "]"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        merged,
        "--bundle_root",
        str(root),
        *overrides,
    ]


def test_bundle_trains_with_torchrun(tmp_path: Path) -> None:
    """The real configs, merged, under torchrun with 2 CPU processes (gloo): trains, validates on both
    shards and leaves rank 0's files."""
    datalist = generate_cohort(
        str(tmp_path / "data"), num_subjects=4, shape=(32, 32, 6), spacing=(4.0, 4.0, 10.0), num_validation=1
    )
    root = tmp_path / "bundle"
    overrides = ["--datalist", datalist, "--max_epochs", "2", "--num_points", "256", "--batch_size", "2"]
    overrides += ["--val_interval", "2", "--val_max_steps", "4", "--val_monitor_every", "2"]
    overrides += ["--hidden_dim", "16", "--latent_dim", "16", "--num_layers", "2"]
    cmd = _torchrun("training", ["train.json", "multi_gpu_train.json"], root, *overrides)
    result = run_command(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    models = root / "models"
    state = torch.load(models / "training_state.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 2
    training = json.loads(Path(datalist).read_text())["training"]
    assert state["latent_table"]["_extra_state"]["case_ids"] == sorted({item["case"] for item in training})
    assert "seg_head.weight" in torch.load(models / "model.pt", weights_only=True)  # plain keys, no "module."
    assert (models / "model_best.pt").is_file() and (models / "inference_steps.json").is_file()
    # the step count is chosen over every rank's validation cases, not rank 0's share
    validation = expand_cine_datalist(load_datalist(datalist, "validation"))
    assert len(validation) >= 2
    assert json.loads((models / "inference_steps.json").read_text())["num_cases"] == len(validation)
    assert not list(models.glob(".*.tmp"))
    # training is logged once (rank 0), not once per rank
    assert (result.stdout + result.stderr).count("Epoch: 2/2, Iter: 2/2") == 1


def test_bundle_infers_and_evaluates_with_torchrun(tmp_path: Path) -> None:
    """Inference on 2 CPU processes writes what one process writes, labels bitwise; a broken case on one rank is
    listed and the others are still written; the QC summary and the evaluation metrics cover every rank's cases."""
    import csv

    import nibabel as nib
    import numpy as np
    from helpers import TINY_NET_ARGS, run_bundle

    datalist = generate_cohort(
        str(tmp_path / "data"), num_subjects=4, shape=(24, 24, 4), spacing=(4.0, 4.0, 10.0), num_validation=1
    )
    root = tmp_path / "bundle"
    run_bundle(
        "training", "train.json", root, "--datalist", datalist, "--max_epochs", "1", *TINY_NET_ARGS, cwd=tmp_path
    )
    data = tmp_path / "images"
    data.mkdir()
    for image in sorted(Path(datalist).parent.glob("synth00[0-2]_E?.nii.gz")):
        (data / image.name).write_bytes(image.read_bytes())
    (data / "broken.nii.gz").write_bytes(b"not an image")
    common = ["--dataset_dir", str(data), "--inference_steps", "3", *TINY_NET_ARGS]
    run_bundle("inference", "inference.json", root, *common, "--output_dir", str(tmp_path / "one"), cwd=tmp_path)
    cmd = _torchrun("inference", ["inference.json", "multi_gpu_inference.json"], root, *common, "--output_dir")
    result = run_command([*cmd, str(tmp_path / "two")], tmp_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    one = sorted(p.name for p in (tmp_path / "one").glob("*_seg.nii.gz"))
    assert len(one) == 6 and one == sorted(p.name for p in (tmp_path / "two").glob("*_seg.nii.gz"))
    for name in one:
        a, b = (np.asarray(nib.load(str(tmp_path / d / name)).dataobj) for d in ("one", "two"))
        np.testing.assert_array_equal(a, b)
    failed = (tmp_path / "two" / "failed_cases.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(str(data / "broken.nii.gz"))
    with open(tmp_path / "two" / "qc_summary.csv", newline="") as f:
        assert sorted(row["case"] + "_seg.nii.gz" for row in csv.DictReader(f)) == one

    cmd = _torchrun("evaluating", ["inference.json", "evaluate.json", "multi_gpu_inference.json"], root)
    evaluated = tmp_path / "evaluated"
    cmd += ["--datalist_file", datalist, "--section", "training", "--inference_steps", "3", *TINY_NET_ARGS]
    result = run_command([*cmd, "--output_dir", str(evaluated)], tmp_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    training = expand_cine_datalist(load_datalist(datalist, "training"))
    with open(evaluated / "mean_dice_raw.csv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert len(rows) - 1 == len(training)  # one row per case of both ranks, reduced on rank 0


def test_shutdown_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    from nisf_monai.distributed import shutdown

    shutdown()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown()
    assert not dist.is_initialized()


def test_a_torchrun_process_leaves_with_its_logs_and_tensorboard_events_written(tmp_path: Path) -> None:
    """shutdown_and_exit skips the interpreter's teardown, not what the run wrote: the log line before it and the
    TensorBoard events of an open writer are on disk, and the exit code is 0."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import logging, sys, torch.distributed as dist\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from nisf_monai.distributed import shutdown_and_exit\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
        "dist.init_process_group('gloo')\n"
        f"writer = SummaryWriter(r'{tmp_path / 'tb'}')\n"
        "writer.add_scalar('nisf_loss', 1.0, 1)\n"
        "logging.getLogger('nisf_monai').info('rank %d done', dist.get_rank())\n"
        "shutdown_and_exit()\n"
        "print('not reached')\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    result = run_command([*cmd, f"--master_port={_free_port()}", str(script)], tmp_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout and "not reached" not in result.stdout
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and all(b"nisf_loss" in e.read_bytes() for e in events)  # lost without closing the writer


def test_closing_the_writers_passes_over_dead_weak_proxies(tmp_path: Path) -> None:
    """A weakref proxy whose referent died (seen in a real inference run) is among the objects searched for open
    TensorBoard writers: it must be passed over, and the writer still closed."""
    import weakref

    from torch.utils.tensorboard import SummaryWriter

    from nisf_monai.distributed import _close_summary_writers

    class Referent:
        pass

    referent = Referent()
    proxies = [weakref.proxy(referent)]
    del referent
    writer = SummaryWriter(str(tmp_path / "tb"))
    writer.add_scalar("nisf_loss", 1.0, 1)
    assert writer.file_writer is not None
    _close_summary_writers()
    assert writer.file_writer is None and len(proxies) == 1
