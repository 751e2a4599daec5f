import numpy as np
import pytest

from psctl import checkpoint
from psctl.optim import SGD
from psctl.shard import ShardState
from psctl.tables import TableSpec


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


def test_prune_keeps_the_last_two(tmp_path):
    s = state()
    for clock in (10, 20, 30):
        checkpoint.save_shard(tmp_path, 0, clock, *s.snapshot())
    checkpoint.prune(tmp_path, 0, 30)
    assert sorted(p.name for p in tmp_path.glob("shard-0-*")) == ["shard-0-clock-20.npz", "shard-0-clock-30.npz"]


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
