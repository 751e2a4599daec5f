"""A structured fuzzer: hostile frames at a live coordinator and shard while a real job trains.

Shared by tests/integration/test_fuzz_structured.py (a bounded count) and
``python -m benchmarks --only fuzz`` (a larger one); benchmarks import from tests
as benchmarks/tls_cost.py does.

Every frame has a valid header (magic, version, a known type, known flags, the
true payload length); what is hostile is the payload: wrong JSON types and
values, dtype codes the codec does not know or that do not fit the data, shapes
whose product overflows 64 bits, uint64 keys past int64, NaN and Inf values,
JSON nested far past the parser's recursion limit, and pulls parked at far
clocks by connections that then close without reading them. Most frames come in
batches over connections with the secret (so the handlers see them, not only the
codec), as a worker id nobody uses; the rest come one per connection without
the secret. The job's own worker (``psctl train --server ... --local-workers 1``,
sync mode) trains throughout; its model is compared with a clean run's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psctl import net
from psctl.files import modelfile
from psctl.protocol import handshake
from psctl.protocol.wire import (
    HEADER,
    MAGIC,
    NEED_DATA,
    PAYLOAD_PREFIX,
    PROTOCOL_VERSION,
    Flag,
    FrameParser,
    Message,
    MsgType,
    ProtocolError,
    encode_bytes,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_CSV = REPO / "examples" / "breast_cancer" / "train.csv"
MAX_FRAME_BYTES = 1 << 20
FAKE_WORKER_IDS = (1000, 1001, 77777, 2**40)  # HELLO as these: ids the job never uses
FAR_CLOCKS = (10**6, 2**31, 2**53, 2**62)
DEEP = (2_000, 50_000, 150_000)  # nesting depths of hostile JSON (the body limit is 1 MiB)

WRONG_VALUES: list[Any] = [None, True, False, -1, 0, 2**63, 2**64 + 1, -(2**63) - 1, 10**400, 1.5, -1e308, "", "w",
                           "x" * 300, [], {}, ["w"] * 50, [[["w"]]], {"w": 1}, [None], "driver"]  # fmt: skip


# -- frames: a valid header around a payload written by hand -------------------------
def _pad(n: int) -> bytes:
    return bytes(-n % 8)


def raw_array(code: int, dims: tuple[int, ...], data: bytes) -> bytes:
    """One array as the codec lays it out, with whatever code, dims and data we like."""
    return struct.pack("<BB6x", code, len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + data + _pad(len(data))


def raw_frame(kind: MsgType, body: bytes, arrays: list[bytes], req_id: int, flags: Flag = Flag.NONE) -> bytes:
    """A frame whose header is valid (its length is the payload's) around any payload."""
    payload = PAYLOAD_PREFIX.pack(len(body), len(arrays)) + body + _pad(len(body)) + b"".join(arrays)
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), int(flags), req_id, len(payload)) + payload


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _f32(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, "<f4").tobytes()


@dataclass
class Job:
    """What the fuzzer knows of the live job (as any peer could learn it from STATUS)."""

    job_id: str
    tables: dict[str, int]  # name -> rows
    live_workers: set[int]


def _table(rng: random.Random, job: Job) -> tuple[str, int]:
    name = rng.choice(sorted(job.tables))
    return name, job.tables[name]


def _data_frame(rng: random.Random, job: Job) -> tuple[MsgType, dict[str, Any], list[tuple[int, tuple[int, ...], bytes]]]:
    """A valid PULL or PUSH (or PING) for the job, as type, body and (code, dims, data) arrays."""
    name, rows = _table(rng, job)
    grad = np.ones(rows, np.float32)
    kind = rng.choice([MsgType.PULL, MsgType.PUSH, MsgType.PUSH, MsgType.PING])
    if kind is MsgType.PULL:
        return kind, {"job_id": job.job_id, "tables": [name], "clock": rng.choice([0, 1, *FAR_CLOCKS])}, []
    if kind is MsgType.PUSH:
        body = {"job_id": job.job_id, "tables": [name], "clock": rng.randrange(0, 50), "count": 1}
        return kind, body, [(1, (rows,), _f32(grad))]
    return kind, {}, [(1, (rows,), _f32(grad))]


