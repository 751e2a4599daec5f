"""The long-running roles behind ``psctl server``, ``coordinator``, ``shard`` and ``worker``.

Each takes a callback for the sentences an operator should see (the address
first) and returns when SIGINT or SIGTERM arrives, or when its work ends.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from typing import Any

from psctl import net
from psctl.apps.runtime import on_signal
from psctl.apps.train import HALT_TIMEOUT_S
from psctl.cluster import child
from psctl.cluster.coordinator import start_coordinator
from psctl.cluster.launch import LocalCluster
from psctl.cluster.supervisor import Supervisor, stop_running_job
from psctl.cluster.worker import Worker, return_freed_memory
from psctl.errors import UsageError


async def serve(
    shards: int,
    on_line: Callable[[str], None],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    coordinator: str | None = None,
    max_frame_bytes: int,
    security: net.Security = net.LOCAL,
    failure_timeout_s: float | None = None,
) -> None:
    """A coordinator (unless ``coordinator`` names one to join) and ``shards`` shard processes,
    restarted when they exit, until a signal; a running job is stopped at one clock first.
    ``failure_timeout_s``: how long a shard may be silent between jobs before it is declared
    lost and restarted (a job uses its own)."""
    if shards < 1:
        raise UsageError("--shards must be at least 1")
    check_port(port)
    check_failure_timeout(failure_timeout_s)
    if coordinator and failure_timeout_s is not None:
        raise UsageError("--failure-timeout-s is the coordinator's; with --coordinator give it to that coordinator")
    if coordinator and port:
        raise UsageError("--port is the coordinator's port; with --coordinator the shards take free ports")
    async with LocalCluster(host=host, max_frame_bytes=max_frame_bytes, security=security) as cluster:
        address = coordinator or await cluster.start_coordinator(port, failure_timeout_s)
        shard_addresses = await cluster.start_shards(shards, address)
        signalled = on_signal()
        if coordinator:
            on_line(f"psctl: {shards} shards joined the coordinator at {address}: {', '.join(shard_addresses)}")
        else:
            on_line(f"psctl server listening on {address} (coordinator, {shards} shards)")
        await Supervisor(cluster, address, lambda line: on_line(f"psctl: {line}")).run(signalled)
        signalled.clear()
        await stop_running_job(cluster, signalled, lambda line: on_line(f"psctl: {line}"), HALT_TIMEOUT_S)
    on_line("psctl server stopped")


def check_port(port: int) -> None:
    """A port a role listens on: 0 (any free one) or 1-65535; the OS would take 70000 as 4464."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535 (0: any free port); got {port}")


def check_failure_timeout(failure_timeout_s: float | None) -> None:
    if failure_timeout_s is not None and not (math.isfinite(failure_timeout_s) and failure_timeout_s > 0):
        raise UsageError(f"--failure-timeout-s must be a positive number of seconds; got {failure_timeout_s}")


async def run_coordinator(
    on_line: Callable[[str], None], *, host: str = "127.0.0.1", port: int = 0, max_frame_bytes: int,
    security: net.Security = net.LOCAL, failure_timeout_s: float | None = None,
) -> None:
    """The coordinator alone, until a signal."""
    check_port(port)
    check_failure_timeout(failure_timeout_s)
    srv, _, address = await start_coordinator(host, port, max_frame_bytes=max_frame_bytes, security=security,
                                              idle_failure_timeout_s=failure_timeout_s)  # fmt: skip
    signalled = on_signal()
    on_line(f"psctl coordinator listening on {address}")
    try:
        await signalled.wait()
    finally:
        await srv.close()


def run_shard(
    coordinator: str, *, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None, max_frame_bytes: int,
    security: net.Security = net.LOCAL,
) -> int:
    """One shard joining ``coordinator`` in this process, until a signal; returns the exit code."""
    check_port(port)
    args = ["shard", "--coordinator", coordinator, "--host", host, "--port", str(port)]
    if advertise_host:
        args += ["--advertise-host", advertise_host]
    return child.main([*args, "--max-frame-bytes", str(max_frame_bytes)], security=security)


async def run_worker(
    server: str, *, data: str | None = None, model_classes: list[str] | None = None, max_frame_bytes: int,
    security: net.Security = net.LOCAL,
) -> dict[str, Any]:
    """One worker joining the next job of ``server``; returns its final report (``n``, ``loss_sum``)."""
    return_freed_memory()  # this process is the worker
    worker = Worker(server, max_frame_bytes=max_frame_bytes, data_path=data, model_classes=model_classes or [], security=security)
    return await worker.run()
