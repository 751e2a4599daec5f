"""A 64-byte round trip over loopback TCP against a Unix socket, two uvloop Protocols.

    python benchmarks/loopback_transports.py [--rounds 3] [--trips 20000]

Measured to decide whether psctl's same-host connections should use Unix sockets
(BENCHMARKS.md, "Quiet pushes"): it prints, per round and transport, the wall time and the
client's CPU time (user + sys) per round trip. The echo server is a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import uvloop

MESSAGE = b"x" * 64


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Client(asyncio.Protocol):
    def __init__(self, trips: int, done: asyncio.Future[None]):
        self.left, self.done = trips, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(MESSAGE)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set_result(None)
        else:
            self.transport.write(MESSAGE)  # type: ignore[attr-defined]


async def serve(kind: str, address: str) -> None:
    loop = asyncio.get_running_loop()
    if kind == "tcp":
        server = await loop.create_server(Echo, "127.0.0.1", int(address))
    else:
        server = await loop.create_unix_server(Echo, address)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    server.close()


async def trip(kind: str, address: str, trips: int) -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if kind == "tcp":
        transport, _ = await loop.create_connection(lambda: Client(trips, done), "127.0.0.1", int(address))
    else:
        transport, _ = await loop.create_unix_connection(lambda: Client(trips, done), address)
    await done
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    transport.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall / trips * 1e6, cpu / trips * 1e6, (after.ru_stime - before.ru_stime) / trips * 1e6


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        uvloop.run(serve(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trips", type=int, default=20_000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="psctl-uds-")
    for r in range(args.rounds):
        for kind in ("tcp", "unix"):
            address = free_port() if kind == "tcp" else os.path.join(folder, f"echo-{r}.sock")
            server = subprocess.Popen([sys.executable, __file__, "--serve", kind, address],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
            try:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
                wall, cpu, sys_s = uvloop.run(trip(kind, address, args.trips))
                print(f"round {r + 1} {kind:4}: {wall:6.1f} us a round trip (wall), client CPU {cpu:5.1f} us (sys {sys_s:4.1f})")
            finally:
                assert server.stdin is not None
                server.stdin.close()
                server.wait(timeout=10)


if __name__ == "__main__":
    main()
