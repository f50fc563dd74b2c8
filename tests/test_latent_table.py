"""Unit tests of LatentTable (codes addressed by case ID) and of the checkpoint files that carry it
(atomic_save, TrainingStateHandler)."""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.utils.deprecate_utils import DeprecatedError

from nisf_monai.handlers import TrainingStateHandler, atomic_save, training_state
from nisf_monai.networks import LatentTable, NISFNet

IDS = ["patient003", "patient001", "patient010", "patient002"]


def saved_and_loaded(obj, path):
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------- construction


def test_rows_sorted_and_repeats_merged() -> None:
    """Case IDs are held sorted, repeats share one row, and the weight has one row per unique ID."""
    table = LatentTable(["b", "a", "c", "a", "b"], latent_dim=5)
    assert table.case_ids == ["a", "b", "c"]
    assert len(table) == 3
    assert table.weight.shape == (3, 5)
    torch.testing.assert_close(table(["a", "a"])[0], table(["a", "a"])[1])


def test_ids_are_stringified() -> None:
    """Non-string IDs are stored and looked up as strings."""
    table = LatentTable([2, 1], latent_dim=3)
    assert table.case_ids == ["1", "2"]
    torch.testing.assert_close(table([2]), table(["2"]))


def test_empty_table_raises() -> None:
    """No cases is an error that points at the datalist."""
    with pytest.raises(ValueError, match="datalist"):
        LatentTable([], latent_dim=4)


def test_lookup_returns_row_of_each_id_in_query_order() -> None:
    """table(ids) returns the row of each ID (row index = position in sorted IDs), whatever the query order."""
    table = LatentTable(IDS, latent_dim=6)
    ordered = sorted(IDS)
    query = ["patient010", "patient001", "patient003", "patient010"]
    codes = table(query)
    assert codes.shape == (4, 6)
    for i, s in enumerate(query):
        torch.testing.assert_close(codes[i], table.weight[ordered.index(s)], rtol=0, atol=0)
    assert table.rows(query).tolist() == [ordered.index(s) for s in query]


def test_unknown_id_raises_key_error_naming_it() -> None:
    """An ID not in the table raises KeyError whose message names that ID."""
    table = LatentTable(IDS, latent_dim=4)
    with pytest.raises(KeyError, match="patient999"):
        table(["patient001", "patient999"])


def test_init_std_of_large_table() -> None:
    """Codes start as N(0, init_std^2): sample std ~ 0.01 and mean ~ 0 over 64k values."""
    torch.manual_seed(0)
    table = LatentTable([f"s{i}" for i in range(512)], latent_dim=128)
    w = table.weight.detach()
    assert abs(float(w.std()) - 0.01) < 5e-4
    assert abs(float(w.mean())) < 5e-4
    torch.manual_seed(0)
    assert abs(float(LatentTable([f"s{i}" for i in range(512)], 128, init_std=0.1).weight.detach().std()) - 0.1) < 5e-3


# ---------------------------------------------------------------------------------------------- gradients


def test_sparse_gradient_moves_only_looked_up_row() -> None:
    """With sparse lookups and SparseAdam, a step after using only 'a' changes row 'a' and no other."""
    torch.manual_seed(0)
    table = LatentTable(["c", "a", "b"], latent_dim=4, sparse=True)
    before = table.weight.detach().clone()
    optimizer = torch.optim.SparseAdam(table.parameters(), lr=0.1)
    table(["a"]).sum().backward()
    assert table.weight.grad.is_sparse
    optimizer.step()
    after = table.weight.detach()
    row_a = table.rows(["a"]).item()
    assert not torch.allclose(after[row_a], before[row_a])
    others = [i for i in range(3) if i != row_a]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)


def test_dense_gradient_option() -> None:
    """sparse=False gives a dense gradient, non-zero only on the looked-up row."""
    table = LatentTable(["a", "b"], latent_dim=3, sparse=False)
    (2 * table(["b"])).sum().backward()
    grad = table.weight.grad
    assert not grad.is_sparse
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))


# ---------------------------------------------------------------------------------------------- state


