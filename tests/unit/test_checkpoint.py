import numpy as np
import pytest

from psctl.cluster.shard import ShardState
from psctl.core.optim import FTRL, SGD
from psctl.core.tables import TableSpec
from psctl.files import checkpoint


def state() -> ShardState:
    return ShardState("j", [TableSpec("w", 4), TableSpec("f", 6, dim=2)], {"w": (0, 4), "f": (0, 6)}, "sync", 0,
                      [0, 1], SGD(lr=0.5), seed=0)


def test_snapshot_restores_tables_and_counters(tmp_path):
    s = state()
    s.push(0, 0, {"w": (None, np.ones(4, np.float32))}, 2)
    s.push(1, 0, {"w": (None, np.ones(4, np.float32))}, 2)
    arrays, meta = s.snapshot()
    checkpoint.save_shard(tmp_path, 0, 1, arrays, meta)
    fresh = state()
    fresh.restore(*checkpoint.load_shard(tmp_path, 0, 1), clock=1)
    np.testing.assert_array_equal(fresh.tables["w"].values, s.tables["w"].values)
    assert fresh.samples == 4 and fresh.updates == 1 and fresh.gate.clocks == {0: 1, 1: 1}
    assert fresh.tables["w"].steps == 1


def test_prune_removes_only_files_no_manifest_can_name(tmp_path):
    s = state()
    for clock in (10, 20, 30, 40, 50, 60):
        checkpoint.save_shard(tmp_path, 0, clock, *s.snapshot())
    # The manifest says 30 (the one before it 20); the shard saved up to 60 meanwhile: a
    # manifest may still name 40..60, and 20 is kept in case 30 is damaged.
    assert checkpoint.prune(tmp_path, 0, 30, 20) == [10]
    assert checkpoint.file_clocks(tmp_path, 0) == [20, 30, 40, 50, 60]
    assert checkpoint.prune(tmp_path, 0, 60, 30) == [20, 40, 50]
    assert sorted(p.name for p in tmp_path.glob("shard-0-*")) == ["shard-0-clock-30.npz", "shard-0-clock-60.npz"]


def test_the_manifest_before_the_newest_is_kept_and_offered_when_the_newest_is_damaged(tmp_path):
    s = state()
    for clock in (10, 20, 30):
        checkpoint.save_shard(tmp_path, 0, clock, *s.snapshot())
        checkpoint.write_manifest(tmp_path, {"clock": clock, "previous_clock": clock - 10 or None, "spec": {}, "tables": [], "n_shards": 1})
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.json")) == ["checkpoint-clock-20.json", "checkpoint-clock-30.json", "checkpoint.json"]
    checkpoint.check_files(tmp_path, checkpoint.read_manifest(tmp_path))
    checkpoint.shard_file(tmp_path, 0, 30).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.check_files(tmp_path, checkpoint.read_manifest(tmp_path))
    message = str(info.value)
    assert "cannot restore shard 0 from clock 30" in message
    assert f"the checkpoint before it, at clock 20, is complete: --resume {tmp_path / 'checkpoint-clock-20.json'} continues from it" in message
    older = checkpoint.read_manifest(tmp_path / "checkpoint-clock-20.json")
    assert older["clock"] == 20 and checkpoint.folder_of(tmp_path / "checkpoint-clock-20.json") == tmp_path
    checkpoint.check_files(tmp_path, older)
    checkpoint.shard_file(tmp_path, 0, 20).unlink()  # no complete older one: nothing offered
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.check_files(tmp_path, checkpoint.read_manifest(tmp_path))
    assert "before it" not in str(info.value)


def test_manifest_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="holds no psctl checkpoint"):
        checkpoint.read_manifest(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint manifest"):
        checkpoint.read_manifest(tmp_path)
    checkpoint.write_manifest(tmp_path, {"clock": 3, "spec": {}, "tables": [], "n_shards": 1})
    assert checkpoint.read_manifest(tmp_path)["clock"] == 3
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore shard 2 from clock 3"):
        checkpoint.load_shard(tmp_path, 2, 3)


def sparse_state(shard_index: int = 0, n_shards: int = 1) -> ShardState:
    spec = TableSpec("w", 2**40, dim=2, sparse=True, init="normal", init_scale=0.1)
    return ShardState("j", [spec], {"w": (0, 2**40)}, "async", 0, [0], FTRL(lr=0.3, l1=0.1), seed=3,
                      shard_index=shard_index, n_shards=n_shards)


def test_sparse_table_snapshot_restores_keys_values_and_optimizer_state(tmp_path):
    rng = np.random.default_rng(0)
    s = sparse_state()
    for clock in range(5):  # enough keys to exercise both the main and the delta index
        keys = np.unique(rng.integers(0, 2**40, 3000))
        s.push(0, clock, {"w": (keys, rng.normal(size=(len(keys), 2)).astype(np.float32))}, 1)
    arrays, meta = s.snapshot()
    checkpoint.save_shard(tmp_path, 0, 5, arrays, meta)
    fresh = sparse_state()
    fresh.restore(*checkpoint.load_shard(tmp_path, 0, 5), clock=5)
    a, b = s.tables["w"], fresh.tables["w"]
    assert len(b) == len(a) and b.steps == a.steps == 5
    for got, want in zip(b.dump(with_state=True), a.dump(with_state=True)):
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
        else:
            np.testing.assert_array_equal(got, want)
    # Both go on identically: old keys, new keys (first touch after the restore), never-pushed keys.
    keys = np.unique(np.concatenate([a.dump(False)[0][::7], rng.integers(0, 2**40, 500)]))
    grad = rng.normal(size=(len(keys), 2)).astype(np.float32)
    for t in (s, fresh):
        t.push(0, 5, {"w": (keys, grad)}, 1)
    probe = np.unique(np.concatenate([keys, rng.integers(0, 2**40, 100)]))
    np.testing.assert_array_equal(fresh.tables["w"].read(probe), s.tables["w"].read(probe))


def test_sparse_checkpoint_of_another_shard_is_refused(tmp_path):
    s = sparse_state(0, 2)
    keys = np.arange(200, dtype=np.int64)
    from psctl.core.sparse import key_owner

    mine = keys[key_owner(keys, 2) == 0]
    s.push(0, 0, {"w": (mine, np.ones((len(mine), 2), np.float32))}, 1)
    arrays, meta = s.snapshot()
    with pytest.raises(ValueError, match="another shard owns"):
        sparse_state(1, 2).restore(arrays, meta, clock=1)


def test_checkpoint_plan_every_n_clocks_and_on_request():
    from psctl.cluster.shard import NEVER, _Checkpoints

    plan = _Checkpoints.plan("d", 0, every=10, start=25)
    assert plan.next_clock == 30 and not plan.due(29) and plan.due(30)
    plan.requested.add(27)
    assert plan.due(27) and not plan.due(26)
    plan.saved(27)
    assert plan.last_clock == 27 and plan.requested == set() and plan.next_clock == 30
    only_asked = _Checkpoints.plan("d", 0, every=0, start=0)  # --checkpoint-dir alone, or every N seconds
    assert only_asked.next_clock == NEVER and not only_asked.due(10**9)
    only_asked.requested.update({5, 9})
    assert only_asked.due(5)
    only_asked.saved(5)
    assert only_asked.requested == {9} and not only_asked.due(8)
