"""KeyPlan: a step's keys routed to the shards once, used by its pull and its push; scatter undoes gather."""

import asyncio

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from psctl.cluster.client import ShardClient
from psctl.core import keyplan
from psctl.core.keyplan import KeyPlan, Routing
from psctl.core.shard_state import ShardState
from psctl.core.optim import SGD
from psctl.core.sparse import key_owner
from psctl.core.tables import TableSpec, shard_ranges, table_ranges
from psctl.protocol.wire import Flag, Message, MsgType

SPECS = [TableSpec("w", 1000), TableSpec("emb", 300, dim=3), TableSpec("h", 2**40, dim=2, sparse=True)]


def routing(n_shards: int) -> Routing:
    return Routing.of({t.name: table_ranges(t, n_shards) for t in SPECS}, [t.name for t in SPECS if t.sparse])


def test_dense_keys_go_to_the_shard_whose_range_holds_them():
    plan = KeyPlan(routing(3), {"w": np.array([0, 5, 333, 334, 999])})
    assert [r for r in shard_ranges(1000, 3)] == [(0, 333), (333, 666), (666, 1000)]
    assert [list(plan.pull_arrays(i)[0]) for i in range(3)] == [[0, 5], [333, 334], [999]]
    assert plan.pull_arrays(0)[0].dtype == np.uint32  # the narrowest wire type for 1000 keys


def test_hashed_keys_go_to_their_owner_and_stay_sorted():
    keys = np.unique(np.random.default_rng(1).integers(0, 2**40, 500))
    plan = KeyPlan(routing(4), {"h": keys})
    for i in range(4):
        sent = plan.pull_arrays(i)[0].astype(np.int64)
        assert (key_owner(sent, 4) == i).all() and (np.diff(sent) > 0).all()
    assert sum(len(plan.pull_arrays(i)[0]) for i in range(4)) == len(keys)


def test_only_shards_with_keys_are_asked_for_a_keyed_pull_every_shard_gets_a_push():
    plan = KeyPlan(routing(3), {"w": np.array([1, 2])})
    assert plan.pull_shards == [0]
    pushes = [plan.push_arrays(i, {"w": np.ones(2, np.float32)}) for i in range(3)]
    assert [len(p[0]) for p in pushes] == [2, 0, 0]


def test_an_unkeyed_plan_sends_no_keys_and_slices_ranges():
    plan = KeyPlan(routing(2), {"w": None, "emb": None})
    assert not plan.keyed and plan.pull_shards == [0, 1] and plan.pull_arrays(1) == []
    grads = {"w": np.arange(1000, dtype=np.float32), "emb": np.ones((300, 3), np.float32)}
    part = plan.push_arrays(1, grads)
    np.testing.assert_array_equal(part[0], np.arange(500, 1000))
    assert part[1].shape == (150, 3)


def test_a_mixed_plan_sends_a_whole_table_keyed():
    plan = KeyPlan(routing(2), {"w": None, "emb": np.array([3, 200])})
    assert plan.keyed and plan.sizes == {"w": 1000, "emb": 2}
    np.testing.assert_array_equal(plan.pull_arrays(1)[0], np.arange(500, 1000))


def test_an_unknown_table_is_refused():
    with pytest.raises(KeyError, match="nope"):
        KeyPlan(routing(2), {"nope": None})


@settings(max_examples=60, deadline=None)
@example(n_shards=1, seed=9288063, which=["emb"])  # no keys at all for a 2-D table: rows come back (0, 3)
@given(
    n_shards=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    which=st.lists(st.sampled_from(["w", "emb", "h", "w-all", "emb-all"]), min_size=1, max_size=3, unique=True),
)
def test_scatter_of_gather_round_trips(n_shards, seed, which):
    rng = np.random.default_rng(seed)
    keys: dict = {}
    for what in which:
        name = what.split("-")[0]
        if name in keys:
            continue
        spec = next(t for t in SPECS if t.name == name)
        if what.endswith("-all"):
            keys[name] = None
        else:
            space = spec.rows if not spec.sparse else 2**40
            keys[name] = np.unique(rng.integers(0, space, int(rng.integers(0, 60))))
    plan = KeyPlan(routing(n_shards), keys)
    values = {}
    for name in plan.names:
        spec = next(t for t in SPECS if t.name == name)
        values[name] = rng.normal(size=spec.shape(plan.sizes[name])).astype(np.float32)
    parts = plan.gather(values)
    back = plan.scatter({i: parts[i] for i in plan.pull_shards})
    for name in plan.names:
        np.testing.assert_array_equal(back[name], values[name])
    # what a push sends is the same cut of the same keys
    for i in range(n_shards):
        sent = plan.push_arrays(i, values)
        if plan.keyed:
            assert [a.tolist() for a in sent[::2]] == [a.tolist() for a in plan.pull_arrays(i)]
            rows = sent[1::2]
        else:
            rows = sent
        for a, b in zip(rows, parts[i]):
            np.testing.assert_array_equal(a, b)


