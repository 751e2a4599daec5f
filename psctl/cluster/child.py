"""Entry point of the processes psctl starts: ``python -m psctl.cluster.child shard|worker``.

Kept free of the CLI's imports (typer, rich) so a cluster starts quickly.
A child started with ``--parent-watch`` exits when its stdin closes, so it
never outlives the process that started it. The shared secret reaches a child
through an inherited pipe (``--secret-fd``), never its command line or environment.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from psctl import net
from psctl.cluster.options import SECURITY_OPTIONS, build_security
from psctl.errors import PsctlError
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES

READY = "PSCTL_READY"


class _StdinWatch(asyncio.Protocol):
    def __init__(self, stop: asyncio.Event, on_closed: Callable[[], None]):
        self.stop = stop
        self.on_closed = on_closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_closed()
        self.stop.set()


async def _until_stopped(
    work: Coroutine[Any, Any, Any], parent_watch: bool, on_parent_gone: Callable[[], None] = lambda: None
) -> Any:
    """Run ``work`` until it ends, SIGTERM/SIGINT arrives, or (with parent_watch) stdin closes
    (then ``on_parent_gone`` runs when this returns)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closed: list[bool] = []
    if parent_watch:
        await loop.connect_read_pipe(lambda: _StdinWatch(stop, lambda: closed.append(True)), sys.stdin)
    try:
        return await _run_until(work, stop)
    finally:
        if closed:
            on_parent_gone()


async def _run_until(work: Coroutine[Any, Any, Any], stop: asyncio.Event) -> Any:
    """``work``'s result, or None once ``stop`` is set first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return None
    return task.result()


def announce(address: str) -> None:
    print(f"{READY} {address}", flush=True)


async def shard_main(args: argparse.Namespace, security: net.Security) -> None:
    from psctl.cluster.shard import run_shard

    await run_shard(
        args.coordinator,
        args.host,
        args.port,
        advertise_host=args.advertise_host,
        max_frame_bytes=args.max_frame_bytes,
        on_ready=announce,
        security=security,
    )


async def worker_main(args: argparse.Namespace, security: net.Security) -> None:
    from psctl.cluster.worker import Worker, return_freed_memory

    return_freed_memory()
    announce(args.server)
    await Worker(args.server, max_frame_bytes=args.max_frame_bytes, data_path=args.data, model_classes=args.model_class, security=security,
                 partition=args.partition).run()


def _remove_log_dir(folder: str | None) -> None:
    """The parent closed our stdin: it stopped us, or died (kill -9) and cannot remove its
    children's log folder itself. Every child tries; the first one removes it (the others'
    logs are open files: they keep writing to them until they exit)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def security_from_args(args: argparse.Namespace) -> net.Security:
    secret = net.read_secret_fd(args.secret_fd) if args.secret_fd is not None else None
    return build_security(secret=secret, **{o.name: getattr(args, o.name) for o in SECURITY_OPTIONS})


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The children's command line, built once a process: the fork server builds it before it
    forks (argparse's set-up was a fifth of a forked worker's start-up CPU)."""
    p = argparse.ArgumentParser(prog="python -m psctl.cluster.child")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("shard")
    s.add_argument("--coordinator", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--advertise-host", default=None)
    w = sub.add_parser("worker")
    w.add_argument("--server", required=True)
    w.add_argument("--data", default=None)
    w.add_argument("--model-class", action="append", default=[])
    w.add_argument("--partition", type=int, default=None, help="--data holds this partition's rows only (psctl.spark)")
    for sp in (s, w):
        sp.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
        sp.add_argument("--parent-watch", action="store_true")
        sp.add_argument("--parent-log-dir", default=None, help="the parent's log folder: removed when stdin closes")
        # Default: PSCTL_LOG, the CLI's level and its children's (their log files are kept with PSCTL_LOG_DIR).
        sp.add_argument("--log-level", default=None)
        sp.add_argument("--secret-fd", type=int, default=None, help="read the shared secret from this inherited pipe")
        for option in SECURITY_OPTIONS:
            if option.kind is bool:
                sp.add_argument(option.flag, action="store_true", help=option.help)
            else:
                sp.add_argument(option.flag, type=option.kind, default=option.default, help=option.help)
    return p


def main(argv: list[str] | None = None, security: net.Security | None = None) -> int:
    """Run a shard or worker; ``security`` (from the CLI, in-process) replaces the security flags."""
    args = parser().parse_args(argv)
    level = args.log_level or os.environ.get("PSCTL_LOG", "WARNING").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {args.role} %(name)s %(levelname)s %(message)s")
    role_main = shard_main if args.role == "shard" else worker_main
    try:
        if security is None:
            security = security_from_args(args)
        net.run(lambda: _until_stopped(role_main(args, security), args.parent_watch, lambda: _remove_log_dir(args.parent_log_dir)))
    except PsctlError as exc:
        print(f"psctl {args.role}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
