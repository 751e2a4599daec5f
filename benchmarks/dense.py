"""Section dense: pull + push of a whole float32 table through real shards, next to the baselines.

One iteration is what a dense worker does per step: pull the table, push a
gradient of the same size (and wait for the ack). The baselines move exactly
the bytes of those four psctl frames, in the same order, over one connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from benchmarks.baseline import (
    BaselineServer,
    BlockingClient,
    ProtocolClient,
    blocking_rate,
)
from benchmarks.common import (
    Rate,
    SectionResult,
    Settings,
    Table,
    count_label,
    interleave_rates,
    median,
    ratio,
    size_label,
    step_rate,
)
from benchmarks.harness import BenchCluster, bench_spec
from psctl.cluster.client import ShardClient
from psctl.protocol.wire import Flag, Message, MsgType, encode

FULL_SIZES = [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
QUICK_SIZES = [1 << 10, 1 << 20]
SHARD_COUNTS = (1, 4)
HEADLINE_SIZE = 1 << 20  # 4 MiB of float32

PSCTL_1 = "psctl, 1 shard"
PSCTL_4 = "psctl, 4 shards"
PROTOCOL = "asyncio Protocol (uvloop)"
BLOCKING = "blocking sockets"


def frame_bytes(msg: Message) -> int:
    return sum(len(memoryview(b).cast("B")) for b in encode(msg))


def baseline_calls(job_id: str, rows: int) -> list[tuple[int, int]]:
    """(n_in, n_out) of the two baseline calls that move the bytes of one psctl pull + push."""
    w = np.zeros(rows, np.float32)
    clock = 100_000  # a typical clock's digits; the body size hardly matters
    pull = Message(MsgType.PULL, {"job_id": job_id, "tables": ["w"], "clock": clock}, req_id=clock)
    pulled = Message(MsgType.PULL, {"min_clock": clock, "clock": clock}, [w], req_id=clock, flags=Flag.REPLY)
    push = Message(MsgType.PUSH, {"job_id": job_id, "tables": ["w"], "clock": clock, "count": 1}, [w], req_id=clock)
    acked = Message(MsgType.PUSH, {}, req_id=clock, flags=Flag.REPLY)
    return [
        (frame_bytes(pull) - 16, frame_bytes(pulled) - 8),
        (frame_bytes(push) - 16, frame_bytes(acked) - 8),
    ]


def psctl_rate(client: ShardClient, rows: int) -> Rate:
    grad = np.full(rows, 1.0, np.float32)

    async def step(clock: int) -> None:
        await client.pull(["w"], clock)
        await client.push({"w": grad}, clock, 1)

    return step_rate(step)


def protocol_rate(client: Any, calls: list[tuple[int, int]]) -> Rate:
    """The baseline's calls carrying one psctl iteration's bytes (any client with ``call``)."""

    async def step(_: int) -> None:
        for n_in, n_out in calls:
            await client.call(n_in, n_out)

    return step_rate(step)


def threaded_blocking_rate(client: BlockingClient, calls: list[tuple[int, int]]) -> Rate:
    async def run(duration_s: float) -> tuple[int, float]:
        return await asyncio.to_thread(blocking_rate, client, calls, duration_s)

    return run


async def run_dense(settings: Settings) -> SectionResult:
    sizes = QUICK_SIZES if settings.quick else FULL_SIZES
    result = SectionResult("dense")
    table = Table(
        "Dense pull + push round trips (one worker, async mode, float32 table)",
        ["values", "table", "contender", "it/s", "GB/s", "x Protocol", "x blocking"],
        command=settings.command("dense"),
        notes=[
            "One iteration: pull the whole table, then push a same-size gradient and wait for its ack. "
            "GB/s counts table bytes both ways (2 x table size per iteration).",
            "Baselines move exactly the bytes of the psctl frames (headers, JSON bodies, array headers) over one "
            "connection to a server process; their clients read into buffers allocated once.",
            f"Median of {settings.rounds} interleaved rounds of {settings.round_s:g} s per contender.",
        ],
    )
    with BaselineServer("protocol") as proto_server, BaselineServer("blocking") as blocking_server:
        async with BenchCluster(1) as one, BenchCluster(4) as four:
            proto = await ProtocolClient.connect(proto_server.address)
            blocking = BlockingClient(blocking_server.address)
            try:
                for rows in sizes:
                    async with one.job(bench_spec(rows)) as c1, four.job(bench_spec(rows)) as c4:
                        calls = baseline_calls(c1.job_id, rows)
                        contenders = {
                            PSCTL_1: psctl_rate(c1, rows),
                            PSCTL_4: psctl_rate(c4, rows),
                            PROTOCOL: protocol_rate(proto, calls),
                            BLOCKING: threaded_blocking_rate(blocking, calls),
                        }
                        rates = await interleave_rates(contenders, settings.rounds, settings.round_s)
                    nbytes = rows * 4
                    per_size = {}
                    for name, runs in rates.items():
                        its = median(runs)
                        gbs = its * 2 * nbytes / 1e9
                        per_size[name] = {"its": its, "gb_s": gbs, "its_rounds": runs}
                        table.rows.append(
                            [
                                count_label(rows),
                                size_label(nbytes),
                                name,
                                its,
                                gbs,
                                ratio(its, median(rates[PROTOCOL])),
                                ratio(its, median(rates[BLOCKING])),
                            ]
                        )
                    result.figures[str(rows)] = per_size
            finally:
                proto.close()
                blocking.close()
    result.tables.append(table)
    head = result.figures.get(str(HEADLINE_SIZE))
    if head:
        result.figures["headline"] = {
            "dense_4mb_pullpush_its": head[PSCTL_1]["its"],
            "dense_4mb_pullpush_4shards_its": head[PSCTL_4]["its"],
            "baseline_protocol_4mb_its": head[PROTOCOL]["its"],
            "baseline_blocking_4mb_its": head[BLOCKING]["its"],
            "dense_4mb_vs_protocol": ratio(head[PSCTL_1]["its"], head[PROTOCOL]["its"]),
        }
    return result
