"""Thousands of random and mutated frames at a live coordinator and shard.

Two real processes (``psctl coordinator`` and ``psctl shard``, with a secret)
run a job with one legitimate worker. The test then throws frames at both:
random bytes, bit flips, wrong and huge lengths and sizes, wrong JSON types,
unknown types and flags, truncated frames, handshake frames out of order and
valid frames before the handshake. Most connections come without the secret
(the first frame decides each); about 70% of the frames come in batches over
authenticated connections (many frames per connection while the codec allows,
so the handlers see them too), never as the job's worker.
Afterwards no parameter has changed, both processes still run, no handler
failed, and the worker is served correctly.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient
from psctl.protocol import handshake
from psctl.protocol.wire import (
    HEADER,
    NEED_DATA,
    Flag,
    FrameParser,
    Message,
    MsgType,
    ProtocolError,
    encode_bytes,
)

from .cluster import bare_spec, driver_session, status, wait_until, worker_session, write_secret

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIN_FRAMES = 10_000
MAX_FRAME_BYTES = 1 << 20
ROWS = 32
CONCURRENCY = 8
SEED = int(os.environ.get("PSCTL_FUZZ_SEED", "20261127"))


def membership(body: dict) -> tuple:
    """The parts of a coordinator's status that hostile frames must not change (figures move on their own)."""
    job = body.get("job") or {}
    return (
        [(s["shard_id"], s["address"]) for s in body["shards"]],
        job.get("job_id"),
        job.get("state"),
        [(w["worker_id"], w["state"]) for w in job.get("workers", [])],
    )


