"""One network shared by several threads: latent fits and heart-pose searches run concurrently on the same
network object give the codes and poses they give one after the other, never flip the network's
``requires_grad`` flags and leave no ``.grad`` on it, and fitting through the frozen view costs no more
than fitting a network frozen by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from helpers import AFFINE, tiny_net
from monai.data import MetaTensor

from nisf_monai.inferers import HeartLocator, LatentOptimisationInferer, latent_optimisation
from nisf_monai.inferers.heart_locator import frozen_view
from nisf_monai.networks import NISFNet
from nisf_monai.transforms import POSE_KEY

SHAPE = (12, 12, 4)
EXTENT = 24.0
LATENT = 8
TIMEOUT = 120.0  # seconds a thread waits for the other before the test fails instead of hanging

pytestmark = pytest.mark.usefixtures("single_thread")


def volumes() -> list[np.ndarray]:
    """Two images with intensities in [0.15, 0.85]: a bright disc and a ramp along x."""
    i, j, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    disc = 0.15 + 0.7 / (1 + np.exp((np.hypot((i - 5.5) * 2, (j - 5.5) * 2) - 6) / 1.5))
    ramp = 0.15 + 0.7 / (1 + np.exp((i - 3) * 2 / 3.0))
    return [disc.astype(np.float32), ramp.astype(np.float32)]


def case(volume: np.ndarray) -> MetaTensor:
    """A fresh (1, X, Y, Z) image (fresh metadata: a heart-frame fit stores its pose there)."""
    return MetaTensor(torch.as_tensor(volume)[None], affine=torch.as_tensor(AFFINE))


def inferer(heart_frame: bool = False, **kwargs: Any) -> LatentOptimisationInferer:
    args: dict[str, Any] = {"num_steps": 6, "learning_rate": 1e-2, "num_points": 64, "extent_mm": EXTENT}
    args["log_every"] = 0
    if heart_frame:
        locator = HeartLocator(radius_mm=8.0, step_mm=4.0, num_angles=2, score_points=128, num_starts=2, refine_steps=4)
        args.update(heart_locator=locator)
    return LatentOptimisationInferer(**{**args, **kwargs})


def in_threads(jobs: list[Callable[[], Any]], together: bool) -> list[Any]:
    """Each job in its own thread, all started at once (``together``) or each after the previous one ended.
    Exceptions are re-raised here."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = jobs[index]()
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
        if not together:
            thread.join(TIMEOUT)
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a fitting thread hung"
    if errors:
        raise errors[0]
    return results


def assert_untouched(net: torch.nn.Module) -> None:
    assert all(p.requires_grad for p in net.parameters()), "a parameter of the shared network was left frozen"
    assert all(p.grad is None for p in net.parameters()), "a weight gradient was stored on the shared network"


# ------------------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("heart_frame", [False, True], ids=["fit", "locate+fit"])
def test_concurrent_fits_give_the_codes_of_fits_one_after_the_other(heart_frame: bool) -> None:
    """Two threads fit two different cases on one network at the same time (a barrier inside the fit holds
    both mid-way until the other arrives): the codes (and heart poses) are bit-identical to fitting the cases
    one after the other, and the network keeps its flags and gets no gradient."""
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit = inferer(heart_frame)

    def jobs(barrier: threading.Barrier | None) -> list[Callable[[], Any]]:
        def job(volume: np.ndarray) -> Callable[[], tuple[torch.Tensor, Any]]:
            def meet(step: int, codes: torch.Tensor) -> None:
                if barrier is not None and step in (0, 3):
                    barrier.wait(TIMEOUT)  # both threads are inside their fit here

            def run() -> tuple[torch.Tensor, Any]:
                image = case(volume)
                if barrier is not None:
                    barrier.wait(TIMEOUT)
                code = fit.fit([image], net, monitor=meet, monitor_every=1)
                return code, image.meta.get(POSE_KEY)

            return run

        return [job(volume) for volume in volumes()]

    alone = in_threads(jobs(None), together=False)
    together = in_threads(jobs(threading.Barrier(2)), together=True)
    for (code_alone, pose_alone), (code_together, pose_together) in zip(alone, together):
        torch.testing.assert_close(code_together, code_alone, rtol=0, atol=0)
        if heart_frame:
            assert pose_alone is not None
            torch.testing.assert_close(pose_together, pose_alone, rtol=0, atol=0)
    assert not torch.equal(alone[0][0], alone[1][0])  # two cases, two codes: the comparison means something
    assert_untouched(net)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_fit_that_ends_first_does_not_unfreeze_the_other(fused_weight_flags: list[bool]) -> None:
    """Fit A starts, fit B starts, A ends while B is mid-way, then B goes on. Every forward pass of both (the
    fused network's inputs) runs on weights that do not require grad, the shared network requires grad all
    along (seen from B's monitor), and B's code equals B's code fitted alone."""
    net = tiny_net()
    weight_flags = fused_weight_flags
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen_by_b: list[bool] = []

    def monitor_a(step: int, codes: torch.Tensor) -> None:
        if step == 1:
            a_inside.set()
            assert b_inside.wait(TIMEOUT)

    def monitor_b(step: int, codes: torch.Tensor) -> None:
        seen_by_b.extend(p.requires_grad for p in net.parameters())
        if step == 1:
            b_inside.set()
            assert a_done.wait(TIMEOUT)

    def run_a() -> torch.Tensor:
        try:
            return inferer().fit([case(volumes()[0])], net, monitor=monitor_a, monitor_every=1)
        finally:
            a_done.set()

    def run_b() -> torch.Tensor:
        assert a_inside.wait(TIMEOUT)
        return inferer().fit([case(volumes()[1])], net, monitor=monitor_b, monitor_every=1)

    _, code_b = in_threads([run_a, run_b], together=True)
    assert weight_flags and not any(weight_flags)
    assert seen_by_b and all(seen_by_b)
    assert_untouched(net)
    torch.testing.assert_close(code_b, inferer().fit([case(volumes()[1])], net), rtol=0, atol=0)


