"""Kept models in the coordinator core (``psctl train --keep``, ``psctl models``), driven through
``CoordinatorState.handle`` with no sockets, in the style of test_coordinator_handle.py."""

from __future__ import annotations

import pytest

from psctl.core import coordinator as core
from psctl.core.coordinator import Answered, Ask, InvalidTransition, NoAnswer
from psctl.core.kept import KeptState, name_problem
from psctl.core.tables import MIN_SHARD_BYTES
from psctl.errors import RequestError
from psctl.protocol.wire import MsgType
from tests.unit.test_coordinator_handle import refused, released, spec, start

META = {"kind": "logreg", "metrics": {"accuracy": 0.9}}


def finish(sim) -> None:
    for i in range(len(sim.job.workers)):
        sim(core.Trained(f"t{i}", f"w{i}", {}))
    for i in range(len(sim.job.workers)):
        sim(core.FinalReport(f"w{i}", {"n": 5, "loss_sum": 1.0}))
    assert sim.job.state is core.JobState.DONE


def asks(effects: list, kind: MsgType) -> list[Ask]:
    return [e for e in effects if isinstance(e, Ask) and e.kind is kind]


def keep(sim, name: str = "ctr", extras: tuple = (), **body) -> list:
    body = {"job_id": sim.job.job_id, "meta": META, "trained_at": 1.5e9, "extras": [f"x{i}" for i in range(len(extras))], **body}
    return sim(core.ModelKept("keep", "d", body, extras))


def kept_job(n_shards: int = 2, name: str = "ctr", **over):
    over.setdefault("keep", {"name": name})
    sim = start(n_shards=n_shards, **over)
    finish(sim)
    out = keep(sim, name, extras=("vocab",))
    (ask,) = asks(out, MsgType.KEEP_TABLES)
    assert [b["shard_index"] for _, b in ask.targets] == list(range(n_shards))
    assert ask.arrays[0] == ["vocab"] and all(a is None for a in ask.arrays[1:])  # extras go to part 0 only
    reply = sim(Answered(ask.ask, ({"keys": 5, "bytes": 40},) * n_shards))
    assert released(reply, "keep")["name"] == name
    with pytest.raises(RequestError, match="kept already"):  # once: the tables were handed over
        keep(sim, name)
    return sim


def listing(sim, name=None, sizes=None) -> list[dict]:
    out = sim(core.ModelsAsked("ls", name))
    status = asks(out, MsgType.STATUS)
    if status:
        (ask,) = status
        replies = sizes or tuple({"kept": [{"name": m.name, "version": m.version, "keys": 5, "bytes": 40, "pulls": 0,
                                            "keys_pulled": 0, "bytes_pulled": 0} for m in sim.core.models.values()]}
                                 for _ in ask.targets)
        out = sim(Answered(ask.ask, replies))
    return released(out, "ls")["models"]


def test_names_are_checked():
    assert name_problem("ctr-v1.2_x") is None
    for bad in ("", "-x", "a/b", "a b", "x" * 65, 3, None):
        assert "1 to 64 letters" in name_problem(bad)


def test_a_submit_with_a_bad_or_taken_name_is_refused_and_replace_is_allowed():
    with pytest.raises(RequestError, match="1 to 64 letters"):
        start(keep={"name": "no/slash"})
    sim = kept_job()
    version = sim.core.models["ctr"].version
    sim(core.JobEndRequested("d"))
    with pytest.raises(RequestError, match="kept on this server already.*--replace") as exc:
        sim(core.JobSubmitted("sub2", "d", spec(2, keep={"name": "ctr"})))
    assert exc.value.code == "model_exists"
    out = sim(core.JobSubmitted("sub3", "d", spec(2, keep={"name": "ctr", "replace": True})))
    assert released(out, "sub3")["job_id"] != version


def test_keep_lists_and_drops_a_model_and_frees_its_parts():
    sim = kept_job()
    sim(core.JobEndRequested("d"))
    (row,) = listing(sim)
    assert row["name"] == "ctr" and row["kind"] == "logreg" and row["state"] == "kept" and row["trained_at"] == 1.5e9
    assert row["metrics"] == {"accuracy": 0.9} and [s["keys"] for s in row["shards"]] == [5, 5]
    assert [s["address"] for s in row["shards"]] == ["h:0", "h:1"]
    assert refused(sim(core.ModelsAsked("ls", "other")), "ls").code == "unknown_model"
    for junk in ({"a": 1}, ["ctr"], 3):  # anything a frame may carry is one sentence, not a crash
        assert refused(sim(core.ModelsAsked("ls", junk)), "ls").code == "unknown_model"
        assert refused(sim(core.ModelDropRequested("drop", junk)), "drop").code == "unknown_model"
    assert "meta" not in row and listing(sim, "ctr")[0]["meta"] == META  # one model's listing carries its meta
    out = sim(core.ModelDropRequested("drop", "ctr"))
    (ask,) = asks(out, MsgType.KEEP_DROP)
    assert [b["shard_index"] for _, b in ask.targets] == [0, 1] and "ctr" not in sim.core.models
    assert released(sim(Answered(ask.ask, ({}, NoAnswer("gone")))), "drop") == {"name": "ctr", "freed": 1}
    assert refused(sim(core.ModelDropRequested("drop2", "ctr")), "drop2").message == "no model named 'ctr' is kept on this server"
    assert listing(sim) == []