def _u64_keys(rng: random.Random, rows: int) -> np.ndarray:
    return np.array(rng.choice([[3, 2**63 + 1], [2**64 - 1], [2**63], [0, 2**63 - 1 + 2], [rows - 1, rows + 2**63],
                                [1, 0], [2, 2], [rows]]), dtype="<u8")  # fmt: skip


def mutate_dtype(rng: random.Random, job: Job, req_id: int) -> bytes:
    """An array whose dtype code is unknown, or known but not the table's (same or other item size)."""
    kind, body, arrays = _data_frame(rng, job)
    name, rows = _table(rng, job)
    code = rng.choice([0, 9, 10, 127, 200, 255, 2, 3, 4, 5, 6, 7, 8])
    itemsize = {2: 8, 3: 4, 4: 8, 5: 8, 6: 1, 7: 2, 8: 4}.get(code, rng.choice([1, 4, 8]))
    data = rng.randbytes(rows * itemsize)
    if not arrays:  # a pull or a ping: carry the array in a push instead
        kind, body = MsgType.PUSH, {"job_id": job.job_id, "tables": [name], "clock": 0, "count": 1}
    return raw_frame(kind, _json(body), [raw_array(code, (rows,), data)], req_id)


def mutate_shape(rng: random.Random, job: Job, req_id: int) -> bytes:
    """Dimensions whose product overflows 64 bits (or is huge with no data behind it)."""
    kind, body, _ = _data_frame(rng, job)
    dims = rng.choice([(2**32, 2**32), (2**63, 2), (2**64 - 1, 2**64 - 1), (2**21, 2**21, 2**21, 2**21),
                       (2**64 - 1, 0), (0, 2**64 - 1, 2**64 - 1), (2**62, 4, 0), (3, 2**61)])  # fmt: skip
    data = rng.randbytes(rng.choice([0, 4, 16]))
    return raw_frame(kind, _json(body), [raw_array(rng.choice([1, 2, 5, 6]), dims, data)], req_id)


def mutate_keys(rng: random.Random, job: Job, req_id: int) -> bytes:
    """A keyed pull or push whose keys are uint64 past int64, out of range, unsorted or repeated."""
    name, rows = _table(rng, job)
    keys = _u64_keys(rng, rows)
    if rng.random() < 0.3:
        keys = keys.astype("<i8") if rng.random() < 0.5 else keys.astype("<u4")
    code = {"<u8": 5, "<i8": 4, "<u4": 8}[keys.dtype.str]
    key_array = raw_array(code, keys.shape, keys.tobytes())
    if rng.random() < 0.5:
        body = {"job_id": job.job_id, "tables": [name], "clock": rng.choice([0, *FAR_CLOCKS])}
        return raw_frame(MsgType.PULL, _json(body), [key_array], req_id)
    body = {"job_id": job.job_id, "tables": [name], "clock": 0, "count": 1}
    return raw_frame(MsgType.PUSH, _json(body), [key_array, raw_array(1, keys.shape, _f32(np.ones(len(keys))))], req_id)


def mutate_values(rng: random.Random, job: Job, req_id: int) -> bytes:
    """NaN and Inf in gradients (every float width), and NaN/Infinity/1e999 in the JSON."""
    name, rows = _table(rng, job)
    if rng.random() < 0.3:
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
        text = f'{{"job_id":"{job.job_id}","tables":["{name}"],"clock":0,"count":{literal}}}'
        return raw_frame(rng.choice([MsgType.PUSH, MsgType.PULL, MsgType.PROGRESS]), text.encode(), [], req_id)
    grad = np.ones(rows)
    grad[rng.randrange(rows)] = rng.choice([np.nan, np.inf, -np.inf])
    code, dtype = rng.choice([(1, "<f4"), (2, "<f8"), (7, "<f2")])
    body = {"job_id": job.job_id, "tables": [name], "clock": rng.randrange(0, 5), "count": 1}
    return raw_frame(MsgType.PUSH, _json(body), [raw_array(code, (rows,), grad.astype(dtype).tobytes())], req_id)


def mutate_depth(rng: random.Random, job: Job, req_id: int) -> bytes:
    """A body nested far deeper than Python's recursion limit, inside the body-size limit."""
    kind = rng.choice([MsgType.SUBMIT, MsgType.PULL, MsgType.HELLO, MsgType.STATS, MsgType.REGISTER_WORKER])
    return raw_frame(kind, _deep_body(job.job_id, rng.choice(DEEP), rng.random() < 0.5), [], req_id)


