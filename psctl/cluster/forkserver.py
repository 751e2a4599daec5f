"""A fork server for the embedded cluster's shards and workers.

Every child of ``psctl train`` used to be ``python -m psctl.cluster.child``: a new
interpreter that imports numpy, asyncio and psctl again, about 0.3 CPU-seconds each,
which on two cores was most of the start-up of a small job (and of the test suite).
Instead, the cluster starts one process, this module, that imports all of that once and
then forks a child per request, as ``multiprocessing``'s forkserver does: the forked
child runs ``psctl.cluster.child.main`` with the same arguments, the same stdin pipe
(it exits when that closes), stdout pipe (its ready line), stderr (its log file) and
inherited secret pipe as an exec'd child would get, in a session of its own.

The server forks from a clean state: one thread of Python, no event loop yet, no
connection open. It holds no job state and never reads from the network: requests come
over a Unix socket pair only the parent holds, as JSON with the file descriptors
attached (SCM_RIGHTS), never pickles. It reaps its children and tells the parent each
one's exit code. It exits when the parent closes the socket or its stdin (the parent
died). A child's ``/proc/PID/cmdline`` is rewritten to the command line it would have had
(``ps``, and the tests, find shards and workers by it).

Linux only (``SOCK_SEQPACKET``, pidfds); elsewhere :func:`available` is false and the
cluster execs each child as before.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import selectors
import signal
import socket
import sys
import traceback
from pathlib import Path

from psctl.cluster import prestart
from psctl.cluster.prestart import available as available  # where launch.py and the tests ask

MAX_REQUEST_BYTES = 1 << 16
MAX_FDS = 8
UNKNOWN_EXIT_CODE = 1  # of a child that ended after its fork server
PRELOAD = (
    "psctl.cluster.child", "psctl.cluster.shard", "psctl.cluster.worker", "uvloop", "numpy.random", "numpy.ma",
    "concurrent.futures.thread", "encodings.idna", "ctypes",
)  # fmt: skip


def set_cmdline(argv: list[str]) -> None:
    """Make ``/proc/self/cmdline`` read ``argv``, NUL-separated as the kernel shows an exec'd
    command line, within the argument area this process was started with (what
    setproctitle does; the kernel gives its start and end in /proc/self/stat, fields 48-49).
    The last byte stays NUL, so the kernel shows the area as it is. Nothing reads that memory
    after start-up: Python keeps copies of its arguments. Does nothing where /proc lacks them."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # fields[0] is field 3, the state
    except (OSError, ValueError, IndexError):
        return
    room = end - start
    if room <= 1:
        return
    data = b"\0".join(os.fsencode(a) for a in argv)[: room - 1]
    ctypes.memmove(start, data + b"\0" * (room - len(data)), room)


# --- the server ---


def serve(control: socket.socket) -> None:
    """Answer fork requests on ``control`` until the parent closes it or stdin."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector (set_wakeup_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this by closing the socket
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is control:
                try:
                    msg, fds, _, _ = socket.recv_fds(control, MAX_REQUEST_BYTES, MAX_FDS)
                except ConnectionError:
                    return
                if not msg:
                    return
                try:
                    reply = {"pid": _fork(json.loads(msg), fds)}
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                control.send(json.dumps(reply).encode())
            elif key.fileobj == wake_r:
                while _drain(wake_r):
                    pass
            elif not os.read(sys.stdin.fileno(), 4096):
                return  # the parent is gone
        _reap(control)


def _close_fds_but(keep: set[int]) -> None:
    """Close every file descriptor above stderr except ``keep`` (what this process inherited
    and does not need: the event loop's spawn leaves some open, and a forked child would
    otherwise hold the server's)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _fork(request: dict, fds: list[int]) -> int:
    argv = [str(a) for a in request["argv"]]
    flags = [str(f) for f in request.get("fd_flags", [])]
    if len(fds) != 3 + len(flags):
        raise ValueError(f"expected {3 + len(flags)} file descriptors, got {len(fds)}")
    pid = os.fork()
    if pid == 0:
        _child(argv, flags, fds)  # never returns
    return pid


def _child(argv: list[str], flags: list[str], fds: list[int]) -> None:
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds[:3]):
            os.dup2(fd, target)
        extra = fds[3:]
        _close_fds_but(set(extra))
        for fd in extra:
            os.set_inheritable(fd, True)
        argv = [*argv, *(a for flag, fd in zip(flags, extra) for a in (flag, str(fd)))]
        set_cmdline([sys.executable, "-m", "psctl.cluster.child", *argv])
        sys.argv = ["psctl.cluster.child", *argv]
        from psctl.cluster import child

        code = child.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# --- the parent's side ---