def watched_net(log: list[tuple[bool, bool]]) -> NISFNet:
    """A tiny NISFNet that records, on every forward pass, whether the module computing needs weight gradients
    and whether the network's own parameters still require grad. The log and the parameters are reached
    through a closure, which deepcopy (the frozen view) shares instead of copying."""
    watched: list[torch.nn.Parameter] = []

    class Watched(NISFNet):
        def forward_heads(self, coords: torch.Tensor, latent: torch.Tensor | None = None):
            log.append((any(p.requires_grad for p in self.parameters()), all(p.requires_grad for p in watched)))
            return super().forward_heads(coords, latent)

    torch.manual_seed(0)
    net = Watched(latent_dim=LATENT, hidden_dim=16, num_layers=2, num_classes=3)
    watched.extend(net.parameters())
    return net


def test_pose_search_reads_the_network_through_a_frozen_view() -> None:
    """HeartLocator.locate (whose refinement calls backward()) computes with frozen weights while the network
    passed keeps requiring grad, and stores no gradient on it; the inferer's locate and fit likewise."""
    log: list[tuple[bool, bool]] = []
    net = watched_net(log)
    locator = HeartLocator(radius_mm=8.0, step_mm=4.0, num_angles=2, score_points=128, num_starts=2, refine_steps=4)
    pose = locator.locate(case(volumes()[0]), net, EXTENT)
    assert pose.shape == (4, 4)
    assert log and not any(computing for computing, _ in log) and all(shared for _, shared in log)
    assert_untouched(net)
    log.clear()
    image = case(volumes()[1])
    inferer(heart_frame=True).fit([image], net)
    assert POSE_KEY in image.meta
    assert log and not any(computing for computing, _ in log) and all(shared for _, shared in log)
    assert_untouched(net)


def test_frozen_view_shares_storage_and_refuses_wrappers() -> None:
    """The view aliases every weight (no copy; in-place changes show through), requires no grad, keeps the
    attributes the inferer reads, and leaves the network's flags alone; DataParallel wrappers are refused."""
    net = tiny_net()
    view = frozen_view(net)
    assert view is not net and view.latent_dim == net.latent_dim and view.num_classes == net.num_classes
    pairs = list(zip(net.parameters(), view.parameters()))
    assert len(pairs) == len(list(net.parameters()))
    assert all(p.data_ptr() == v.data_ptr() and not v.requires_grad and p.requires_grad for p, v in pairs)
    with torch.no_grad():
        net.seg_head.bias.add_(1.0)
    assert torch.equal(view.seg_head.bias, net.seg_head.bias)
    with pytest.raises(TypeError, match="unwrap_network"):
        frozen_view(torch.nn.DataParallel(net))


# ------------------------------------------------------------------------------------------------ speed


def test_fit_through_the_view_is_as_fast_as_a_network_frozen_by_hand(monkeypatch) -> None:
    """A few steps on a small network, timed in this run: the fit of a trainable network (through its frozen
    view) against the fit of a network whose parameters were set ``requires_grad_(False)`` by hand and used
    directly (the view switched off: what the old in-place freezing cost). Fastest of several interleaved
    runs each, generous slack for a shared machine."""
    net = tiny_net(hidden_dim=32, num_layers=3)
    by_hand = tiny_net(hidden_dim=32, num_layers=3).requires_grad_(False)
    image = case(volumes()[0])
    fit = inferer(num_steps=8, num_points=1024)

    use_view = {"on": True}
    view_of = latent_optimisation.frozen_view
    monkeypatch.setattr(latent_optimisation, "frozen_view", lambda net: view_of(net) if use_view["on"] else net)

    def timed(network: NISFNet, view: bool) -> float:
        use_view["on"] = view
        start = time.perf_counter()
        fit.fit([image], network)
        return time.perf_counter() - start

    timed(net, True), timed(by_hand, False)  # warm-up
    through_view, frozen_by_hand = [], []
    for _ in range(7):
        through_view.append(timed(net, True))
        frozen_by_hand.append(timed(by_hand, False))
    view_step, hand_step = min(through_view) / fit.num_steps, min(frozen_by_hand) / fit.num_steps
    print(f"\nper step: through the frozen view {view_step * 1e3:.3f} ms, frozen by hand {hand_step * 1e3:.3f} ms")
    assert view_step <= 1.5 * hand_step
    assert_untouched(net)
