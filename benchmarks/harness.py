"""A real psctl cluster driven from the benchmark process.

The coordinator runs in this process (LocalCluster), the shards are child
processes, and this process submits a one-table job as a driver and then plays
its one worker through :class:`psctl.cluster.client.ShardClient`, as the integration
tests do with ``bare_spec``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psctl.cluster.client import ShardClient
from psctl.cluster.launch import LocalCluster
from psctl.cluster.session import Session
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES, MsgType

JOB_END_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 60.0


def bench_spec(rows: int, mode: str = "async", n_workers: int = 1, lr: float = 1e-6) -> dict[str, Any]:
    """A job with one float32 table ``w`` of ``rows`` values and no data."""
    return {
        "model": "bench",
        "n_workers": n_workers,
        "tables": [{"name": "w", "rows": rows}],
        "mode": mode,
        "staleness": 0,
        "optimizer": {"name": "sgd", "params": {"lr": lr}},
        "partitions": [{} for _ in range(n_workers)],
    }


class BenchCluster:
    """A coordinator here plus ``n_shards`` shard processes. Use ``async with``."""

    def __init__(self, n_shards: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.n_shards = n_shards
        self.max_frame_bytes = max_frame_bytes
        self.cluster = LocalCluster(max_frame_bytes=max_frame_bytes)
        self.address = ""
        self.shards: list[str] = []

    async def __aenter__(self) -> BenchCluster:
        try:
            self.address = await self.cluster.start_coordinator()
            self.shards = await self.cluster.start_shards(self.n_shards, self.address)
        except BaseException:
            await self.cluster.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cluster.stop()

    @asynccontextmanager
    async def job(self, spec: dict[str, Any]) -> AsyncIterator[ShardClient]:
        """Submit ``spec`` (one worker), register as its worker; yield the worker's client."""
        async with self.workers(spec) as clients:
            yield clients[0]

    @asynccontextmanager
    async def workers(self, spec: dict[str, Any]) -> AsyncIterator[list[ShardClient]]:
        """Submit ``spec``, register as each of its ``n_workers`` workers; yield their clients."""
        # Sessions, as every party uses: the worker heartbeats from its own thread, so a
        # benchmark that keeps this loop busy longer than the failure timeout is not declared lost.
        driver = await Session.open(self.address, max_frame_bytes=self.max_frame_bytes, keep_events=False)
        controls: list[Session] = []
        clients: list[ShardClient] = []
        try:
            submitted = await driver.submit(spec, timeout_s=SETUP_TIMEOUT_S)
            placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=SETUP_TIMEOUT_S)).body
            for _ in range(spec["n_workers"]):
                controls.append(await Session.open(self.address, max_frame_bytes=self.max_frame_bytes))
                reg = await controls[-1].register_worker({"pid": 0, "host": "benchmark"}, timeout_s=SETUP_TIMEOUT_S)
                clients.append(
                    await ShardClient.connect(
                        placed["shards"],
                        placed["ranges"],
                        reg["job_id"],
                        {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
                        max_frame_bytes=self.max_frame_bytes,
                    )
                )
            yield clients
            driver.notify(MsgType.JOB_END, {"job_id": submitted["job_id"]})
        finally:
            for client in clients:
                client.close()
            for control in controls:
                control.close()
            driver.close()
            await self._job_gone()

    async def _job_gone(self) -> None:
        coordinator = self.cluster.coordinator
        deadline = time.monotonic() + JOB_END_TIMEOUT_S
        while coordinator is not None and coordinator.job is not None:
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark job did not end")
            await asyncio.sleep(0.005)  # the coordinator runs on this loop: let it see the close