def test_keep_is_only_for_a_finished_job_submitted_with_a_name():
    sim = start(keep={"name": "ctr"})
    with pytest.raises(RequestError, match="still training"):
        keep(sim)
    finish(sim)
    with pytest.raises(RequestError, match="driver of the running job"):
        sim(core.ModelKept("k", "stranger", {"job_id": sim.job.job_id, "meta": META}))
    with pytest.raises(RequestError, match="meta"):
        keep(sim, meta="nope")
    plain = start()
    finish(plain)
    with pytest.raises(RequestError, match="not submitted with a name"):
        keep(plain)


def test_a_keep_that_fails_on_one_shard_frees_the_others_and_keeps_the_old_version():
    sim = kept_job()
    old = sim.core.models["ctr"].version
    sim(core.JobEndRequested("d"))
    out = sim(core.JobSubmitted("sub", "d", spec(2, keep={"name": "ctr", "replace": True})))
    for i in range(2):
        sim(core.WorkerRegistered(f"rw{i}b", f"w{i}", pid=i, host="x"))
    sim.answer(sim(core.TablesGiven("tab", "d", {"tables": [{"name": "w", "rows": 10}]})), MsgType.JOB_SETUP, {})
    finish(sim)
    (ask,) = asks(keep(sim), MsgType.KEEP_TABLES)
    out = sim(Answered(ask.ask, ({"keys": 5}, NoAnswer("disk full"))))
    assert "failed on shard 1: disk full" in refused(out, "keep").message
    (drop,) = asks(out, MsgType.KEEP_DROP)
    assert [b["shard_index"] for _, b in drop.targets] == [0] and drop.targets[0][1]["version"] == sim.job.job_id
    assert sim.core.models["ctr"].version == old


def test_replacing_switches_the_name_at_once_then_frees_the_old_version():
    sim = kept_job()
    old = sim.core.models["ctr"].version
    sim(core.JobEndRequested("d"))
    sim(core.JobSubmitted("sub", "d", spec(2, keep={"name": "ctr", "replace": True})))
    for i in range(2):
        sim(core.WorkerRegistered(f"rw{i}b", f"w{i}", pid=i, host="x"))
    sim.answer(sim(core.TablesGiven("tab", "d", {"tables": [{"name": "w", "rows": 10}]})), MsgType.JOB_SETUP, {})
    finish(sim)
    (ask,) = asks(keep(sim), MsgType.KEEP_TABLES)
    assert sim.core.models["ctr"].version == old  # until every shard has its part
    out = sim(Answered(ask.ask, ({"keys": 5},) * 2))
    assert sim.core.models["ctr"].version == sim.job.job_id != old
    (drop,) = asks(out, MsgType.KEEP_DROP)
    assert {b["version"] for _, b in drop.targets} == {old}


def test_a_lost_part_is_loaded_by_the_next_shard_when_the_model_has_a_checkpoint_folder():
    sim = kept_job(checkpoint={"dir": "/ck", "every": 5})
    sim(core.JobEndRequested("d"))
    sim(core.ConnectionClosed("s1"))
    entry = sim.core.models["ctr"]
    assert entry.state is KeptState.RESTORING and entry.shards[1] is None and "/ck" in entry.reason
    (row,) = listing(sim)
    assert row["state"] == "restoring" and row["shards"][1]["address"] is None
    out = sim(core.ShardRegistered("rs9", "s9", "h:9", 109))
    (load,) = asks(out, MsgType.KEEP_LOAD)
    assert load.targets[0][0] == "s9"
    body = load.targets[0][1]
    assert (body["shard_index"], body["n_shards"], body["dir"], body["version"]) == (1, 2, "/ck", entry.version)
    assert body["ranges"] == {"w": (5, 10)}
    sim(Answered(load.ask, ({"keys": 5},)))
    assert entry.state is KeptState.KEPT and entry.shards[1].address == "h:9"


def test_a_part_that_cannot_be_loaded_loses_the_model_and_frees_the_rest():
    sim = kept_job(checkpoint={"dir": "/ck", "every": 5})
    sim(core.JobEndRequested("d"))
    sim(core.ConnectionClosed("s1"))
    (load,) = asks(sim(core.ShardRegistered("rs9", "s9", "h:9", 109)), MsgType.KEEP_LOAD)
    out = sim(Answered(load.ask, (NoAnswer("no such file"),)))
    entry = sim.core.models["ctr"]
    assert entry.state is KeptState.LOST and "no such file" in entry.reason
    (drop,) = asks(out, MsgType.KEEP_DROP)
    assert [c for c, _ in drop.targets] == ["s0"]
    with pytest.raises(InvalidTransition):
        entry.move(KeptState.KEPT)