@functools.cache
def _deep_body(job_id: str, depth: int, lists: bool) -> bytes:
    inner = "[" * depth + "]" * depth if lists else '{"a":' * depth + "1" + "}" * depth
    return f'{{"job_id":"{job_id}","spec":{inner}}}'.encode()


def mutate_json(rng: random.Random, job: Job, req_id: int) -> bytes:
    """A valid data-plane or control-plane frame with wrong JSON types and values."""
    kind, body, arrays = _data_frame(rng, job)
    if rng.random() < 0.4:
        kind, body = rng.choice(_control(job))
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice([*body, "job_id", "tables", "clock", "count", "role", "worker_id", "spec", "x"])
        if rng.random() < 0.15:
            body.pop(key, None)
        else:
            body[key] = rng.choice(WRONG_VALUES)
    return raw_frame(kind, _json(body), [raw_array(c, d, b) for c, d, b in arrays], req_id)


def _control(job: Job) -> list[tuple[MsgType, dict[str, Any]]]:
    name = sorted(job.tables)[0]
    return [
        (MsgType.STATUS, {}), (MsgType.HELLO, {"job_id": job.job_id, "role": "driver"}),
        (MsgType.SUBMIT, {"spec": {"model": "x", "n_workers": 1, "tables": [{"name": name, "rows": 4}], "mode": "sync"}}),
        (MsgType.TABLES, {"tables": [{"name": name, "rows": 4}]}),
        (MsgType.STATS, {"stats": {"count": 1, "mean": [0.0], "m2": [0.0]}, "labels": ["0", "1"]}),
        (MsgType.EPOCH_REPORT, {"epoch": 0, "loss_sum": 1.0, "correct": 1, "n": 1}),
        (MsgType.PROGRESS, {"epoch": 0, "clock": 1, "samples": 1, "loss_sum": 1.0}),
        (MsgType.TRAINED, {}), (MsgType.FAILED, {"message": "fuzz"}), (MsgType.HALT, {"job_id": job.job_id}),
        (MsgType.JOB_END, {"job_id": job.job_id, "reason": "fuzz"}), (MsgType.LEAVE, {"job_id": job.job_id}),
        (MsgType.CHECKPOINT, {"job_id": job.job_id, "clock": 1}), (MsgType.JOB_CLEAR, {"job_id": job.job_id}),
        (MsgType.WORKER_LEFT, {"job_id": job.job_id, "worker_id": 0}), (MsgType.PAUSE, {"job_id": job.job_id}),
        (MsgType.HEARTBEAT, {"clock": 0}), (MsgType.EPOCH_SEEN, {"epoch": 0}),
    ]  # fmt: skip


MUTATIONS: dict[str, Callable[[random.Random, Job, int], bytes]] = {
    "json": mutate_json, "dtype": mutate_dtype, "shape": mutate_shape, "keys": mutate_keys,
    "values": mutate_values, "depth": mutate_depth,
}  # fmt: skip


def decodes_whole(data: bytes) -> Message | None:
    """The message ``data`` is, if it is exactly one frame the servers' codec accepts."""
    parser = FrameParser(max_frame_bytes=MAX_FRAME_BYTES)
    parser.receive_data(data)
    try:
        msg = parser.next_event()
    except ProtocolError:
        return None
    if msg is NEED_DATA or parser.partial:
        return None
    return msg  # type: ignore[return-value]


def acts_as_the_live_worker(msg: Message, job: Job) -> bool:
    """A peer with the secret may say HELLO as the job's worker and train: that is trust, not fuzz."""
    return msg.type is MsgType.HELLO and msg.body.get("role") == "worker" and msg.body.get("worker_id") in job.live_workers


# -- plans: what one connection sends --------------------------------------------------
@dataclass
class Plan:
    target: str  # "coordinator" or "shard"
    authenticate: bool
    frames: list[bytes]
    park: bool = False  # close without reading: the pulls it parked are nobody's


