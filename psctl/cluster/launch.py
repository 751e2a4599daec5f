"""The embedded local cluster: a coordinator in this process, shards and workers as child
processes, or (``in_process``) as tasks of this process's event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psctl import net
from psctl.cluster import prestart
from psctl.cluster.child import READY
from psctl.cluster.forkserver import ForkedProcess, ForkServer
from psctl.cluster.processes import kill_process_group, start_process
from psctl.cluster.options import security_args
from psctl.cluster.coordinator import CoordinatorService, start_coordinator
from psctl.errors import PsctlError

CHILD_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 3.0
EMBEDDED_SECRET_BYTES = 32


def embedded_security(security: net.Security) -> net.Security:
    """The security of a cluster whose every process this one starts (``psctl train`` without
    ``--server``): ``security`` with a fresh random secret when it has none, so no other local
    user can join, read or change it. The children get it through a pipe, like a given one.
    An explicit secret is kept; ``insecure`` keeps the old cluster without a secret."""
    if security.secret is not None or security.insecure:
        return security
    return dataclasses.replace(security, secret=secrets.token_hex(EMBEDDED_SECRET_BYTES).encode())


class _Stdin:
    def __init__(self, stop: asyncio.Event):
        self._stop = stop

    def close(self) -> None:
        self._stop.set()


class TaskProcess:
    """A shard or worker run as a task of this event loop, standing in for a child process
    (``wait()``, ``returncode``, ``stdin.close()`` to stop it). Its pid is negative, never a
    real process's, so nothing signals a process for it; an error ends it with code 1 and its
    sentence goes to the log file, as a child's would."""

    def __init__(self, index: int, work: Callable[[asyncio.Event], Awaitable[Any]], log_path: Path):
        self.pid = -1 - index
        self.returncode: int | None = None
        self._stop = asyncio.Event()
        self.stdin = _Stdin(self._stop)
        self._log_path = log_path
        self._task = asyncio.ensure_future(self._run(work))

    async def _run(self, work: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
        from psctl.cluster.child import _run_until

        try:
            await _run_until(work(self._stop), self._stop)
            self.returncode = 0
        except asyncio.CancelledError:
            self.returncode = -signal.SIGKILL
            raise
        except Exception as exc:  # a child process would print it and exit 1
            self._log_path.write_text(f"psctl: error: {exc}\n")
            self.returncode = 1

    async def wait(self) -> int:
        await asyncio.wait({self._task})
        return self.returncode if self.returncode is not None else -signal.SIGKILL

    def kill(self) -> None:
        self._task.cancel()


@dataclass
class Child:
    role: str
    index: int
    proc: asyncio.subprocess.Process | ForkedProcess | TaskProcess
    log_path: Path

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class LocalCluster:
    """Starts and stops psctl processes on this host. Use ``async with``."""

    def __init__(
        self, *, host: str = "127.0.0.1", max_frame_bytes: int, log_dir: str | None = None, security: net.Security = net.LOCAL,
        in_process: bool = False,
    ):
        self.host = host
        # Shards and workers as tasks of this event loop instead of processes: the same
        # services on loopback TCP, without a process start-up (about a second on two cores)
        # per shard and worker. For small data, where starting processes is most of a job.
        self.in_process = in_process
        self.max_frame_bytes = max_frame_bytes
        self.security = security
        log_dir = log_dir or os.environ.get(prestart.LOG_DIR_ENV)  # keep the children's logs there
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="psctl-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.coordinator: CoordinatorService | None = None
        self._server: net.Server | None = None
        self._forkserver: asyncio.Task[ForkServer | None] | None = None

    async def __aenter__(self) -> LocalCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start_coordinator(self, port: int = 0, idle_failure_timeout_s: float | None = None) -> str:
        self._server, self.coordinator, address = await start_coordinator(
            self.host, port, max_frame_bytes=self.max_frame_bytes, security=self.security,
            idle_failure_timeout_s=idle_failure_timeout_s,
        )  # fmt: skip
        # A shard the coordinator declared lost (stopped, hung) is killed: its exit makes the
        # driver or `psctl server` start another, as for a shard that died.
        self.coordinator.on_shard_declared_lost = self.kill_child
        self._start_forkserver()  # imports while the coordinator waits for its first party
        return address

    def _child_env(self) -> dict[str, str]:
        return prestart.child_env()

    def _start_forkserver(self) -> None:
        if self._forkserver is None and not self.in_process and prestart.enabled():
            self._forkserver = asyncio.ensure_future(self._new_forkserver())

    async def _new_forkserver(self) -> ForkServer | None:
        env = self._child_env()
        try:
            # `psctl train` started one before it imported itself (cluster/prestart.py)
            launched = prestart.take_early(env) or prestart.launch(env, self.log_dir / "forkserver.log")
        except OSError as exc:  # the children are exec'd instead
            logging.getLogger(__name__).warning("no fork server (%s): starting each process on its own", exc)
            return None
        try:
            return ForkServer(launched)
        except OSError as exc:  # no pidfd to follow it by
            launched.kill()
            logging.getLogger(__name__).warning("no fork server (%s): starting each process on its own", exc)
            return None

    async def _forked(self) -> ForkServer | None:
        """The cluster's fork server, started again if it died; None to exec children instead."""
        self._start_forkserver()
        if self._forkserver is None:
            return None
        server = await self._forkserver
        if server is not None and not server.alive:
            self._forkserver = None
            self._start_forkserver()
            server = await self._forkserver if self._forkserver is not None else None
        return server

    def kill_child(self, pid: int) -> None:
        """SIGKILL the child process ``pid`` (and its group) if this cluster started it."""
        for child in self.children:
            if child.proc.pid == pid and child.proc.returncode is None:
                _kill(child)

    def _start_task(self, role: str, index: int, work: Callable[[asyncio.Event], Awaitable[Any]]) -> Child:
        log_path = self.log_dir / f"{role}-{index}.log"
        n_tasks = sum(isinstance(c.proc, TaskProcess) for c in self.children)
        child = Child(role, index, TaskProcess(n_tasks, work, log_path), log_path)
        self.children.append(child)
        return child

    async def _spawn(self, role: str, index: int, args: list[str]) -> Child:
        log_path = self.log_dir / f"{role}-{index}.log"
        args = [*args, *security_args(self.security)]
        if self._own_log_dir:  # a child whose parent died (kill -9) removes the folder it would have
            args += ["--parent-log-dir", str(self.log_dir)]
        args = [role, *args, "--parent-watch", "--max-frame-bytes", str(self.max_frame_bytes)]
        secret_fd = None
        if self.security.secret is not None:
            # The secret goes down a pipe the child inherits: not argv, not the environment.
            secret_fd, write_fd = os.pipe()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(self.security.secret)  # far below a pipe's buffer: does not block
        pass_fds = () if secret_fd is None else (secret_fd,)
        proc: asyncio.subprocess.Process | ForkedProcess
        try:
            server = await self._forked()
            if server is not None:
                proc = await server.spawn(args, log_path, pass_fds=pass_fds, fd_flags=("--secret-fd",)[: len(pass_fds)],
                                          timeout_s=CHILD_READY_TIMEOUT_S)  # fmt: skip
            else:
                secret_args = [] if secret_fd is None else ["--secret-fd", str(secret_fd)]
                proc = await start_process(["-m", "psctl.cluster.child", *args, *secret_args], log_path,
                                           env=self._child_env(), pass_fds=pass_fds)  # fmt: skip
        finally:
            if secret_fd is not None:
                os.close(secret_fd)
        child = Child(role, index, proc, log_path)
        self.children.append(child)
        return child

    async def _ready(self, child: Child) -> str:
        assert child.proc.stdout is not None
        try:
            async with asyncio.timeout(CHILD_READY_TIMEOUT_S):
                line = await child.proc.stdout.readline()
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith(READY):
            tail = child.log_tail()
            raise PsctlError(f"{child.role} {child.index} did not start" + (f": {tail.splitlines()[-1]}" if tail else ""))
        return text.split(" ", 1)[1]

    async def start_shards(self, n: int, coordinator: str, port: int = 0) -> list[str]:
        """Start ``n`` shard processes and wait until each has registered."""
        if self.in_process:
            return await self._start_shard_tasks(n, coordinator, port)
        children = []
        for i in range(n):
            args = ["--coordinator", coordinator, "--host", self.host, "--port", str(port + i if port else 0)]
            children.append(await self._spawn("shard", len([c for c in self.children if c.role == "shard"]), args))
        return list(await asyncio.gather(*(self._ready(c) for c in children)))

    async def start_workers(
        self, n: int, coordinator: str, model_class: str | None = None, *, data_path: str | None = None, partition: int | None = None
    ) -> list[Child]:
        """Start ``n`` worker processes; they join the coordinator's next job (allowed to load ``model_class``).
        ``data_path`` and ``partition``: each reads its rows there, and holds that partition's only."""
        first = len([c for c in self.children if c.role == "worker"])
        if self.in_process:
            from psctl.cluster.worker import Worker

            def worker(stop: asyncio.Event) -> Awaitable[Any]:
                return Worker(coordinator, max_frame_bytes=self.max_frame_bytes, security=self.security,
                              model_classes=[model_class] if model_class else [], data_path=data_path, partition=partition).run()

            return [self._start_task("worker", first + i, worker) for i in range(n)]
        args = ["--server", coordinator] + (["--model-class", model_class] if model_class else [])
        args += (["--data", data_path] if data_path else []) + (["--partition", str(partition)] if partition is not None else [])
        return [await self._spawn("worker", first + i, args) for i in range(n)]

    async def _start_shard_tasks(self, n: int, coordinator: str, port: int) -> list[str]:
        from psctl.cluster.shard import run_shard

        first = len([c for c in self.children if c.role == "shard"])
        addresses: list[asyncio.Future[str]] = [asyncio.get_running_loop().create_future() for _ in range(n)]
        children = []
        for i in range(n):

            def shard(stop: asyncio.Event, ready: asyncio.Future[str] = addresses[i], i: int = i) -> Awaitable[Any]:
                return run_shard(coordinator, self.host, port + i if port else 0, max_frame_bytes=self.max_frame_bytes,
                                 stop=stop, on_ready=ready.set_result, security=self.security)

            children.append(self._start_task("shard", first + i, shard))
        for child, address in zip(children, addresses):
            await asyncio.wait({address, asyncio.ensure_future(child.proc.wait())},
                                         timeout=CHILD_READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not address.done():
                tail = child.log_tail()
                raise PsctlError(f"shard {child.index} did not start" + (f": {tail.splitlines()[-1]}" if tail else ""))
        return [a.result() for a in addresses]

    def workers(self) -> list[Child]:
        return [c for c in self.children if c.role == "worker"]

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask every child to stop (stdin closes), wait with a bound, then kill; close the coordinator."""
        for child in self.children:
            if child.proc.returncode is None and child.proc.stdin is not None:
                child.proc.stdin.close()
        waits = [c.proc.wait() for c in self.children if c.proc.returncode is None]
        if waits:
            done, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=timeout_s)
            for child in self.children:
                if child.proc.returncode is None:
                    _kill(child)
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)
        for child in self.children:
            if isinstance(child.proc, ForkedProcess):
                child.proc.close()
        await self._stop_forkserver(timeout_s)
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


    async def _stop_forkserver(self, timeout_s: float) -> None:
        task, self._forkserver = self._forkserver, None
        if task is None:
            return
        server = await task  # bounded: it starts the process, it does not wait for its imports
        if server is not None:
            await server.close(timeout_s)


def _kill(child: Child) -> None:
    """SIGKILL a child process and its group; cancel a task standing in for one."""
    if isinstance(child.proc, TaskProcess):
        child.proc.kill()
    else:
        kill_process_group(child.proc)
