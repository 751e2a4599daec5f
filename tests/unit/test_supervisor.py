"""psctl server's shard supervision, driven with stand-in processes (no sockets, no children)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from psctl.cluster.supervisor import Supervisor
from psctl.errors import PsctlError


class FakeProc:
    def __init__(self) -> None:
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await self.exited


@dataclass
class FakeChild:
    index: int
    proc: FakeProc
    role: str = "shard"


@dataclass
class FakeCluster:
    children: list[FakeChild] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    def add(self) -> FakeChild:
        child = FakeChild(len(self.children), FakeProc())
        self.children.append(child)
        return child

    async def start_shards(self, n: int, coordinator: str) -> list[str]:
        assert n == 1
        child = self.add()
        self.started.append(f"127.0.0.1:{9000 + child.index}")
        return self.started[-1:]


async def test_an_exited_shard_is_started_again_until_stopped():
    cluster, lines, stop, replaced = FakeCluster(), [], asyncio.Event(), asyncio.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        if line.startswith("a new shard is at"):
            replaced.set()

    first = cluster.add()
    running = asyncio.ensure_future(Supervisor(cluster, "127.0.0.1:1", on_line).run(stop))  # type: ignore[arg-type]
    first.proc.exited.set_result(-9)
    await asyncio.wait_for(replaced.wait(), 5)
    assert lines == ["shard process 0 exited (-9); starting another", "a new shard is at 127.0.0.1:9001"]
    stop.set()
    await asyncio.wait_for(running, 5)
    assert len(cluster.children) == 2


async def test_too_many_restarts_stop_the_server():
    cluster, lines, stop = FakeCluster(), [], asyncio.Event()
    cluster.add().proc.exited.set_result(1)
    original = cluster.start_shards

    async def start_one_that_dies(n: int, coordinator: str) -> list[str]:
        addresses = await original(n, coordinator)
        cluster.children[-1].proc.exited.set_result(1)
        return addresses

    cluster.start_shards = start_one_that_dies  # type: ignore[method-assign]
    with pytest.raises(PsctlError, match="shard processes exited 4 times; stopping the server"):
        await asyncio.wait_for(Supervisor(cluster, "h:1", lines.append, max_restarts=3).run(stop), 5)  # type: ignore[arg-type]
    assert len(cluster.started) == 3
