"""The embedded local cluster: a coordinator in this process, shards and workers as child processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from psctl import net
from psctl.cluster.child import READY
from psctl.cluster.options import security_args
from psctl.cluster.coordinator import CoordinatorService, start_coordinator
from psctl.errors import PsctlError
from psctl.protocol import handshake

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


async def start_process(
    args: list[str], log_path: Path, *, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> asyncio.subprocess.Process:
    """``python <args>`` as a child of this process, the way psctl starts every child: in a
    session of its own (Ctrl-C reaches this process only, which stops its children in order),
    stdin a pipe the child watches (it exits when the pipe closes, so it never outlives this
    process), stdout a pipe, stderr to ``log_path``, and no shared secret in its environment."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != handshake.SECRET_ENV}
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


def kill_process_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a child started by :func:`start_process` and its group, if it is still running."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Child:
    role: str
    index: int
    proc: asyncio.subprocess.Process
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
        self, *, host: str = "127.0.0.1", max_frame_bytes: int, log_dir: str | None = None, security: net.Security = net.LOCAL
    ):
        self.host = host
        self.max_frame_bytes = max_frame_bytes
        self.security = security
        log_dir = log_dir or os.environ.get("PSCTL_LOG_DIR")  # keep the children's logs there
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="psctl-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.coordinator: CoordinatorService | None = None
        self._server: net.Server | None = None

    async def __aenter__(self) -> LocalCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start_coordinator(self, port: int = 0) -> str:
        self._server, self.coordinator, address = await start_coordinator(
            self.host, port, max_frame_bytes=self.max_frame_bytes, security=self.security
        )
        # A shard the coordinator declared lost (stopped, hung) is killed: its exit makes the
        # driver or `psctl server` start another, as for a shard that died.
        self.coordinator.on_shard_declared_lost = self.kill_child
        return address

    def kill_child(self, pid: int) -> None:
        """SIGKILL the child process ``pid`` (and its group) if this cluster started it."""
        for child in self.children:
            if child.proc.pid == pid:
                kill_process_group(child.proc)

    async def _spawn(self, role: str, index: int, args: list[str]) -> Child:
        log_path = self.log_dir / f"{role}-{index}.log"
        args = [*args, *security_args(self.security)]
        if self._own_log_dir:  # a child whose parent died (kill -9) removes the folder it would have
            args += ["--parent-log-dir", str(self.log_dir)]
        env = {k: v for k, v in os.environ.items() if k != handshake.SECRET_ENV}
        secret_fd = None
        if self.security.secret is not None:
            # The secret goes down a pipe the child inherits: not argv, not the environment.
            secret_fd, write_fd = os.pipe()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(self.security.secret)  # far below a pipe's buffer: does not block
            args += ["--secret-fd", str(secret_fd)]
        try:
            proc = await start_process(
                ["-m", "psctl.cluster.child", role, *args, "--parent-watch", "--max-frame-bytes", str(self.max_frame_bytes)],
                log_path,
                env=env,
                pass_fds=() if secret_fd is None else (secret_fd,),
            )
        finally:
            if secret_fd is not None:
                os.close(secret_fd)
        child = Child(role, index, proc, log_path)
        self.children.append(child)
        return child

    async def _ready(self, child: Child) -> str:
        assert child.proc.stdout is not None
        try:
            line = await asyncio.wait_for(child.proc.stdout.readline(), CHILD_READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith(READY):
            tail = child.log_tail()
            raise PsctlError(f"{child.role} {child.index} did not start" + (f": {tail.splitlines()[-1]}" if tail else ""))
        return text.split(" ", 1)[1]

    async def start_shards(self, n: int, coordinator: str, port: int = 0) -> list[str]:
        """Start ``n`` shard processes and wait until each has registered."""
        children = []
        for i in range(n):
            args = ["--coordinator", coordinator, "--host", self.host, "--port", str(port + i if port else 0)]
            children.append(await self._spawn("shard", len([c for c in self.children if c.role == "shard"]), args))
        return list(await asyncio.gather(*(self._ready(c) for c in children)))

    async def start_workers(self, n: int, coordinator: str, model_class: str | None = None) -> list[Child]:
        """Start ``n`` worker processes; they join the coordinator's next job (allowed to load ``model_class``)."""
        first = len([c for c in self.children if c.role == "worker"])
        args = ["--server", coordinator] + (["--model-class", model_class] if model_class else [])
        return [await self._spawn("worker", first + i, args) for i in range(n)]

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
                kill_process_group(child.proc)
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