class Process:
    """A psctl command whose first stdout line carries its address; stderr goes to a file."""

    def __init__(self, args: list[str], log: Path, marker: str):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "psctl", *args], stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the test's timeout
        if marker not in line:
            self.stop()
            raise RuntimeError(f"{args[0]} did not start: {line!r} {log.read_text()}")
        self.address = line.split(marker, 1)[1].split()[0]

    def stop(self, timeout_s: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


# -- frames ------------------------------------------------------------------------
WRONG_VALUES = [None, True, False, -1, 0, 2**70, -(2**63), 1.5, -1e308, "", "w", "x" * 300, [], {}, ["w"] * 100,
                [[["w"]]], {"w": 1}, [None], "driver", "127.0.0.1:1"]  # fmt: skip


def templates(job_id: str, rows: int) -> dict[str, list[Message]]:
    grad = np.ones(rows, np.float32)
    nonce, proof = "ab" * handshake.NONCE_BYTES, "cd" * handshake.PROOF_BYTES
    both = [
        Message(MsgType.STATUS), Message(MsgType.PING, {}, [grad]),
        Message(MsgType.AUTH_HELLO, {"nonce": nonce}), Message(MsgType.AUTH_PROOF, {"proof": proof}),
        Message(MsgType.HELLO, {"job_id": job_id, "role": "driver"}),
        Message(MsgType.EVENT, {"kind": "abort", "reason": "fuzz"}, flags=Flag.ONEWAY),
        Message(MsgType.ERROR, {"code": "x", "message": "y"}, flags=Flag.REPLY),
    ]  # fmt: skip
    return {
        "coordinator": both + [
            Message(MsgType.SUBMIT, {"spec": bare_spec(1, "async")}),
            Message(MsgType.REGISTER_WORKER, {"pid": 1, "host": "fuzz"}),
            Message(MsgType.REGISTER_SHARD, {"address": "127.0.0.1:1", "pid": 1}),
            Message(MsgType.STATS, {"stats": {"count": 1, "mean": [0.0], "m2": [0.0]}, "labels": ["0", "1"]}),
            Message(MsgType.EPOCH_REPORT, {"epoch": 0, "loss_sum": 1.0, "correct": 1, "n": 1}, flags=Flag.ONEWAY),
            Message(MsgType.PROGRESS, {"epoch": 0, "clock": 1, "samples": 1, "loss_sum": 1.0}, flags=Flag.ONEWAY),
            Message(MsgType.TRAINED), Message(MsgType.FAILED, {"message": "fuzz"}),
            Message(MsgType.FINAL_REPORT, {"loss_sum": 1.0, "correct": 1, "n": 1}, flags=Flag.ONEWAY),
            Message(MsgType.JOB_END, {"job_id": job_id, "reason": "fuzz"}, flags=Flag.ONEWAY),
            Message(MsgType.HALT, {"job_id": job_id}),
            Message(MsgType.PAUSE, {"job_id": job_id}), Message(MsgType.RESUME, {"until": 3}, flags=Flag.ONEWAY),
            Message(MsgType.MODELS, {"name": "m"}), Message(MsgType.MODEL_DROP, {"name": "m"}),
            Message(MsgType.MODEL_KEEP, {"job_id": job_id, "meta": {"kind": "logreg"}, "extras": ["v"]}, [grad]),
        ],
        "shard": both + [
            Message(MsgType.PULL, {"job_id": job_id, "tables": ["w"], "clock": 0}),
            Message(MsgType.PUSH, {"job_id": job_id, "tables": ["w"], "clock": 1, "count": 1}, [grad]),
            Message(MsgType.LEAVE, {"job_id": job_id}),
            Message(MsgType.MODEL_PULL, {"model": "m", "version": job_id, "tables": ["w"], "keyed": True}, [np.arange(3)]),
            Message(MsgType.MODEL_PULL, {"model": "m", "version": job_id, "extras": True}),
            Message(MsgType.KEEP_TABLES, {"job_id": job_id, "name": "m", "version": job_id, "shard_index": 0}),
            Message(MsgType.KEEP_LOAD, {"name": "m", "version": job_id, "shard_index": 0, "dir": "/nonexistent"}),
            Message(MsgType.KEEP_DROP, {"name": "m", "version": job_id}),
            Message(MsgType.HELLO, {"job_id": job_id, "role": "worker", "worker_id": 0}),
            Message(MsgType.WORKER_LEFT, {"job_id": job_id, "worker_id": 0}),
            Message(MsgType.JOB_CLEAR, {"job_id": job_id}),
            Message(MsgType.CHECKPOINT, {"job_id": job_id, "clock": 1}),
            Message(MsgType.JOB_SETUP, {"job_id": job_id, "tables": [{"name": "w", "rows": rows}],
                                        "ranges": {"w": [0, rows]}, "mode": "async", "workers": [0],
                                        "optimizer": {"name": "sgd", "params": {"lr": 100.0}}}),
        ],
    }  # fmt: skip


def mutate(rng: random.Random, template: Message) -> bytes:
    """One hostile frame made from a valid one."""
    kind = rng.choice(["valid", "json", "json", "json", "flip", "byte", "length", "prefix", "dims", "type",
                       "garbage", "truncate", "splice"])  # fmt: skip
    msg = Message(template.type, dict(template.body), list(template.arrays), rng.randrange(1, 2**64), template.flags)
    if kind == "json":
        for _ in range(rng.randint(1, 3)):
            keys = list(msg.body) + ["job_id", "tables", "clock", "count", "role", "worker_id", "spec", "x"]
            key = rng.choice(keys)
            if rng.random() < 0.15:
                msg.body.pop(key, None)
            else:
                msg.body[key] = rng.choice(WRONG_VALUES)
        if rng.random() < 0.2:
            msg.flags = rng.choice([Flag.NONE, Flag.REPLY, Flag.ONEWAY])
        if rng.random() < 0.2 and msg.arrays:
            dtype = rng.choice([np.float64, np.int32, np.uint8, np.float16])
            msg.arrays = [np.zeros(rng.choice([(0,), (1,), (ROWS, 2), (3, 0, 5)]), dtype)]
    data = bytearray(encode_bytes(msg))
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "length":
        choices = [0, 1, 7, len(data) - HEADER.size - 1, len(data) - HEADER.size + 8, MAX_FRAME_BYTES + 1, 2**31, 2**63]
        struct.pack_into("<Q", data, 16, rng.choice(choices))
    elif kind == "prefix":
        struct.pack_into("<I", data, HEADER.size + rng.choice([0, 4]), rng.choice([1, 7, 65, 2**20, 2**31, 2**32 - 1]))
    elif kind == "dims" and msg.arrays:
        body_len = struct.unpack_from("<I", data, HEADER.size)[0]
        at = HEADER.size + 8 + body_len + (-body_len % 8) + 8  # the first array's first dimension
        struct.pack_into("<Q", data, at, rng.choice([0, 2**32, 2**62, 2**64 - 1]))
    elif kind == "type":
        data[5] = rng.randrange(256)
        struct.pack_into("<H", data, 6, rng.choice([0, 1, 2, 3, 4, 0x8000]))
    elif kind == "garbage":
        data = bytearray(rng.randbytes(rng.randint(0, 200)))
        if rng.random() < 0.5:
            data[:4] = b"PSCT\x01"[: len(data)]
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind == "splice":
        pos = rng.randrange(len(data) + 1)
        data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    return bytes(data)


def decodes_whole(data: bytes) -> Message | None:
    """The message ``data`` is, if it is exactly one frame the server's codec accepts."""
    parser = FrameParser(max_frame_bytes=MAX_FRAME_BYTES)
    parser.receive_data(data)
    try:
        msg = parser.next_event()
    except ProtocolError:
        return None
    if msg is NEED_DATA or parser.partial:
        return None
    return msg  # type: ignore[return-value]


def trusted_would_act(msg: Message) -> bool:
    """Frames a peer with the secret may legitimately use to change state: not for the fuzzer."""
    return msg.type is MsgType.HELLO and msg.body.get("role") == "worker"


@dataclass
class Plan:
    target: str  # "coordinator" or "shard"
    authenticate: bool
    frames: list[bytes]


def plans(rng: random.Random, job_id: str, rows: int) -> list[Plan]:
    made: list[Plan] = []
    pools = templates(job_id, rows)
    n_frames = 0
    while n_frames < MIN_FRAMES + 500:
        target = rng.choice(["coordinator", "shard"])
        if rng.random() < 0.06:  # an authenticated batch: valid frames, maybe one bad one at the end
            batch: list[bytes] = []
            while len(batch) < 40:
                data = mutate(rng, rng.choice(pools[target]))
                msg = decodes_whole(data)
                if msg is not None and not trusted_would_act(msg):
                    batch.append(data)
            if rng.random() < 0.5:
                batch.append(mutate(rng, rng.choice(pools[target]))[:-1] or b"\0")
            made.append(Plan(target, True, batch))
            n_frames += len(batch)
        else:  # no secret: the first frame decides; a handshake hello buys one more
            first = mutate(rng, rng.choice(pools[target]))
            frames = [first]
            if first[5:6] == bytes([MsgType.AUTH_HELLO]) and rng.random() < 0.5:
                frames.append(mutate(rng, rng.choice(pools[target])))
            made.append(Plan(target, False, frames))
            n_frames += len(frames)
    return made


# -- throwing ------------------------------------------------------------------------
@dataclass
class Tally:
    frames: int = 0
    connections: int = 0
    replies: int = 0
    internal_errors: int = 0


async def throw(plan: Plan, address: str, secret: bytes, tally: Tally) -> None:
    host, port = net.parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    parser = FrameParser()
    try:
        if plan.authenticate:
            hs = handshake.ClientHandshake(secret)
            writer.write(encode_bytes(Message(MsgType.AUTH_HELLO, hs.hello(), req_id=1)))
            challenge = await _next_frame(reader, parser)
            answer = hs.on_challenge(challenge.body)
            writer.write(encode_bytes(Message(MsgType.AUTH_PROOF, answer, req_id=2)))
            assert (await _next_frame(reader, parser)).type is MsgType.AUTH_PROOF
        writer.write(b"".join(plan.frames))
        writer.write_eof()
        while (reply := await _next_frame(reader, parser)) is not None:  # until the server hangs up
            tally.replies += 1
            if reply.type is MsgType.ERROR and reply.body.get("code") == "internal":
                tally.internal_errors += 1
                print("internal error for a fuzz frame:", reply.body.get("message"))
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server cut off a peer that would not stop
    finally:
        writer.close()
    tally.frames += len(plan.frames)
    tally.connections += 1


async def _next_frame(reader: asyncio.StreamReader, parser: FrameParser, timeout_s: float = 20) -> Message | None:
    deadline = time.monotonic() + timeout_s
    while (msg := parser.next_event()) is NEED_DATA:
        data = await asyncio.wait_for(reader.read(65536), max(deadline - time.monotonic(), 0))
        if not data:
            return None
        parser.receive_data(data)
    return msg  # type: ignore[return-value]


async def test_hostile_frames_change_no_parameter_and_the_worker_is_still_served(tmp_path):
    secret_path, secret = write_secret(tmp_path)
    security = net.Security(secret=secret)
    common = ["--secret-file", str(secret_path), "--max-frame-bytes", str(MAX_FRAME_BYTES)]
    coordinator = Process(["coordinator", *common], tmp_path / "coordinator.log", "listening on ")
    shard = None
    try:
        shard = Process(["shard", "--coordinator", coordinator.address, *common], tmp_path / "shard.log", "PSCTL_READY ")
        driver = await driver_session(coordinator.address, security)
        spec = bare_spec(1, "async", rows=ROWS)
        submitted = await driver.submit(spec, timeout_s=30)
        reg_placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=30)).body
        job_id = submitted["job_id"]
        # The bare worker heartbeats from its session's thread: however long the fuzzing keeps
        # this loop (and the loaded machine) busy, the coordinator does not take it for lost.
        control, reg = await worker_session(coordinator.address, security)
        worker = await ShardClient.connect(
            reg_placed["shards"], reg_placed["ranges"], job_id, {"role": "worker", "worker_id": 0, "session": reg["session"]},
            max_frame_bytes=MAX_FRAME_BYTES, security=security,
        )  # fmt: skip
        for clock in range(3):
            await worker.push({"w": np.full(ROWS, clock + 1, np.float32)}, clock, 1)
        before = (await worker.pull(["w"], 3))["w"].copy()
        np.testing.assert_allclose(before, -0.1 * (1 + 2 + 3), rtol=1e-6)
        shard_before = await status(shard.address, security)
        coordinator_before = await status(coordinator.address, security)

        rng = random.Random(SEED)
        queue = plans(rng, job_id, ROWS)
        tally = Tally()
        addresses = {"coordinator": coordinator.address, "shard": shard.address}
        started = time.monotonic()

        async def run_plans(mine: list[Plan]) -> None:
            for plan in mine:
                await throw(plan, addresses[plan.target], secret, tally)

        await asyncio.gather(*(run_plans(queue[i::CONCURRENCY]) for i in range(CONCURRENCY)))
        elapsed = time.monotonic() - started
        print(f"seed {SEED}: {tally.frames} frames over {tally.connections} connections in {elapsed:.1f} s, "
              f"{tally.replies} replies")  # fmt: skip
        assert tally.frames >= MIN_FRAMES
        assert tally.internal_errors == 0

        # Both processes are up, nothing changed, and the worker is served correctly.
        assert coordinator.proc.poll() is None and shard.proc.poll() is None
        after = await worker.pull(["w"], 3)
        np.testing.assert_array_equal(after["w"], before)
        shard_after = await status(shard.address, security)
        for key in ("job_id", "updates", "pushes", "clocks", "keys"):
            assert shard_after[key] == shard_before[key], key

        async def coordinator_settled() -> bool:  # fuzz connections that registered as shards are gone
            return membership(await status(coordinator.address, security)) == membership(coordinator_before)

        await wait_until(coordinator_settled, what="the coordinator to forget the fuzz connections")
        (slot,) = (await status(coordinator.address, security))["job"]["workers"]
        assert slot["state"] == "running" and slot["heartbeats"] > 0, slot  # never taken for lost
        await worker.push({"w": np.full(ROWS, 4, np.float32)}, 3, 1)
        np.testing.assert_allclose((await worker.pull(["w"], 4))["w"], -0.1 * (1 + 2 + 3 + 4), rtol=1e-6)
        worker.close()
        control.close()
        driver.close()
    finally:
        if shard is not None:
            shard.stop()
        coordinator.stop()
    for proc in (coordinator, shard):
        text = proc.log.read_text(errors="replace")
        assert "Traceback" not in text and "handler for" not in text, text[-3000:]
