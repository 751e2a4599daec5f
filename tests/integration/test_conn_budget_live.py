"""Connections still in their set-up cannot starve established ones (issue 13, defect 2).

The test floods a `psctl server` (one shard, --max-connections 64) from five other
loopback addresses with connections that never finish their set-up, each one
reconnecting shortly after it is dropped: with a secret they send nothing (the
handshake never starts); without one they send one PING and stay silent. Before the
set-up budget these filled every connection slot and the real job failed ("did not
complete the handshake", "connection ... is closed"). Now they have a budget of their
own, capped per address, and a real `psctl train --server` job finishes meanwhile;
the dropped ones are told why in an ERROR frame.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from psctl import net
from psctl.protocol.wire import NEED_DATA, FrameParser, Message, MsgType, encode_bytes

from ..conftest import EXAMPLES, REPO
from .cluster import ServerProcess, status, write_secret

pytestmark = pytest.mark.integration

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
SOURCES = [f"127.0.0.{i}" for i in range(2, 7)]  # the outsiders' addresses; the job runs from 127.0.0.1
PER_SOURCE_PER_TARGET = 20  # above the per-address share (16); 100 per target, above the budget (64)
RECONNECT_S = 0.25


class Flood:
    """Hostile connections that never finish their set-up, reopened after each drop."""

    def __init__(self, targets: list[tuple[str, int]], ping: bool):
        self.targets, self.ping = targets, ping
        self.opened = 0
        self.told: list[str] = []  # the ERROR sentences the server sent before dropping one
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for target in self.targets:
            for source in SOURCES:
                for _ in range(PER_SOURCE_PER_TARGET):
                    self._tasks.append(asyncio.ensure_future(self._one(target, source)))

    async def _one(self, target: tuple[str, int], source: str) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*target, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(RECONNECT_S)  # a refused connect: the flood's own pacing, not a wait on the server
                continue
            self.opened += 1
            if self.ping:
                writer.write(encode_bytes(Message(MsgType.PING, {}, req_id=1)))
            parser = FrameParser()
            try:
                while data := await reader.read(65536):
                    parser.receive_data(data)
                    while (msg := parser.next_event()) is not NEED_DATA:
                        if msg.type is MsgType.ERROR:  # type: ignore[union-attr]
                            self.told.append(str(msg.body.get("message")))  # type: ignore[union-attr]
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(RECONNECT_S)  # the attacker's pace: reconnect soon after each drop

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("with_secret", [True, False], ids=["secret", "no-secret"])
async def test_a_flood_of_unfinished_connections_does_not_stop_a_real_job(tmp_path, with_secret):
    secret_args: list[str] = []
    security = net.LOCAL
    if with_secret:
        path, secret = write_secret(tmp_path)
        secret_args = ["--secret-file", str(path)]
        security = net.Security(secret=secret)
    server = ServerProcess(1, "--max-connections", "64", *secret_args)
    flood = None
    try:
        body = await status(server.address, security)
        shard = body["shards"][0]["address"]
        flood = Flood([_address(server.address), _address(shard)], ping=not with_secret)
        flood.start()
        job = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "psctl", "train", "logreg", str(TRAIN), "--server", server.address,
            "--workers", "2", "--local-workers", "2", "--epochs", "3", "--out", str(tmp_path / "m.npz"), *secret_args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        out, err = await asyncio.wait_for(job.communicate(), 180)
        opened, told = flood.opened, list(flood.told)
    finally:
        if flood is not None:
            await flood.stop()
        code, _, server_err = server.stop()
    assert job.returncode == 0, err.decode()[-3000:]
    assert (tmp_path / "m.npz").is_file()
    # The flood was real: far more connections than slots, and the dropped ones were told why.
    assert opened > 2 * 64, opened
    assert any("still in their set-up" in sentence for sentence in told), told[:5]
    assert code == 0 and "Traceback" not in server_err, server_err[-3000:]
