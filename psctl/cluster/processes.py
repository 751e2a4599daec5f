"""Starting and killing psctl's child processes: how every one of them is started."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from psctl.cluster.prestart import child_env


class Running(Protocol):
    """A child process as psctl holds it: exec'd (``asyncio.subprocess.Process``) or forked."""

    pid: int
    returncode: int | None


async def start_process(
    args: list[str], log_path: Path, *, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> asyncio.subprocess.Process:
    """``python <args>`` as a child of this process, the way psctl starts every child: in a
    session of its own (Ctrl-C reaches this process only, which stops its children in order),
    stdin a pipe the child watches (it exits when the pipe closes, so it never outlives this
    process), stdout a pipe, stderr to ``log_path``, and no shared secret in its environment."""
    if env is None:
        env = child_env()
    with open(log_path, "wb") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
        )


def kill_process_group(proc: Running) -> None:
    """SIGKILL a child started by :func:`start_process` or the fork server, and its group, if
    it is still running (a forked child that has not yet made its group is killed alone)."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
