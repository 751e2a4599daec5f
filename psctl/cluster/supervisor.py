"""Keeps the shard processes of ``psctl server`` running: a shard that exits is started again.

The new shard joins the coordinator, which rolls a checkpointed job back to its
last checkpoint (or fails a job without one). Restarts are bounded per run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from psctl.cluster.launch import Child, LocalCluster
from psctl.errors import PsctlError

MAX_SHARD_RESTARTS = 10  # per server run


class Supervisor:
    """Watches ``cluster``'s shard processes until ``stop`` is set; ``on_line`` gets a sentence per restart."""

    def __init__(
        self, cluster: LocalCluster, coordinator: str, on_line: Callable[[str], None], max_restarts: int = MAX_SHARD_RESTARTS
    ):
        self.cluster = cluster
        self.coordinator = coordinator
        self.on_line = on_line
        self.max_restarts = max_restarts
        self.restarts = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise :class:`PsctlError` after too many restarts."""
        exits: dict[asyncio.Future[int], Child] = {
            asyncio.ensure_future(c.proc.wait()): c for c in self.cluster.children if c.role == "shard"
        }
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait([stopped, *exits], return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    return
                for fut in [f for f in exits if f.done()]:
                    child = exits.pop(fut)
                    self.restarts += 1
                    if self.restarts > self.max_restarts:
                        raise PsctlError(f"shard processes exited {self.restarts} times; stopping the server")
                    self.on_line(f"shard process {child.index} exited ({fut.result()}); starting another")
                    (address,) = await self.cluster.start_shards(1, self.coordinator)
                    fresh = self.cluster.children[-1]
                    exits[asyncio.ensure_future(fresh.proc.wait())] = fresh
                    self.on_line(f"a new shard is at {address}")
        finally:
            for fut in [stopped, *exits]:
                fut.cancel()


async def stop_running_job(
    cluster: LocalCluster, again: asyncio.Event, on_line: Callable[[str], None], timeout_s: float
) -> None:
    """The server is stopping: the running job stops at one clock with a final checkpoint
    (where it has a checkpoint folder) before the processes go, waiting up to ``timeout_s``;
    ``again`` set (a second Ctrl-C) does not wait."""
    coordinator = cluster.coordinator
    if coordinator is None or coordinator.job is None:
        return
    on_line("stopping the running job first (Ctrl-C again to stop at once)")
    halting = asyncio.ensure_future(coordinator.stop_running_job("the psctl server is stopping"))
    second = asyncio.ensure_future(again.wait())
    await asyncio.wait([halting, second], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if halting.done() and halting.result():
        on_line(halting.result())
    elif not halting.done():
        halting.cancel()
        on_line("stopped without waiting for the job's final checkpoint")
