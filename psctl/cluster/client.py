"""The worker's (and driver's) view of the shards: one pull and one push per step, both bounded.

A step's keys are routed once (:class:`~psctl.core.keyplan.KeyPlan`); :meth:`ShardClient.pull`
and :meth:`ShardClient.push` send each shard its part of that plan. Every reply is
awaited under a deadline: a shard that does not answer gives :class:`ShardTimeout`
naming it, never a silent hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Generator, Mapping, Sequence
from typing import Any

import numpy as np

from psctl import net
from psctl.core.keyplan import KeyPlan, Routing
from psctl.protocol.wire import Message, MsgType

DEFAULT_ANSWER_TIMEOUT_S = 10.0


class ShardTimeout(net.ConnectionLost):
    """A shard took no reply within the deadline and did not answer a ping either.

    A :class:`~psctl.net.ConnectionLost`: a worker with a checkpoint treats it as a lost
    shard (it waits for the coordinator's rewind); without one it ends with this sentence.
    """


class Acks:
    """The acks of one push: ``await acks`` waits for every shard's, under the client's deadline.

    A push is sent quiet (answered only if it fails): the reply to the next request on
    the same connection, the step's next pull, acknowledges it. A shard that request
    did not go to is asked with a PING when the acks are awaited.
    """

    def __init__(self, client: ShardClient, futs: list[asyncio.Future[Message]]):
        self._client, self.futs = client, futs

    def __await__(self) -> Generator[Any, None, None]:
        return self._client._acked(self.futs).__await__()


class ShardClient:
    """Connections to every shard of one job.

    Requests to different shards go out concurrently; a push and the next pull may
    be pipelined on the same connection (replies match by id). ``answer_timeout_s``
    bounds each wait for a reply *while the shard is silent*: a pull may wait at the
    clock gate as long as the job needs (sync and ssp modes), so when no reply has come
    within it the client pings the shard, and only a shard that does not answer the
    ping either (within the same time) is given up on. The worker passes the job's
    failure timeout: within that the coordinator declares a stuck party lost, and the
    job recovers or aborts, which releases a pull waiting at the gate.
    """

    def __init__(
        self,
        peers: list[net.Peer],
        ranges: Mapping[str, Any],
        job_id: str,
        hashed: Collection[str] = (),
        *,
        addresses: Sequence[str] | None = None,
        answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
    ):
        self.peers = peers
        self.routing = Routing.of(ranges, hashed)
        self.job_id = job_id
        self.addresses = list(addresses) if addresses is not None else [p.name for p in peers]
        self.answer_timeout_s = answer_timeout_s
        self.bytes_pulled = 0
        #: How many clocks the slowest live worker was behind the last pull's clock when the
        #: shards answered it (the worst over the shards asked): 0 in sync mode, at most the
        #: staleness bound in ssp, anything in async.
        self.last_staleness = 0
        self.bytes_pushed = 0

    @classmethod
    async def connect(
        cls,
        addresses: list[str],
        ranges: Mapping[str, Any],
        job_id: str,
        hello: dict[str, Any],
        *,
        max_frame_bytes: int,
        hashed: Collection[str] = (),
        security: net.Security = net.LOCAL,
        answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
    ) -> ShardClient:
        async def hello_to(i: int, address: str) -> tuple[net.Peer, asyncio.Future[Any]]:
            # HELLO as soon as the connection is up: until it is read the connection is in its
            # set-up at the shard, where a full budget drops the one silent longest.
            peer = await net.connect(address, max_frame_bytes=max_frame_bytes, what=f"psctl shard {i}", security=security)
            return peer, peer.request_nowait(MsgType.HELLO, {"job_id": job_id, **hello})

        opened = await asyncio.gather(*(hello_to(i, a) for i, a in enumerate(addresses)))
        client = cls([p for p, _ in opened], ranges, job_id, hashed, addresses=addresses, answer_timeout_s=answer_timeout_s)
        await client._answers([(i, fut) for i, (_, fut) in enumerate(opened)], "HELLO")
        return client

    def plan(self, keys: Mapping[str, np.ndarray | None]) -> KeyPlan:
        """Route a step's keys (per table: sorted unique keys, or None for the whole table) once."""
        return KeyPlan(self.routing, keys)

    async def pull(
        self, what: KeyPlan | Mapping[str, np.ndarray | None] | Sequence[str], clock: int = 0, after: Acks | None = None
    ) -> dict[str, np.ndarray]:
        """Each table's rows of the plan's keys (whole tables: names, or None keys), waiting at the gate for ``clock``.

        Only shards that own some of the keys are asked (every shard for whole tables).
        ``after``: the acks of the push this pull follows. A shard that refused that push
        may hold the pull at its gate for good (its clock never advanced), so the push's
        error ends the pull at once; await the acks after the pull.
        """
        plan = self._as_plan(what)
        body: dict[str, Any] = {"job_id": self.job_id, "tables": plan.names, "clock": clock}
        if plan.keyed:
            body["keyed"] = True
        asked = []
        for i in plan.pull_shards:
            arrays = plan.pull_arrays(i)
            self.bytes_pulled += sum(a.nbytes for a in arrays)
            fut = self.peers[i].request_nowait(MsgType.PULL, body, arrays)
            if after is not None:
                _fail_with(after.futs[i], fut)
            asked.append((i, fut))
        replies = await self._answers(asked, "pull")
        lows = [r.body.get("min_clock") for r in replies]
        lows = [low for low in lows if isinstance(low, int) and not isinstance(low, bool)]
        self.last_staleness = max(0, clock - min(lows)) if lows else 0
        parts = {i: r.arrays for (i, _), r in zip(asked, replies)}
        self.bytes_pulled += sum(a.nbytes for r in replies for a in r.arrays)
        return plan.scatter(parts)

    def push(
        self, grads: Mapping[str, np.ndarray], clock: int, count: int, plan: KeyPlan | None = None, sums: bool = False
    ) -> Acks:
        """Send every shard its part of each gradient (laid out like the pull of ``plan``; no plan:
        whole tables) at ``clock``, for ``count`` rows; ``sums``: the gradients are per-key sums
        over the batch, not its mean. Every shard gets a push, perhaps empty, because a push is
        also how a shard learns the worker's clock. Returns the acks to await."""
        plan = plan if plan is not None else self.plan(dict.fromkeys(grads))
        body: dict[str, Any] = {"job_id": self.job_id, "tables": plan.names, "clock": clock, "count": count}
        if plan.keyed:
            body["keyed"] = True
        if sums:
            body["sums"] = True
        futs = []
        for i, peer in enumerate(self.peers):
            arrays = plan.push_arrays(i, grads)
            self.bytes_pushed += sum(a.nbytes for a in arrays)
            futs.append(peer.request_quiet(MsgType.PUSH, body, arrays))
        return Acks(self, futs)

    async def dump(
        self, tables: list[str], with_state: bool = False
    ) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Every stored key of each table with its values (and optimizer state), sorted by key (drivers only)."""
        body = {"job_id": self.job_id, "tables": tables, "dump": True, "with_state": with_state}
        replies = await self._answers([(i, p.request_nowait(MsgType.PULL, body)) for i, p in enumerate(self.peers)], "pull")
        out = {}
        for name in tables:
            keys, values, state = [], [], {}
            for r in replies:
                at = _dump_offset(r.body["state"], tables, name)
                state_names = r.body["state"][name]
                keys.append(r.arrays[at])
                values.append(r.arrays[at + 1])
                for j, s in enumerate(state_names):
                    state.setdefault(s, []).append(r.arrays[at + 2 + j])
            all_keys = np.concatenate(keys)
            order = np.argsort(all_keys, kind="stable")
            self.bytes_pulled += sum(a.nbytes for a in keys + values)
            out[name] = (all_keys[order], np.concatenate(values)[order], {s: np.concatenate(p)[order] for s, p in state.items()})
        return out

    async def status(self, timeout_s: float = net.DEFAULT_REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
        """Each shard's STATUS body (keys, bytes, memory), in shard order."""
        return [r.body for r in await asyncio.gather(*(p.request(MsgType.STATUS, {}, timeout_s=timeout_s) for p in self.peers))]

    async def leave(self) -> None:
        futs = [(i, p.request_nowait(MsgType.LEAVE, {"job_id": self.job_id})) for i, p in enumerate(self.peers)]
        await self._answers(futs, "LEAVE")

    def close(self) -> None:
        for peer in self.peers:
            peer.close()

    # -- replies under a deadline ----------------------------------------------
    def _as_plan(self, what: KeyPlan | Mapping[str, np.ndarray | None] | Sequence[str]) -> KeyPlan:
        if isinstance(what, KeyPlan):
            return what
        if isinstance(what, Mapping):
            return self.plan(what)
        return self.plan(dict.fromkeys(what))

    async def _acked(self, futs: list[asyncio.Future[Message]]) -> list[Message]:
        """Every shard's ack of one push: a shard whose ack no later reply has brought is pinged."""
        for i, fut in enumerate(futs):
            if not fut.done() and self.peers[i].is_open:
                self.peers[i].request_nowait(MsgType.PING, {})
        return await self._answers(list(enumerate(futs)), "push")

    async def _answers(self, asked: list[tuple[int, asyncio.Future[Message]]], what: str) -> list[Message]:
        """Every shard's reply, in order; the first failure raises as soon as it is known.

        A step's replies usually come within the deadline, so one wait covers them all
        (a task per shard, as ``gather`` makes, costs more than the step's own work); only
        shards still silent after it are pinged, each by :meth:`_answer`.
        """
        futs = [fut for _, fut in asked]
        pending = [fut for fut in futs if not fut.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.answer_timeout_s, return_when=asyncio.FIRST_EXCEPTION)
            _raise_first_failure(futs)
            if still:
                late = [self._answer(i, fut, what, silent=True) for i, fut in asked if not fut.done()]
                await asyncio.gather(*late)
        _raise_first_failure(futs)
        return [fut.result() for fut in futs]

    async def _answer(self, shard: int, fut: asyncio.Future[Message], what: str, silent: bool = False) -> Message:
        """The reply ``fut`` of shard ``shard``; while none comes, the shard must keep answering pings.
        ``silent``: it has been silent for ``answer_timeout_s`` already; ping it first."""
        if fut.done():
            return fut.result()
        waited_s = self.answer_timeout_s if silent else 0.0
        while True:
            if not silent:
                done, _ = await asyncio.wait({fut}, timeout=self.answer_timeout_s)
                if done:
                    return fut.result()
                waited_s += self.answer_timeout_s
            silent = False
            # A pull may wait at the clock gate for as long as the job needs; a shard that
            # answers a ping is alive and the gate holds the pull: keep waiting.
            try:
                await self.peers[shard].request(MsgType.PING, {}, timeout_s=self.answer_timeout_s)
            except (net.ConnectionLost, net.RemoteError):
                if fut.done():
                    return fut.result()
                waited_s += self.answer_timeout_s
                raise ShardTimeout(
                    f"shard {shard} at {self.addresses[shard]} did not answer a {what} within {waited_s:g} s"
                    f" (nor a ping within {self.answer_timeout_s:g} s)"
                ) from None
            if fut.done():
                return fut.result()


def _fail_with(first: asyncio.Future[Message], then: asyncio.Future[Message]) -> None:
    """When ``first`` fails, ``then`` fails with its error (unless answered already)."""

    def done(fut: asyncio.Future[Message]) -> None:
        if not fut.cancelled() and fut.exception() is not None and not then.done():
            then.set_exception(fut.exception())  # type: ignore[arg-type]

    first.add_done_callback(done)


def _raise_first_failure(futs: list[asyncio.Future[Message]]) -> None:
    """Raise the error of the first future (in shard order) that failed, if one did."""
    for fut in futs:
        if fut.done() and fut.exception() is not None:
            raise fut.exception()  # type: ignore[misc]


def _dump_offset(state_names: dict[str, list[str]], tables: list[str], name: str) -> int:
    """Where ``name``'s arrays start in a dump reply: each table sends keys, values, then its state."""
    at = 0
    for t in tables:
        if t == name:
            return at
        at += 2 + len(state_names[t])
    raise KeyError(name)