class _PipeEnd:
    """The write end of a child's stdin: closing it tells the child to stop."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ForkedProcess:
    """A child forked by the server, with what the cluster uses of an
    ``asyncio.subprocess.Process``: ``pid``, ``returncode``, ``stdin.close()``,
    ``stdout.readline()``, ``wait()``."""

    def __init__(self, pid: int, stdin: _PipeEnd, stdout: asyncio.StreamReader, stdout_transport: asyncio.BaseTransport):
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = stdin
        self.stdout = stdout
        self._stdout_transport = stdout_transport
        self._exited = asyncio.get_running_loop().create_future()

    def _exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self.stdin.close()
            self._exited.set_result(code)

    def close(self) -> None:
        """Close this side's pipes (once the child is gone, or to stop it)."""
        self.stdin.close()
        self._stdout_transport.close()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class ForkServer:
    """The parent's handle on a fork server process: :meth:`spawn` a child, learn its exit.

    If the server itself dies, its children go on (they need it only to start), and
    :attr:`alive` turns false so the cluster starts another server for the next child.
    Made from a server process just started (:func:`psctl.cluster.prestart.launch`), in
    this process's event loop, which from then on reaps it when it exits."""

    def __init__(self, launched: prestart.Launched):
        loop = asyncio.get_running_loop()
        self._proc = launched.proc
        self._sock = sock = launched.sock
        sock.setblocking(False)
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(self._proc.pid)  # ours to reap: no one else waits for it
        loop.add_reader(self._pidfd, self._on_exit)
        self._replies: collections.deque[asyncio.Future[dict]] = collections.deque()
        self._children: dict[int, ForkedProcess] = {}
        self._early: dict[int, int] = {}  # exit codes that came before their pid was ours
        self._lock = asyncio.Lock()
        self.alive = True
        loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def start(cls, log_path: Path, env: dict[str, str]) -> ForkServer:
        return cls(prestart.launch(env, log_path))

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(self._proc.wait())  # it has exited: does not block

    async def spawn(
        self, argv: list[str], log_path: Path, *, pass_fds: tuple[int, ...] = (), fd_flags: tuple[str, ...] = (),
        timeout_s: float,
    ) -> ForkedProcess:  # fmt: skip
        """Fork ``python -m psctl.cluster.child ARGV``; each of ``pass_fds`` reaches the child
        and is named to it by the flag at the same place in ``fd_flags`` (``--secret-fd N``)."""
        from psctl.errors import PsctlError

        loop = asyncio.get_running_loop()
        async with self._lock:  # one request at a time: replies come in order
            if not self.alive:
                raise PsctlError("the fork server is gone")
            stdin_r, stdin_w = os.pipe()
            stdout_r, stdout_w = os.pipe()
            try:
                with open(log_path, "wb") as log:
                    request = json.dumps({"argv": argv, "fd_flags": list(fd_flags)}).encode()
                    reply: asyncio.Future[dict] = loop.create_future()
                    self._replies.append(reply)
                    try:
                        socket.send_fds(self._sock, [request], [stdin_r, stdout_w, log.fileno(), *pass_fds])
                    except OSError as exc:  # BlockingIOError included: it stopped taking requests
                        self._replies.remove(reply)
                        raise PsctlError(f"the fork server did not take the request ({exc})") from None
            except BaseException:
                os.close(stdin_w)
                os.close(stdout_r)
                raise
            finally:
                os.close(stdin_r)
                os.close(stdout_w)
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await reply
            except BaseException:
                os.close(stdin_w)
                os.close(stdout_r)
                raise
        if "pid" not in answer:
            os.close(stdin_w)
            os.close(stdout_r)
            raise PsctlError(f"the fork server could not start the process: {answer.get('error')}")
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), open(stdout_r, "rb", 0))
        child = ForkedProcess(answer["pid"], _PipeEnd(stdin_w), reader, transport)
        self._children[child.pid] = child
        if child.pid in self._early:
            self._child_exited(child.pid, self._early.pop(child.pid))
        return child

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_REQUEST_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            message = json.loads(data)
            if "exit" in message:
                self._child_exited(int(message["exit"]), int(message["code"]))
            elif self._replies:
                reply = self._replies.popleft()
                if not reply.done():
                    reply.set_result(message)

    def _child_exited(self, pid: int, code: int) -> None:
        child = self._children.pop(pid, None)
        if child is None:
            self._early[pid] = code
        else:
            child._exit(code)

    def _lost(self) -> None:
        """The server closed its socket (it died, or was killed). Its children do not depend
        on it and go on; each one's end is then learnt from a pidfd, without its exit code,
        which is reported as 1 (so a worker that ends then counts as failed, never as done)."""
        from psctl.errors import PsctlError

        if not self.alive:
            return
        self.alive = False
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._sock.close()
        while self._replies:
            reply = self._replies.popleft()
            if not reply.done():
                reply.set_exception(PsctlError("the fork server exited"))
        if self._children:
            logging.getLogger(__name__).warning(
                "the fork server exited: its %d processes go on, their exit codes unknown", len(self._children))
        for pid, child in list(self._children.items()):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                child._exit(UNKNOWN_EXIT_CODE)
                continue

            def gone(pidfd: int = pidfd, child: ForkedProcess = child) -> None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                child._exit(UNKNOWN_EXIT_CODE)

            loop.add_reader(pidfd, gone)
        self._children.clear()

    async def close(self, timeout_s: float) -> None:
        """Stop the server (its children are stopped by the cluster, through their stdin)."""
        if self.alive:
            self.alive = False
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._exited)
        except TimeoutError:
            self._proc.kill()  # not yet reaped: the pid is still its
            await asyncio.shield(self._exited)


def main() -> None:
    control_fd = int(sys.argv[1])
    _close_fds_but({control_fd})
    set_cmdline([sys.executable, "-m", "psctl.cluster.forkserver"])
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from psctl.cluster import child

    child.parser()  # what each child would otherwise build again
    control = socket.socket(fileno=control_fd)
    try:
        serve(control)
    finally:
        control.close()


if __name__ == "__main__":
    main()