def test_state_round_trip_restores_codes_by_id(tmp_path) -> None:
    """Saved with weights_only-safe types and loaded onto a table built from a shuffled ID list, each
    case gets back exactly its own code."""
    torch.manual_seed(0)
    source = LatentTable(IDS, latent_dim=8)
    state = saved_and_loaded(source.state_dict(), tmp_path / "table.pt")
    shuffled = list(IDS)
    random.Random(1).shuffle(shuffled)
    torch.manual_seed(123)
    target = LatentTable(shuffled, latent_dim=8)
    target.load_state_dict(state)
    for s in IDS:
        torch.testing.assert_close(target([s]), source([s]), rtol=0, atol=0)


def test_state_onto_different_case_set_keeps_fresh_codes(tmp_path) -> None:
    """Loading onto a table with one case dropped and one added restores the common cases and
    leaves the new one's fresh code untouched."""
    torch.manual_seed(0)
    source = LatentTable(IDS, latent_dim=8)
    state = saved_and_loaded(source.state_dict(), tmp_path / "table.pt")
    new_ids = ["patient001", "patient002", "patient010", "patient777"]  # patient003 dropped, 777 new
    torch.manual_seed(5)
    target = LatentTable(new_ids, latent_dim=8)
    fresh = target(["patient777"]).detach().clone()
    target.load_state_dict(state)
    for s in ["patient001", "patient002", "patient010"]:
        torch.testing.assert_close(target([s]), source([s]), rtol=0, atol=0)
    torch.testing.assert_close(target(["patient777"]), fresh, rtol=0, atol=0)
    assert not target.same_cases(state)


def test_state_rows_follow_saved_id_order() -> None:
    """Rows of a state are matched by the IDs stored with it, not by position: a hand-written state
    listing IDs unsorted puts each row on its own case."""
    weight = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    state = {"weight": weight, "_extra_state": {"case_ids": ["c", "a", "b"], "latent_dim": 2}}
    table = LatentTable(["a", "b", "c"], latent_dim=2)
    table.load_state_dict(state)
    torch.testing.assert_close(table(["c", "a", "b"]), weight, rtol=0, atol=0)


def test_strict_cases_rejects_mismatch() -> None:
    """strict_cases=True refuses a state whose case set differs, and leaves the codes unchanged."""
    source = LatentTable(IDS, latent_dim=8)
    target = LatentTable(IDS[:3] + ["someone_else"], latent_dim=8, strict_cases=True)
    before = target.weight.detach().clone()
    with pytest.raises(RuntimeError, match="cases"):
        target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.weight.detach(), before, rtol=0, atol=0)


def test_strict_cases_accepts_same_set_in_other_order() -> None:
    """strict_cases=True accepts the same cases listed in a different order."""
    source = LatentTable(IDS, latent_dim=8)
    target = LatentTable(list(reversed(IDS)), latent_dim=8, strict_cases=True)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.weight, source.weight, rtol=0, atol=0)
    assert target.same_cases(source.state_dict())


def test_latent_dim_mismatch_raises() -> None:
    """A state with codes of another size raises RuntimeError mentioning latent_dim."""
    source = LatentTable(IDS, latent_dim=8)
    target = LatentTable(IDS, latent_dim=16)
    with pytest.raises(RuntimeError, match="latent_dim"):
        target.load_state_dict(source.state_dict())


def test_state_without_case_ids_raises() -> None:
    """A bare weight tensor (no case IDs) is not accepted as a table state."""
    target = LatentTable(IDS, latent_dim=8)
    with pytest.raises(RuntimeError, match="case IDs"):
        target.load_state_dict({"weight": torch.zeros(4, 8)})


def test_table_inside_parent_module_round_trip() -> None:
    """IDs travel under the parent's prefix, so a table nested in another module restores by ID too."""
    torch.manual_seed(0)
    parent = torch.nn.ModuleDict({"codes": LatentTable(IDS, latent_dim=4)})
    other = torch.nn.ModuleDict({"codes": LatentTable(list(reversed(IDS)) + ["new"], latent_dim=4)})
    other.load_state_dict(parent.state_dict())
    for s in IDS:
        torch.testing.assert_close(other["codes"]([s]), parent["codes"]([s]), rtol=0, atol=0)


def test_state_saves_case_ids() -> None:
    """The IDs travel in the state under ``case_ids``, beside the code size."""
    table = LatentTable(["b", "a"], latent_dim=3)
    assert table.state_dict()["_extra_state"] == {"case_ids": ["a", "b"], "latent_dim": 3}


