"""A kept model's part on a shard (core/shard_state.KeptTables): read-only reads with a stored mask,
traffic counters, and the file round trip a restarted shard loads."""

import numpy as np
import pytest

from psctl.core.optim import AdaGrad
from psctl.core.shard_state import KeptTables, ShardState
from psctl.core.shard_errors import BadKeys, UnknownTable
from psctl.core.tables import TableSpec
from psctl.files import checkpoint

SPECS = [TableSpec("w", 10), TableSpec("h", 2**32, sparse=True)]
RANGES = {"w": (0, 10), "h": (0, 2**32)}


def trained() -> ShardState:
    s = ShardState("j", SPECS, RANGES, "async", 0, [0], AdaGrad(lr=0.5), seed=0)
    s.push(0, 0, {"w": (None, np.ones(10, np.float32)), "h": (np.array([7, 2**31]), np.ones(2, np.float32))}, 1)
    return s


def test_a_finished_jobs_tables_become_a_read_only_part_without_optimizer_state():
    s = trained()
    before = s.tables["w"].values.copy()
    part = KeptTables.from_job("m", "j", s, {"vocab": np.arange(3)})
    assert s.tables == {} and all(t.state == {} for t in part.tables.values())
    w, w_found, h, h_found = part.read(["w", "h"], [np.arange(10), np.array([5, 7, 2**31])])
    values = part.read(["h"], [np.array([5, 7, 2**31])])
    np.testing.assert_array_equal(w, before)
    assert w_found.all() and h_found.tolist() == [0, 1, 1] and h[0] == 0  # key 5 was never pushed
    np.testing.assert_array_equal(values[0], h)
    whole = part.read(["w"], None)
    np.testing.assert_array_equal(whole[0], before)
    status = part.status()
    assert status["pulls"] == 3 and status["keys_pulled"] == 10 + 3 + 3 + 10
    assert status["bytes_pulled"] == 4 * (10 + 3 + 3 + 10) and status["keys"] == 12
    with pytest.raises(BadKeys, match="sparse"):
        part.read(["h"], None)
    with pytest.raises(UnknownTable, match="no table 'x'"):
        part.check_tables(["x"])


def test_a_part_written_to_its_file_loads_back_equal(tmp_path):
    part = KeptTables.from_job("m", "j", trained(), {"vocab": np.arange(3)})
    checkpoint.save_kept(tmp_path, "m", "j", 0, part.arrays())
    again = KeptTables.from_arrays("m", "j", SPECS, RANGES, 0, 1, checkpoint.load_kept(tmp_path, "m", "j", 0))
    keys = [np.arange(10), np.array([5, 7, 2**31])]
    for a, b in zip(part.read(["w", "h"], keys), again.read(["w", "h"], keys)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.extras["vocab"], np.arange(3))
    with pytest.raises(checkpoint.CheckpointError, match="part of kept model 'm'"):
        checkpoint.load_kept(tmp_path, "m", "j", 1)
    checkpoint.remove_kept(tmp_path, "m", "j", 0)
    assert not checkpoint.kept_file(tmp_path, "m", "j", 0).exists()


def test_a_job_that_adopts_a_part_trains_it_in_place():
    part = KeptTables.from_job("m", "j", trained(), {})
    before = part.read(["h"], [np.array([7])])[0].copy()
    job = ShardState("j2", SPECS, RANGES, "async", 0, [0], AdaGrad(lr=0.5), seed=0)
    job.adopt(part)
    assert job.tables["h"] is part.tables["h"] and "sum_sq" in job.tables["w"].state
    job.push(0, 0, {"w": (None, np.ones(10, np.float32)), "h": (np.array([7, 9]), np.ones(2, np.float32))}, 1)
    after, found = part.read(["h"], [np.array([7, 9])])
    assert after[0] < before[0] and found.tolist() == [1, 1]  # the reader sees the push at once, and the new key
    other = ShardState("j3", [TableSpec("w", 11), SPECS[1]], {"w": (0, 11), "h": RANGES["h"]}, "async", 0, [0], AdaGrad(lr=0.5), seed=0)
    with pytest.raises(ValueError, match="is not this job's table 'w'"):
        other.adopt(part)
