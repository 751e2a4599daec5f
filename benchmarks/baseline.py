"""The baselines: the plainest request/reply over loopback TCP, with no codec at all.

A request is ``n_in u64, n_out u64`` then ``n_in`` bytes; the reply is ``n_out u64``
then ``n_out`` bytes (the received bytes themselves when ``n_out <= n_in``: an echo).
Both ends read into buffers allocated once. The benchmarks size ``n_in``/``n_out``
so a baseline call moves exactly the bytes of the psctl frame it stands beside.

Servers run as child processes (``python -m benchmarks.baseline KIND``) and print
``READY host:port``; they exit when their stdin closes. Kinds:

- ``protocol``: an ``asyncio.BufferedProtocol`` (uvloop unless ``--loop asyncio``);
- ``streams``: asyncio streams, ``readexactly`` (``--loop uvloop|asyncio``);
- ``blocking``: blocking sockets, a thread per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.common import child_env

REQUEST = struct.Struct("<QQ")
REPLY = struct.Struct("<Q")
KINDS = ("protocol", "streams", "blocking")
DEFAULT_MAX_BYTES = 80 << 20  # 16 Mi float32 values plus headroom


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# -- servers -------------------------------------------------------------------


class _Buffered(asyncio.BufferedProtocol):
    """A fixed receive buffer (header + up to max_bytes) filled in place; TCP_NODELAY."""

    def __init__(self, header: struct.Struct, max_bytes: int):
        self.buf = bytearray(header.size + max_bytes)
        self.view = memoryview(self.buf)
        self.filled = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled :]


class _EchoServerProtocol(_Buffered):
    def __init__(self, max_bytes: int):
        super().__init__(REQUEST, max_bytes)
        self.out = memoryview(bytearray(max_bytes))

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled < REQUEST.size:
            return
        n_in, n_out = REQUEST.unpack_from(self.buf, 0)
        if self.filled < REQUEST.size + n_in:
            return
        data = self.view[REQUEST.size : REQUEST.size + n_out] if n_out <= n_in else self.out[:n_out]
        self.transport.writelines([REPLY.pack(n_out), data])
        self.filled = 0  # clients do not pipeline: a request is all there is


def _serve_blocking_connection(conn: socket.socket, max_bytes: int) -> None:
    buf = bytearray(REQUEST.size + max_bytes)
    view = memoryview(buf)
    out = memoryview(bytearray(max_bytes))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            filled = 0
            while filled < REQUEST.size:
                n = conn.recv_into(view[filled:])
                if not n:
                    return
                filled += n
            n_in, n_out = REQUEST.unpack_from(buf, 0)
            while filled < REQUEST.size + n_in:
                n = conn.recv_into(view[filled : REQUEST.size + n_in])
                if not n:
                    return
                filled += n
            data = view[REQUEST.size : REQUEST.size + n_out] if n_out <= n_in else out[:n_out]
            send_all(conn, [REPLY.pack(n_out), data])


def send_all(sock: socket.socket, parts: list[Any]) -> None:
    """sendmsg until every byte of ``parts`` is gone (one syscall for small messages)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _watch_stdin() -> None:
    """Exit when the parent closes our stdin (or dies)."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


async def _serve_async(kind: str, host: str, max_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "protocol":
        server = await loop.create_server(lambda: _EchoServerProtocol(max_bytes), host, 0)
    else:
        out = bytes(max_bytes)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    n_in, n_out = REQUEST.unpack(await reader.readexactly(REQUEST.size))
                    data = await reader.readexactly(n_in) if n_in else b""
                    writer.writelines([REPLY.pack(n_out), data[:n_out] if n_out <= n_in else out[:n_out]])
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, host, 0, limit=max_bytes + 64)
    port = server.sockets[0].getsockname()[1]
    print(f"READY {host}:{port}", flush=True)
    await asyncio.Event().wait()  # until stdin closes


def serve(kind: str, loop_kind: str, host: str, max_bytes: int) -> None:
    _watch_stdin()
    if kind == "blocking":
        listener = socket.create_server((host, 0))
        print(f"READY {host}:{listener.getsockname()[1]}", flush=True)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve_blocking_connection, args=(conn, max_bytes), daemon=True).start()
    with asyncio.Runner(loop_factory=lambda: new_loop(loop_kind)) as runner:
        runner.run(_serve_async(kind, host, max_bytes))


class BaselineServer:
    """A baseline server child process; ``with`` it, or call :meth:`stop`."""

    def __init__(self, kind: str, loop_kind: str = "uvloop", max_bytes: int = DEFAULT_MAX_BYTES):
        self.kind, self.loop_kind = kind, loop_kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.baseline", kind, "--loop", loop_kind, "--max-bytes", str(max_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"baseline {kind} server did not start: {line!r}")
        host, port = line.split()[1].rsplit(":", 1)
        self.address = (host, int(port))

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> BaselineServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- clients --------------------------------------------------------------------


class _EchoClientProtocol(_Buffered):
    def __init__(self, max_bytes: int):
        super().__init__(REPLY, max_bytes)
        self.waiter: asyncio.Future[int] | None = None

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled < REPLY.size:
            return
        (n_out,) = REPLY.unpack_from(self.buf, 0)
        if self.filled >= REPLY.size + n_out:
            self.filled = 0
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(n_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("baseline server closed the connection"))


class ProtocolClient:
    """asyncio BufferedProtocol client on the running loop, reading into one preallocated buffer."""

    def __init__(self, protocol: _EchoClientProtocol, max_bytes: int):
        self.protocol = protocol
        self.payload = memoryview(bytearray(max_bytes))

    @classmethod
    async def connect(cls, address: tuple[str, int], max_bytes: int = DEFAULT_MAX_BYTES) -> ProtocolClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: _EchoClientProtocol(max_bytes), *address)
        return cls(protocol, max_bytes)

    async def call(self, n_in: int, n_out: int) -> None:
        p = self.protocol
        p.waiter = asyncio.get_running_loop().create_future()
        p.transport.writelines([REQUEST.pack(n_in, n_out), self.payload[:n_in]])
        await p.waiter

    def close(self) -> None:
        self.protocol.transport.close()


class StreamsClient:
    """asyncio streams client: ``readexactly`` allocates every reply, as streams users do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int):
        self.reader, self.writer = reader, writer
        self.payload = bytes(max_bytes)

    @classmethod
    async def connect(cls, address: tuple[str, int], max_bytes: int = DEFAULT_MAX_BYTES) -> StreamsClient:
        reader, writer = await asyncio.open_connection(*address, limit=max_bytes + 64)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, max_bytes)

    async def call(self, n_in: int, n_out: int) -> None:
        self.writer.writelines([REQUEST.pack(n_in, n_out), memoryview(self.payload)[:n_in]])
        await self.writer.drain()
        (n,) = REPLY.unpack(await self.reader.readexactly(REPLY.size))
        if n:
            await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.close()