@pytest.mark.parametrize("prefix", ["", "codes."])
def test_state_written_before_the_rename_loads_by_id(tmp_path, prefix: str) -> None:
    """A table state saved by the versions that named the IDs ``subject_ids`` (issue 12 renamed them
    ``case_ids``) still loads, by ID, on its own or nested in a parent (e.g. a benchmark snapshot), and counts
    as the same case set (so the latent optimizer's moments are restored)."""
    torch.manual_seed(0)
    source = LatentTable(IDS, latent_dim=4)
    state = {prefix + "weight": source.weight.detach().clone()}
    state[prefix + "_extra_state"] = {"subject_ids": sorted(IDS), "latent_dim": 4}
    state = saved_and_loaded(state, tmp_path / "old_table.pt")
    torch.manual_seed(1)
    target = LatentTable(list(reversed(IDS)), latent_dim=4, strict_cases=True)
    if prefix:
        torch.nn.ModuleDict({"codes": target}).load_state_dict(state)
    else:
        target.load_state_dict(state)
        assert target.same_cases(state)
    for s in IDS:
        torch.testing.assert_close(target([s]), source([s]), rtol=0, atol=0)


def test_renamed_keywords_are_removed_with_a_pointer_to_the_new_ones() -> None:
    """``subject_ids`` / ``strict_subjects`` (the names before issue 12) warned through 0.5 and are removed in
    0.6.0: passing them raises an error naming ``case_ids`` / ``strict_cases``; the new names warn about nothing."""
    with pytest.raises(DeprecatedError, match="case_ids"):
        LatentTable(subject_ids=["b", "a", "b"], latent_dim=3)
    with pytest.raises(DeprecatedError, match="strict_cases"):
        LatentTable(["a"], latent_dim=3, strict_subjects=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = LatentTable(case_ids=["b", "a"], latent_dim=3, strict_cases=True)
    assert new.case_ids == ["a", "b"] and new.strict_cases


def test_config_with_the_old_keyword_fails_naming_the_new_one() -> None:
    """A bundle config that still passes ``subject_ids`` (as train.json did before 0.4) fails to build, and the
    error's cause names ``case_ids``."""
    config = {"table": {"_target_": "nisf_monai.networks.LatentTable", "subject_ids": ["b", "a"], "latent_dim": 2}}
    with pytest.raises(RuntimeError) as failure:
        ConfigParser(config).get_parsed_content("table")
    assert isinstance(failure.value.__cause__, DeprecatedError) and "case_ids" in str(failure.value.__cause__)


def test_renamed_attributes_are_removed_with_a_pointer_to_the_new_ones() -> None:
    """``subject_ids``, ``strict_subjects`` and ``same_subjects`` raise errors naming the attributes they became."""
    table = LatentTable(IDS, latent_dim=2)
    with pytest.raises(DeprecatedError, match="case_ids"):
        _ = table.subject_ids
    with pytest.raises(DeprecatedError, match="strict_cases"):
        table.strict_subjects = True
    assert not table.strict_cases
    with pytest.raises(DeprecatedError, match="same_cases"):
        table.same_subjects(table.state_dict())


# ---------------------------------------------------------------------------------------------- atomic_save


def test_atomic_save_writes_and_replaces(tmp_path) -> None:
    """atomic_save creates missing folders, replaces an existing file and leaves no temporary files."""
    path = tmp_path / "models" / "model.pt"
    atomic_save({"x": torch.tensor([1.0])}, path)
    atomic_save({"x": torch.tensor([2.0])}, path)
    assert torch.load(path, weights_only=True)["x"].item() == 2.0
    assert os.listdir(path.parent) == ["model.pt"]


def test_atomic_save_keeps_previous_file_when_save_fails(tmp_path, monkeypatch) -> None:
    """If torch.save dies after writing part of the file, the previous file is intact and no temp file
    is left behind."""
    path = tmp_path / "state.pt"
    atomic_save({"epoch": 1, "w": torch.arange(5.0)}, path)
    good_bytes = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(training_state.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good_bytes
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_save_interrupt_leaves_no_temp(tmp_path, monkeypatch) -> None:
    """A KeyboardInterrupt during the save (no previous file) leaves neither the target nor a temp file."""

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(training_state.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- resume


def make_state(ids, seed):
    torch.manual_seed(seed)
    net = NISFNet(latent_dim=4, hidden_dim=8, num_layers=2)
    table = LatentTable(ids, latent_dim=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    lat_opt = torch.optim.SparseAdam(table.parameters(), lr=1e-2)
    return net, table, opt, lat_opt


def one_step(net, table, opt, lat_opt, ids):
    coords = torch.rand(len(ids), 3, 10) - 0.5
    loss = net(coords, table(ids)).square().mean()
    opt.zero_grad()
    lat_opt.zero_grad()
    loss.backward()
    opt.step()
    lat_opt.step()


def engine_at(epoch: int, iteration: int) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    engine.state.iteration = iteration
    return engine


def test_training_state_resumes_network_codes_optimizers_and_epoch(tmp_path) -> None:
    """save() then load() on fresh objects (cases in another order) restores the network, each code by
    ID, both optimizers and the epoch/iteration; both files load with weights_only=True."""
    net, table, opt, lat_opt = make_state(IDS, seed=0)
    one_step(net, table, opt, lat_opt, ["patient001", "patient010"])
    TrainingStateHandler(tmp_path, net, table, opt, lat_opt).save(engine_at(3, 42))
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == net.state_dict().keys()

    net2, table2, opt2, lat_opt2 = make_state(list(reversed(IDS)), seed=1)
    engine = engine_at(0, 0)
    TrainingStateHandler(tmp_path, net2, table2, opt2, lat_opt2).load(engine)
    assert (engine.state.epoch, engine.state.iteration) == (3, 42)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(net2.state_dict()[k], v, rtol=0, atol=0)
    for s in IDS:
        torch.testing.assert_close(table2([s]), table([s]), rtol=0, atol=0)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert len(lat_opt2.state_dict()["state"]) == 1  # the latent optimizer's moments came back too


def test_training_state_changed_cases_restart_latent_optimizer(tmp_path) -> None:
    """With a different case set, codes are restored by ID but the row-wise latent optimizer state is not."""
    net, table, opt, lat_opt = make_state(IDS, seed=0)
    one_step(net, table, opt, lat_opt, IDS)
    TrainingStateHandler(tmp_path, net, table, opt, lat_opt).save(engine_at(2, 8))
    net2, table2, opt2, lat_opt2 = make_state(IDS + ["patient011"], seed=1)
    TrainingStateHandler(tmp_path, net2, table2, opt2, lat_opt2).load(engine_at(0, 0))
    torch.testing.assert_close(table2(IDS), table(IDS), rtol=0, atol=0)
    assert len(lat_opt2.state_dict()["state"]) == 0


def test_training_state_resume_false_ignores_file(tmp_path) -> None:
    """resume=False starts afresh even when a state file exists."""
    net, table, opt, lat_opt = make_state(IDS, seed=0)
    TrainingStateHandler(tmp_path, net, table, opt, lat_opt).save(engine_at(5, 5))
    net2, table2, opt2, lat_opt2 = make_state(IDS, seed=1)
    before = table2.weight.detach().clone()
    engine = engine_at(0, 0)
    TrainingStateHandler(tmp_path, net2, table2, opt2, lat_opt2, resume=False).load(engine)
    assert engine.state.epoch == 0
    torch.testing.assert_close(table2.weight.detach(), before, rtol=0, atol=0)


def test_training_state_incompatible_file_raises_helpful_error(tmp_path) -> None:
    """A state saved from a network of another size fails with a message naming the file and the way out."""
    net, table, opt, lat_opt = make_state(IDS, seed=0)
    TrainingStateHandler(tmp_path, net, table, opt, lat_opt).save(engine_at(1, 1))
    torch.manual_seed(0)
    bigger = NISFNet(latent_dim=4, hidden_dim=12, num_layers=2)
    handler = TrainingStateHandler(tmp_path, bigger, table, torch.optim.Adam(bigger.parameters()), lat_opt)
    with pytest.raises(RuntimeError, match="training_state.pt") as err:
        handler.load(engine_at(0, 0))
    assert "resume" in str(err.value)