def _hello_fake(rng: random.Random, job: Job) -> bytes:
    body = {"job_id": job.job_id, "role": "worker", "worker_id": rng.choice(FAKE_WORKER_IDS)}
    return encode_bytes(Message(MsgType.HELLO, body, req_id=rng.randrange(1, 2**64)))


# Mutations whose frames the codec often accepts (so handlers see them), and those it refuses.
HANDLER_KINDS = ("json", "json", "keys", "values", "dtype")
CODEC_KINDS = ("dtype", "shape", "depth")


def make_plans(rng: random.Random, job: Job, n_frames: int) -> Iterator[Plan]:
    """Connections carrying at least ``n_frames`` hostile frames in all, made as they are asked for."""
    sent = 0
    kinds = list(MUTATIONS)
    while sent < n_frames:
        target = rng.choice(["coordinator", "shard", "shard"])
        roll = rng.random()
        if roll < 0.06 and target == "shard":  # pulls parked at far clocks, then the connection closes
            name, rows = _table(rng, job)
            frames = [_hello_fake(rng, job)]
            for _ in range(rng.randint(1, 24)):  # past the per-connection cap (16) now and then
                body = {"job_id": job.job_id, "tables": [name], "clock": rng.choice(FAR_CLOCKS)}
                if rng.random() < 0.5:  # keyed: every row of the table
                    keys = raw_array(4, (rows,), np.arange(rows, dtype="<i8").tobytes())
                    frames.append(raw_frame(MsgType.PULL, _json(body), [keys], rng.randrange(1, 2**64)))
                else:
                    frames.append(encode_bytes(Message(MsgType.PULL, body, req_id=rng.randrange(1, 2**64))))
            plan = Plan(target, True, frames, park=True)
        elif roll < 0.45:  # a batch the codec accepts, so the handlers see every frame
            frames = [_hello_fake(rng, job)] if target == "shard" and rng.random() < 0.7 else []
            while len(frames) < 30:
                data = MUTATIONS[rng.choice(HANDLER_KINDS)](rng, job, rng.randrange(1, 2**64))
                msg = decodes_whole(data)
                if msg is not None and not acts_as_the_live_worker(msg, job):
                    frames.append(data)
            if rng.random() < 0.5:  # and then one the codec refuses, which ends the connection
                while decodes_whole(data := MUTATIONS[rng.choice(CODEC_KINDS)](rng, job, 1)) is not None:
                    pass
                frames.append(data)
            plan = Plan(target, True, frames)
        else:  # no secret: the first frame decides
            plan = Plan(target, False, [MUTATIONS[rng.choice(kinds)](rng, job, rng.randrange(1, 2**64))])
        sent += len(plan.frames)
        yield plan


# -- throwing ------------------------------------------------------------------------
@dataclass
class Tally:
    frames: int = 0
    connections: int = 0
    parked_connections: int = 0
    replies: int = 0
    internal_errors: list[str] = field(default_factory=list)
    by_code: dict[str, int] = field(default_factory=dict)
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (frames thrown, the shard's RSS)


async def _next_frame(reader: asyncio.StreamReader, parser: FrameParser, timeout_s: float = 30) -> Message | None:
    deadline = time.monotonic() + timeout_s
    while (msg := parser.next_event()) is NEED_DATA:
        data = await asyncio.wait_for(reader.read(65536), max(deadline - time.monotonic(), 0))
        if not data:
            return None
        parser.receive_data(data)
    return msg  # type: ignore[return-value]


async def throw(plan: Plan, address: str, secret: bytes, tally: Tally) -> None:
    """Send one plan's frames over one connection; read replies until the server hangs up."""
    host, port = net.parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    parser = FrameParser(max_frame_bytes=1 << 30)
    try:
        if plan.authenticate:
            hs = handshake.ClientHandshake(secret)
            writer.write(encode_bytes(Message(MsgType.AUTH_HELLO, hs.hello(), req_id=1)))
            challenge = await _next_frame(reader, parser)
            assert challenge is not None, "the server hung up during the handshake"
            writer.write(encode_bytes(Message(MsgType.AUTH_PROOF, hs.on_challenge(challenge.body), req_id=2)))
            ok = await _next_frame(reader, parser)
            assert ok is not None and ok.type is MsgType.AUTH_PROOF, ok
        writer.write(b"".join(plan.frames))
        if plan.park:
            await writer.drain()
            # The HELLO's answer (or its refusal) means the frames were read; the pulls are parked.
            reply = await _next_frame(reader, parser)
            if reply is not None:
                tally.replies += 1
            tally.parked_connections += 1
            writer.transport.abort()  # gone without a word: nobody will read the parked answers
        else:
            writer.write_eof()
            while (reply := await _next_frame(reader, parser)) is not None:
                tally.replies += 1
                if reply.type is MsgType.ERROR:
                    code = str(reply.body.get("code"))
                    tally.by_code[code] = tally.by_code.get(code, 0) + 1
                    if code == "internal":
                        tally.internal_errors.append(str(reply.body.get("message")))
    except OSError:
        pass  # the server cut off a peer that would not stop (reset, broken pipe, not connected)
    finally:
        writer.close()
    tally.frames += len(plan.frames)
    tally.connections += 1


# -- the live run ----------------------------------------------------------------------
class Process:
    """A psctl command whose first stdout line carries its address; stderr goes to a file."""

    def __init__(self, args: list[str], log: Path, marker: str):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "psctl", *args], stdout=subprocess.PIPE, stderr=err,
                                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the caller's timeout
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


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class FuzzResult:
    seed: int
    tally: Tally
    fuzz_s: float
    train_s: float
    overlap: bool  # the job was still training when the last frame had been thrown
    train_code: int
    train_stderr: str
    crashed: list[str]  # processes that exited, or logged a traceback or a failed handler
    max_weight_diff: float
    weights_changed: int  # weights that differ from the clean run's by more than the tolerance
    rss_before: int
    rss_after: int
    waiting_pulls_after: int
    job: Job | None = None


