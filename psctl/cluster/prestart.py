"""Starting a fork server process (psctl/cluster/forkserver.py), and starting the embedded
cluster's one before the command that needs it has imported itself.

``psctl train`` spends about 0.3 s of a core importing typer, rich, numpy and the driver
before it starts its cluster, and the fork server about as long importing numpy, asyncio,
the shard and the worker; one after the other, they were most of the time to the first
step. :func:`start_early`, called first thing, starts the fork server so that it imports on
the other core while the command imports; the cluster then takes it over
(:func:`take_early`) if it was started with the environment the cluster gives its
children, and starts one of its own otherwise. One not taken over has no children: it is
killed when this process exits.

This module imports only the standard library's cheap modules: it runs before the rest.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

# PSCTL_FORKSERVER=0 execs every child as `python -m psctl.cluster.child` instead of forking
# it from the cluster's fork server.
FORKSERVER_ENV = "PSCTL_FORKSERVER"
SECRET_ENV = "PSCTL_SECRET"  # psctl.protocol.handshake's (not imported here: it brings numpy)
LOG_DIR_ENV = "PSCTL_LOG_DIR"  # where a cluster keeps its processes' logs (cluster/launch.py)
# The forked children's command lines are written over the server's own argument area,
# so the server is started with this much room (an argument of spaces, removed from its
# own title at once). A longer command line is cut; it only names the process.
TITLE_ROOM = 4096


def available() -> bool:
    """Whether this platform has what the fork server needs (Linux: ``SOCK_SEQPACKET``, pidfds)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SOCK_SEQPACKET") and hasattr(os, "pidfd_open")


def enabled() -> bool:
    """Whether a cluster forks its children from a fork server (not ``PSCTL_FORKSERVER=0``)."""
    return available() and os.environ.get(FORKSERVER_ENV) != "0"


# Each shard and worker computes with one BLAS/OpenMP thread unless the environment says
# otherwise, as dask's nanny and torchrun set for their worker processes: eight workers on two
# cores, each with an OpenBLAS pool as large as the machine, spent 15-30% more CPU (the pools'
# threads spin between calls), and one worker alone was no faster with more (BENCHMARKS.md 13).
# Read when numpy loads, so set before the fork server or an exec'd child imports it.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def child_env() -> dict[str, str]:
    """The environment of psctl's child processes: this one's, without the shared secret, and
    one BLAS thread each where this one does not set their number (ONE_THREAD)."""
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    return {**ONE_THREAD, **env}


class Launched:
    """A fork server process as started: the process, the parent's end of its control
    socket (a ``SOCK_SEQPACKET`` pair only the two hold) and the environment it got."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, env: dict[str, str]):
        self.proc = proc
        self.sock = sock
        self.env = env

    def kill(self) -> None:
        """Kill the server (one that has forked no child yet) and reap it."""
        self.sock.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def launch(env: dict[str, str], log_path: Path | None) -> Launched:
    """Start ``python -m psctl.cluster.forkserver`` the way psctl starts every child
    (psctl/cluster/processes.py): in a session of its own, stdin a pipe it watches (it exits
    when that closes), stderr to ``log_path`` (None: nowhere), ``env`` without the secret."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log = None
    try:
        log = open(log_path, "wb") if log_path is not None else None
        proc = subprocess.Popen(
            [sys.executable, "-m", "psctl.cluster.forkserver", str(theirs.fileno()), " " * TITLE_ROOM],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if log is None else log, env=env,
            pass_fds=(theirs.fileno(),), start_new_session=True,
        )  # fmt: skip
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
        if log is not None:
            log.close()
    return Launched(proc, mine, env)


_early: Launched | None = None


def start_early() -> Launched | None:
    """Start the fork server of the embedded cluster this process is about to start, unless
    one is started already or the cluster will not fork (:func:`enabled`); return it. Its
    log is ``PSCTL_LOG_DIR/forkserver.log`` where that is set, as the cluster's own would
    be; else nowhere (a cluster's own log folder is removed when it stops, unread)."""
    global _early
    if _early is not None or not enabled():
        return _early
    log_dir = os.environ.get(LOG_DIR_ENV)
    try:
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        _early = launch(child_env(), Path(log_dir) / "forkserver.log" if log_dir else None)
    except OSError:
        return None  # the cluster starts its own, and says so if it cannot
    atexit.register(_stop_early)
    return _early


def take_early(env: dict[str, str]) -> Launched | None:
    """The fork server :func:`start_early` started, if it was started with ``env`` and is
    still running; the caller owns it from now on. None otherwise (one that cannot be used
    is stopped)."""
    global _early
    early, _early = _early, None
    if early is None:
        return None
    if early.env != env or early.proc.poll() is not None:
        early.kill()
        return None
    return early


def _stop_early() -> None:
    global _early
    early, _early = _early, None
    if early is not None:
        early.kill()
