"""What a checkpoint holds is checked before it is used: its manifest, each shard file's
job and clock, the job spec inside it, the counters a shard restores."""

import json

import numpy as np
import pytest

from psctl.core.job import JobSpec
from psctl.core.optim import SGD
from psctl.core.shard_state import ShardState
from psctl.core.tables import TableSpec
from psctl.errors import RequestError
from psctl.files import checkpoint


def state(job_id: str = "job-a") -> ShardState:
    return ShardState(job_id, [TableSpec("w", 4)], {"w": (0, 4)}, "sync", 0, [0], SGD(lr=0.5), seed=0)


def test_a_shard_file_of_another_job_with_the_same_shapes_is_refused(tmp_path):
    checkpoint.save_shard(tmp_path, 0, 10, *state("job-b").snapshot())
    with pytest.raises(checkpoint.CheckpointError, match=r"of job 'job-b', not this checkpoint's \(job 'job-a'\)"):
        checkpoint.load_shard(tmp_path, 0, 10, "job-a")
    with pytest.raises(checkpoint.CheckpointError, match=r"of job 'job-b', not this checkpoint's"):
        checkpoint.check_files(tmp_path, {"clock": 10, "n_shards": 1, "job_id": "job-a"})
    checkpoint.load_shard(tmp_path, 0, 10, "job-b")  # its own job's: fine


def test_a_shard_file_renamed_to_another_clock_or_shard_is_refused(tmp_path):
    checkpoint.save_shard(tmp_path, 0, 10, *state().snapshot())
    checkpoint.shard_file(tmp_path, 0, 10).rename(checkpoint.shard_file(tmp_path, 1, 20))
    with pytest.raises(checkpoint.CheckpointError, match="is shard 0's file of clock 10 of job 'job-a', not this checkpoint's"):
        checkpoint.load_shard(tmp_path, 1, 20)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"clock": "80"}, "'clock'"), ({"clock": -1}, "'clock'"), ({"n_shards": 0}, "'n_shards'"), ({"spec": []}, "'spec'"),
     ({"tables": {"w": 1}}, "'tables'"), ({"job_id": 7}, "'job_id'"), ({"previous_clock": "x"}, "'previous_clock'")],
)
def test_a_damaged_manifest_is_one_sentence(tmp_path, change, field):
    body = {"clock": 3, "previous_clock": None, "spec": {}, "tables": [], "n_shards": 1, "job_id": "j", **change}
    (tmp_path / "checkpoint.json").write_text(json.dumps(body))
    with pytest.raises(checkpoint.CheckpointError, match=f"is a damaged checkpoint manifest: bad {field}$"):
        checkpoint.read_manifest(tmp_path)


def test_a_manifest_nested_too_deeply_is_one_sentence(tmp_path):
    (tmp_path / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint manifest"):
        checkpoint.read_manifest(tmp_path)


BASE = {"model": "logreg", "n_workers": 1, "mode": "sync", "partitions": [{}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": "five"}, "'epochs' must be an integer >= 1, not 'five'"),
        ({"epochs": 0}, "'epochs' must be an integer >= 1, not 0"),
        ({"optimizer": {"name": "sgd", "params": {"lr": "x"}}}, "'optimizer.params.lr' must be a positive number, not 'x'"),
        ({"optimizer": {"name": "sgd", "params": {"lr_decay": float("nan")}}}, "'optimizer.params.lr_decay' must be a finite number"),
        ({"optimizer": {"params": {}}}, "'optimizer.name' must be a string, not None"),
        ({"checkpoint": {"dir": ".", "every": "five"}}, "'checkpoint.every' must be an integer >= 0, not 'five'"),
        ({"checkpoint": {"every": 5}}, "'checkpoint.dir' must be a string"),
        ({"resume": {"dir": ".", "clock": "80"}}, "'resume.clock' must be an integer >= 0, not '80'"),
        ({"resume": {"dir": ".", "clock": 8, "job_id": 3}}, "'resume.job_id' must be a string, not 3"),
    ],
)
def test_a_job_spec_with_a_bad_nested_field_is_one_sentence(change, message):
    with pytest.raises(RequestError) as info:
        JobSpec.from_wire({**BASE, **change})
    assert str(info.value).startswith(f"bad job spec: {message}")


def test_a_good_job_spec_still_reads():
    spec = JobSpec.from_wire({**BASE, "optimizer": {"name": "ftrl", "params": {"lr": 0.1, "l1": 0.0, "l2": 1}},
                              "checkpoint": {"dir": ".", "every": 0, "every_s": 0.5}, "resume": {"dir": "/x", "clock": 0}})
    assert spec.checkpoint_every_s == 0.5 and spec.resume_clock == 0


@pytest.mark.parametrize(
    "meta",
    [{"steps": {"w": "1"}, "updates": 0, "samples": 0}, {"steps": {}, "updates": 0, "samples": 0},
     {"steps": {"w": 1}, "updates": -1, "samples": 0}, {"steps": [1], "updates": 0, "samples": 0}, {}],
)
def test_a_shard_refuses_counters_that_do_not_fit_its_tables(meta):
    s = state()
    arrays, _ = s.snapshot()
    with pytest.raises(ValueError, match="the checkpoint's counters do not fit tables"):
        s.restore(arrays, meta, 3)


def test_a_shard_refuses_arrays_of_another_layout():
    s = state()
    with pytest.raises(ValueError, match="table 'w': checkpoint values has shape"):
        s.restore({"w/values": np.zeros(5, np.float32)}, {"steps": {"w": 0}, "updates": 0, "samples": 0}, 0)
    with pytest.raises(ValueError, match="table 'w': the checkpoint lacks 'values'"):
        s.restore({}, {"steps": {"w": 0}, "updates": 0, "samples": 0}, 0)
