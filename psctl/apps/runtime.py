"""What a front end needs to run psctl's entry points: the event loop, stop signals,
the table of security options and the defaults it shows. The CLI reaches these here,
never in the layers below."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from psctl import net
from psctl.cluster.options import SECURITY_OPTIONS, Option, build_security
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES

Security = net.Security
LOCAL = net.LOCAL

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "LOCAL", "SECURITY_OPTIONS", "Option", "Security", "build_security", "on_signal", "run"]


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` on a fresh event loop (uvloop where installed) and return its result."""
    return net.run(main)


def on_signal(handler: Callable[[], None] | None = None) -> asyncio.Event:
    """An event SIGINT or SIGTERM sets (each signal also calls ``handler``). The handlers are in
    place when this returns, so call it before announcing an address: a signal right after must
    not interrupt."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def signalled() -> None:
        stop.set()
        if handler is not None:
            handler()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled)
    return stop
