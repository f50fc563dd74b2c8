"""Subnormal floats are flushed on every compute thread inside the bundle's work, and the caller's setting is
restored afterwards (a host such as a MONAI Label server keeps its own)."""

from __future__ import annotations

import threading

import pytest
import torch

from nisf_monai.denormals import denormals_flushed, flush_denormal
from nisf_monai.engines import NISFTrainer

SUBNORMAL = 1e-39  # below float32's smallest normal (1.18e-38)


def flushed_share(threads: int) -> float:
    """Share of a large subnormal tensor that an elementwise product (split over ``threads``) gives as 0."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.full((2_000_000,), SUBNORMAL, dtype=torch.float32)
        return float(((x * 1.0) == 0).float().mean())
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def supported():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")


def test_flushes_on_every_thread_then_restores(supported):
    assert flushed_share(2) == 0.0
    with flush_denormal() as active:
        assert active
        assert denormals_flushed()
        assert flushed_share(2) == 1.0  # the intra-op worker thread flushes too, not only the calling thread
    assert not denormals_flushed()
    assert flushed_share(2) == 0.0


def test_keeps_a_host_that_flushes_already(supported):
    torch.set_flush_denormal(True)
    try:
        with flush_denormal():
            pass
        assert denormals_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_disabled_changes_nothing(supported):
    with flush_denormal(enabled=False) as active:
        assert not active
        assert not denormals_flushed()


def test_restored_after_an_error(supported):
    with pytest.raises(RuntimeError), flush_denormal():
        raise RuntimeError("stop")
    assert not denormals_flushed()


def tiny_trainer(seen: list[bool]) -> NISFTrainer:
    """A real two-frame NISFTrainer that records, at each iteration, whether its thread flushes."""
    from ignite.engine import Events

    from nisf_monai.losses import NISFLoss
    from nisf_monai.networks import LatentTable, NISFNet

    network = NISFNet(latent_dim=8, hidden_dim=8, num_layers=1)
    table = LatentTable(["a", "b"], 8)
    batch = {
        "coords": torch.rand(2, 3, 64) - 0.5,
        "image": torch.rand(2, 1, 64),
        "label": torch.randint(0, 4, (2, 1, 64)),
        "case": ["a", "b"],
    }
    trainer = NISFTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[batch, batch],
        network=network,
        optimizer=torch.optim.Adam(network.parameters()),
        latent_table=table,
        latent_optimizer=torch.optim.SparseAdam(table.parameters()),
        loss_function=NISFLoss(),
        decollate=False,
        amp=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: seen.append(denormals_flushed()))
    return trainer


def test_trainer_flushes_during_its_run_only(supported):
    seen: list[bool] = []
    tiny_trainer(seen).run()
    assert seen == [True, True]
    assert not denormals_flushed()


def test_latent_fit_flushes_during_the_fit_only(supported):
    from monai.data import MetaTensor

    from nisf_monai.inferers import LatentOptimisationInferer
    from nisf_monai.networks import NISFNet

    seen: list[bool] = []
    image = MetaTensor(torch.rand(1, 1, 4, 4, 3), affine=torch.eye(4))
    inferer = LatentOptimisationInferer(num_steps=4, num_points=16, log_every=0)
    inferer.fit(
        image,
        NISFNet(latent_dim=8, hidden_dim=8, num_layers=1),
        monitor=lambda *_: seen.append(denormals_flushed()),
        monitor_every=2,
    )
    assert seen and all(seen)
    assert not denormals_flushed()


def test_other_threads_keep_their_setting(supported):
    """A fit in one thread does not change what another Python thread computes with."""
    results: dict[str, bool] = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with flush_denormal():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(5)
    results["main"] = denormals_flushed()
    release.set()
    thread.join()
    assert results["main"] is False