class BlockingClient:
    """Blocking socket client, ``recv_into`` one preallocated buffer."""

    def __init__(self, address: tuple[str, int], max_bytes: int = DEFAULT_MAX_BYTES):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(REPLY.size + max_bytes)
        self.view = memoryview(self.buf)
        self.payload = memoryview(bytearray(max_bytes))

    def call(self, n_in: int, n_out: int) -> None:
        send_all(self.sock, [REQUEST.pack(n_in, n_out), self.payload[:n_in]])
        filled = 0
        while filled < REPLY.size:
            n = self.sock.recv_into(self.view[filled:])
            if not n:
                raise ConnectionError("baseline server closed the connection")
            filled += n
        (n_out,) = REPLY.unpack_from(self.buf, 0)
        while filled < REPLY.size + n_out:
            n = self.sock.recv_into(self.view[filled : REPLY.size + n_out])
            if not n:
                raise ConnectionError("baseline server closed the connection")
            filled += n

    def close(self) -> None:
        self.sock.close()


def blocking_rate(client: BlockingClient, calls: list[tuple[int, int]], duration_s: float) -> tuple[int, float]:
    """Iterations of ``calls`` per ``duration_s`` on a blocking client (run it in a thread)."""
    n = 0
    start = time.perf_counter()
    while True:
        for n_in, n_out in calls:
            client.call(n_in, n_out)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= duration_s:
            return n, elapsed


def blocking_samples(client: BlockingClient, n_in: int, n_out: int, duration_s: float) -> list[float]:
    out = []
    clock = time.perf_counter
    end = clock() + duration_s
    while True:
        t0 = clock()
        client.call(n_in, n_out)
        t1 = clock()
        out.append(t1 - t0)
        if t1 >= end:
            return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description="a baseline server")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = p.parse_args(argv)
    serve(args.kind, args.loop, args.host, args.max_bytes)


if __name__ == "__main__":
    main()
