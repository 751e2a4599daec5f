"""Helpers that start real psctl processes for tests and wait on conditions with deadlines."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from psctl import net
from psctl.wire import MsgType


class ServerProcess:
    """`psctl server --shards N` as a real process; its address is read from its first line."""

    def __init__(self, shards: int, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "psctl", "server", "--shards", str(shards), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the test's timeout
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.address = line.split("listening on ", 1)[1].split()[0]

    def stop(self, timeout_s: float = 10) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10, what: str = "condition") -> None:
    """Poll an async predicate until it holds; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def status(address: str) -> dict[str, Any]:
    peer = await net.connect(address)
    try:
        return (await peer.request(MsgType.STATUS, timeout_s=5)).body
    finally:
        peer.close()


def bare_spec(n_workers: int, mode: str, staleness: int = 0, rows: int = 8, lr: float = 0.1) -> dict[str, Any]:
    """A job with one table and no data: test code plays the workers."""
    return {
        "model": "test",
        "n_workers": n_workers,
        "tables": [{"name": "w", "rows": rows}],
        "mode": mode,
        "staleness": staleness,
        "optimizer": {"name": "sgd", "params": {"lr": lr}},
        "partitions": [{} for _ in range(n_workers)],
    }