WEIGHT_TOLERANCE = 1e-6  # sync mode, one worker: the same pushes in the same order give the same weights


def train_args(epochs: int) -> list[str]:
    return ["logreg", str(TRAIN_CSV), "--workers", "1", "--mode", "sync", "--epochs", str(epochs), "--batch-size", "8",
            "--lr", "0.1"]  # fmt: skip


def _weights(path: Path) -> dict[str, np.ndarray]:
    params, _ = modelfile.load_model(str(path))
    return params


async def _status(address: str, security: net.Security) -> dict[str, Any]:
    peer = await net.connect(address, security=security)
    try:
        return (await peer.request(MsgType.STATUS, timeout_s=10)).body
    finally:
        peer.close()


async def _running_job(coordinator: str, shard: str, security: net.Security, train: subprocess.Popen, timeout_s: float) -> Job:
    """Wait until the live worker has pushed (the job runs); what STATUS tells any peer."""
    deadline = time.monotonic() + timeout_s
    while True:
        if train.poll() is not None:
            raise RuntimeError(f"psctl train exited with {train.returncode} before the fuzzing began")
        body = await _status(shard, security)  # the round trip is the wait between tries
        if body.get("job_id") and body.get("pushes", 0) > 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the job did not start within {timeout_s} s: {body}")
    coord = await _status(coordinator, security)
    workers = {int(w["worker_id"]) for w in (coord.get("job") or {}).get("workers", [])} | {int(w) for w in body["clocks"]}
    tables = {t["name"]: int(t["rows"]) for t in (coord.get("job") or {}).get("tables", [])}
    if not tables:  # fall back to the shard's own figure: one table holding every key
        tables = {"w": int(body["keys"])}
    return Job(body["job_id"], tables, workers)


def _waiting(status: dict[str, Any]) -> int:
    if "job_id" not in status:
        return 0  # no job on the shard: nothing can be parked
    return int(status.get("waiting_pulls", -1))


async def _parked_drained(shard: Process, security: net.Security, timeout_s: float = 15) -> int:
    """The shard's parked pulls once the fuzz connections' closes have reached it (or after the
    deadline). A shard that holds no job any more (the job finished meanwhile, on a fast run)
    holds no pull either: its gate went with the job."""
    deadline = time.monotonic() + timeout_s
    while (waiting := int(_waiting(await _status(shard.address, security)))) > 0:
        if time.monotonic() > deadline:
            break  # the round trip above is the wait between tries
    return waiting