# -- the client: one plan, one routing, for the pull and the push of a step ----------------
class FakeShard:
    """A peer that serves a real ShardState in memory: what the client sends is what a shard gets."""

    def __init__(self, state: ShardState):
        self.state, self.name, self.sent = state, "fake", []

    def request_nowait(self, kind, body=None, arrays=None):
        fut = asyncio.get_running_loop().create_future()
        self.sent.append((kind, body, arrays))
        names = body["tables"]
        if kind is MsgType.PULL:
            keys = list(arrays) if body.get("keyed") else None
            fut.set_result(Message(MsgType.PULL, {}, self.state.read(names, keys), flags=Flag.REPLY))
        else:
            keyed = body.get("keyed")
            grads = {n: (arrays[2 * i] if keyed else None, arrays[2 * i + 1] if keyed else arrays[i]) for i, n in enumerate(names)}
            self.state.push(0, body["clock"], grads, body["count"])
            fut.set_result(Message(MsgType.PUSH, {}, flags=Flag.REPLY))
        return fut

    request_quiet = request_nowait  # a push is taken at once here: its ack is known at once


async def test_a_step_routes_once_and_its_push_lands_on_the_rows_it_pulled(monkeypatch):
    tables = [TableSpec("emb", 300, dim=3, init="normal")]
    ranges = shard_ranges(300, 3)
    shards = [
        FakeShard(ShardState("j", tables, {"emb": r}, "async", 0, [0], SGD(lr=1.0), seed=0, shard_index=i, n_shards=3))
        for i, r in enumerate(ranges)
    ]
    client = ShardClient(shards, {"emb": ranges}, "j")  # type: ignore[arg-type]
    calls = []
    real = keyplan.split_keys
    monkeypatch.setattr(keyplan, "split_keys", lambda k, r: calls.append(len(k)) or real(k, r))
    keys = np.array([0, 7, 150, 299])
    plan = client.plan({"emb": keys})
    before = (await client.pull(plan, 0))["emb"]
    await client.push({"emb": np.ones((4, 3), np.float32)}, 0, 1, plan)
    assert calls == [4]  # routed once for both
    after = (await client.pull(plan, 1))["emb"]
    np.testing.assert_allclose(after, before - 1.0, rtol=1e-6)
    # the push carried the very key arrays the pull sent
    for shard in shards:
        pulls = [a for kind, _, a in shard.sent if kind is MsgType.PULL]
        pushes = [a for kind, _, a in shard.sent if kind is MsgType.PUSH]
        assert pushes[0][0] is pulls[0][0] if pulls else len(pushes[0][0]) == 0


async def test_a_step_that_touches_no_key_gets_empty_rows_of_the_tables_shape():
    tables = [TableSpec("emb", 300, dim=3, init="normal")]
    ranges = shard_ranges(300, 2)
    shards = [
        FakeShard(ShardState("j", tables, {"emb": r}, "async", 0, [0], SGD(lr=1.0), seed=0, shard_index=i, n_shards=2))
        for i, r in enumerate(ranges)
    ]
    client = ShardClient(shards, {"emb": ranges}, "j")  # type: ignore[arg-type]
    plan = client.plan({"emb": np.array([], dtype=np.int64)})
    rows = (await client.pull(plan, 0))["emb"]
    assert rows.shape == (0, 3) and rows.dtype == np.float32
    await client.push({"emb": rows}, 0, 1, plan)  # and its (empty) push is taken