def test_without_a_checkpoint_folder_a_lost_part_loses_the_model():
    sim = kept_job()
    sim(core.JobEndRequested("d"))
    out = sim(core.ConnectionClosed("s0"))
    entry = sim.core.models["ctr"]
    assert entry.state is KeptState.LOST and "no checkpoint folder" in entry.reason
    assert [c for c, _ in asks(out, MsgType.KEEP_DROP)[0].targets] == ["s1"]
    assert asks(sim(core.ShardRegistered("rs9", "s9", "h:9", 109)), MsgType.KEEP_LOAD) == []
    (row,) = listing(sim)
    assert row["state"] == "lost"


def resumed(sim, name: str = "ctr", **over) -> list:
    over.setdefault("keep", {"name": name, "replace": True})
    out = sim(core.JobSubmitted("sub2", "d", spec(2, from_kept={"name": name}, **over)))
    for i in range(2):
        sim(core.WorkerRegistered(f"rw{i}b", f"w{i}", pid=i, host="x"))
    return out


def test_a_kept_model_is_trained_further_in_place_and_kept_again_under_its_name():
    sim = kept_job()
    old = sim.core.models["ctr"]
    sim(core.JobEndRequested("d"))
    assert released(resumed(sim), "sub2")["job_id"] != old.version
    assert sim.job.kept_from is old
    out = sim(core.TablesGiven("tab", "d", {"tables": [{"name": "w", "rows": 10}]}))
    (setup,) = asks(out, MsgType.JOB_SETUP)
    assert all(b["from_kept"] == {"name": "ctr", "version": old.version} for _, b in setup.targets)
    sim(Answered(setup.ask, ({}, {})))
    assert refused(sim(core.ModelDropRequested("drop", "ctr")), "drop").code == "not_now"  # it is being trained
    finish(sim)
    (ask,) = asks(keep(sim), MsgType.KEEP_TABLES)
    out = sim(Answered(ask.ask, ({"keys": 5},) * 2))
    assert sim.core.models["ctr"].version == sim.job.job_id
    assert {b["version"] for _, b in asks(out, MsgType.KEEP_DROP)[0].targets} == {old.version}


def test_a_kept_model_split_over_two_shards_is_trained_further_on_both_whatever_its_size():
    sim = kept_job()  # min_shard_bytes 0: its 40 bytes over both shards
    sim(core.JobEndRequested("d"))
    resumed(sim, min_shard_bytes=MIN_SHARD_BYTES)  # alone, 40 bytes would go on one shard
    out = sim(core.TablesGiven("tab", "d", {"tables": [{"name": "w", "rows": 10}]}))
    (setup,) = asks(out, MsgType.JOB_SETUP)
    assert [c for c, _ in setup.targets] == ["s0", "s1"]
    assert released(sim(Answered(setup.ask, ({}, {}))), "tab")["ranges"] == {"w": [(0, 5), (5, 10)]}


def test_training_a_kept_model_further_is_refused_for_another_layout_or_name():
    sim = kept_job()
    sim(core.JobEndRequested("d"))
    with pytest.raises(RequestError, match="no model named 'other'"):
        sim(core.JobSubmitted("x", "d", spec(2, from_kept={"name": "other"}, keep={"name": "other", "replace": True})))
    with pytest.raises(RequestError, match="keeps it under its name"):
        sim(core.JobSubmitted("x", "d", spec(2, from_kept={"name": "ctr"})))
    resumed(sim)
    with pytest.raises(RequestError, match="has tables .* this job's are"):
        sim(core.TablesGiven("tab", "d", {"tables": [{"name": "w", "rows": 11}]}))
    sim(core.JobEndRequested("d"))
    sim(core.ConnectionClosed("s1"))  # no checkpoint folder: the model is lost
    with pytest.raises(RequestError, match="cannot be trained now"):
        resumed(sim)


async def test_a_meta_too_large_for_a_control_body_is_not_kept_and_nothing_is_sent():
    from psctl.apps import train as training

    class Untouched:
        async def request(self, *args, **kwargs):
            raise AssertionError("nothing may be sent")

    cfg = training.TrainConfig("logreg", "x.csv", server="h:1", keep="big")
    meta = {"kind": "logreg", "standardize": {"mean": [0.123456789] * 100_000, "std": [1.0] * 100_000}}
    why = await training._keep(cfg, Untouched(), "job-1", meta, {}, lambda e: None)
    assert why.startswith("the model's meta (standardization, columns, metrics) takes") and "at most 786432" in why