async def run_structured_fuzz(folder: Path, n_frames: int, seed: int, epochs: int, concurrency: int = 6) -> FuzzResult:
    """The whole run: a clean run, and the same job on a live cluster under ``n_frames`` hostile frames."""
    # The clean run (its own embedded cluster) trains beside the live job: the test costs the
    # longer of the two, and it only adds to the load the live job trains under.
    with open(folder / "clean.log", "wb") as clean_log:
        clean = subprocess.Popen([sys.executable, "-m", "psctl", "train", *train_args(epochs), "--out", str(folder / "clean.npz")],
                                 stdout=subprocess.DEVNULL, stderr=clean_log)  # fmt: skip
    try:
        result = await _live_run(folder, n_frames, seed, epochs, concurrency)
    finally:
        clean_code = await asyncio.to_thread(clean.wait, 300)
    if clean_code != 0:
        raise RuntimeError(f"the clean run failed: {(folder / 'clean.log').read_text()[-2000:]}")
    if result.train_code == 0:
        clean_w, live_w = _weights(folder / "clean.npz"), _weights(folder / "live.npz")
        if clean_w.keys() == live_w.keys():
            diffs = [np.abs(live_w[k].astype(np.float64) - clean_w[k]) for k in clean_w]
            result.max_weight_diff = max(float(d.max(initial=0.0)) for d in diffs)
            result.weights_changed = sum(int((d > WEIGHT_TOLERANCE).sum()) for d in diffs)
    return result


async def _live_run(folder: Path, n_frames: int, seed: int, epochs: int, concurrency: int) -> FuzzResult:
    from tests.integration.cluster import write_secret

    secret_path, secret = write_secret(folder)
    security = net.Security(secret=secret)
    common = ["--secret-file", str(secret_path), "--max-frame-bytes", str(MAX_FRAME_BYTES)]
    coordinator = Process(["coordinator", *common], folder / "coordinator.log", "listening on ")
    shard: Process | None = None
    train: subprocess.Popen | None = None
    try:
        shard = Process(["shard", "--coordinator", coordinator.address, *common], folder / "shard.log", "PSCTL_READY ")
        train_started = time.monotonic()
        with open(folder / "train.log", "wb") as train_log:
            train = subprocess.Popen(
                [sys.executable, "-m", "psctl", "train", *train_args(epochs), "--server", coordinator.address,
                 "--local-workers", "1", "--secret-file", str(secret_path), "--out", str(folder / "live.npz")],
                stdout=subprocess.DEVNULL, stderr=train_log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        job = await _running_job(coordinator.address, shard.address, security, train, timeout_s=60)
        rss_before = rss_bytes(shard.proc.pid)
        plans = make_plans(random.Random(seed), job, n_frames)
        addresses = {"coordinator": coordinator.address, "shard": shard.address}
        tally = Tally()
        started = time.monotonic()

        async def run() -> None:
            for plan in plans:  # one shared iterator: each connection takes the next plan
                await throw(plan, addresses[plan.target], secret, tally)
                if tally.connections % 100 == 0 and shard.proc.poll() is None:
                    tally.rss_samples.append((tally.frames, rss_bytes(shard.proc.pid)))

        await asyncio.gather(*(run() for _ in range(concurrency)))
        fuzz_s = time.monotonic() - started
        overlap = train.poll() is None
        crashed = [name for name, p in (("coordinator", coordinator), ("shard", shard)) if p.proc.poll() is not None]
        waiting_after = await _parked_drained(shard, security) if shard.proc.poll() is None else -1
        rss_after = rss_bytes(shard.proc.pid) if shard.proc.poll() is None else 0
        train_code = await asyncio.to_thread(train.wait, 300)
        train_s = time.monotonic() - train_started
    finally:
        if train is not None and train.poll() is None:
            train.kill()
            train.wait()
        if shard is not None:
            shard.stop()
        coordinator.stop()
    for name, p in (("coordinator", coordinator), ("shard", shard)):
        text = p.log.read_text(errors="replace")
        if "Traceback" in text or "handler for" in text:
            crashed.append(f"{name} log: {text[-2000:]}")
    return FuzzResult(  # the weights are compared with the clean run's by the caller
        seed, tally, fuzz_s, train_s, overlap, train_code, (folder / "train.log").read_text(errors="replace"), crashed,
        float("inf"), -1, rss_before, rss_after, waiting_after, job,
    )  # fmt: skip
