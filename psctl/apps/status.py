"""``psctl status``: what a coordinator reports about its shards, workers and running job."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from psctl import net
from psctl.errors import PsctlError
from psctl.protocol.wire import MsgType

STATUS_TIMEOUT_S = 5.0


async def fetch(address: str, security: net.Security = net.LOCAL, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """The coordinator's STATUS body: ``shards`` (a list) and ``job`` (None when idle).

    Raises :class:`PsctlError` with one sentence when ``address`` is a shard or another psctl process."""
    peer = await net.connect(address, what="psctl server", security=security)
    try:
        body = (await peer.request(MsgType.STATUS, timeout_s=timeout_s)).body
    finally:
        peer.close()
    if not isinstance(body.get("shards"), list):
        what = f"a psctl shard (shard {body['shard_id']})" if "shard_id" in body else "a psctl process but not a coordinator"
        raise PsctlError(f"{address} is {what}; psctl status asks the coordinator (the address 'psctl server' printed)")
    return body


async def watch(
    address: str,
    on_status: Callable[[dict[str, Any]], None],
    stop: asyncio.Event,
    interval_s: float = 1.0,
    security: net.Security = net.LOCAL,
) -> int:
    """Fetch the status every ``interval_s`` and hand it to ``on_status`` until ``stop`` is set.

    Returns how many refreshes were shown; a fetch that fails ends the watch with its error."""
    if not interval_s > 0:
        raise PsctlError("--interval-s must be positive")
    shown = 0
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stopped.done():
            fetching = asyncio.ensure_future(fetch(address, security))
            await asyncio.wait([fetching, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not fetching.done():  # Ctrl-C during a fetch: do not wait for it
                fetching.cancel()
                await asyncio.wait([fetching])
                break
            on_status(fetching.result())
            shown += 1
            await asyncio.wait([stopped], timeout=interval_s)
    finally:
        stopped.cancel()
    return shown
