"""Section sparse: keyed pull + push of random rows through real shards, next to the baselines.

One iteration is what a sparse worker does per step: pull the rows of a batch's
unique keys (sorted), push a gradient row per key (and wait for the acks). The
table has TABLE_ROWS float32 values split over the shards by key range; the
baselines move exactly the bytes of the psctl frames over one connection.
"""

from __future__ import annotations

import numpy as np

from benchmarks.baseline import BaselineServer, ProtocolClient
from benchmarks.common import (
    Rate,
    SectionResult,
    Settings,
    Table,
    count_label,
    interleave_rates,
    median,
    ratio,
    step_rate,
)
from benchmarks.dense import frame_bytes, protocol_rate
from benchmarks.harness import BenchCluster, bench_spec
from psctl.cluster.client import ShardClient
from psctl.protocol.wire import Flag, Message, MsgType

TABLE_ROWS = 1 << 24  # 16 M keys, 64 MiB of float32 over the shards
FULL_KEYS = [10_000, 100_000, 1_000_000]
QUICK_KEYS = [10_000, 100_000]
SHARD_COUNTS = (1, 4)


def random_keys(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.unique(rng.integers(0, TABLE_ROWS, size=int(n * 1.02)))[:n].astype(np.int64)


def baseline_calls(job_id: str, keys: np.ndarray) -> list[tuple[int, int]]:
    """(n_in, n_out) of the two baseline calls carrying the bytes of one keyed pull + push (one shard)."""
    values = np.zeros(len(keys), np.float32)
    body = {"job_id": job_id, "tables": ["w"], "clock": 100_000, "keyed": True}
    pull = Message(MsgType.PULL, body, [keys], req_id=1)
    pulled = Message(MsgType.PULL, {"min_clock": 100_000, "clock": 100_000}, [values], req_id=1, flags=Flag.REPLY)
    push = Message(MsgType.PUSH, {**body, "count": 1}, [keys, values], req_id=1)
    acked = Message(MsgType.PUSH, {}, req_id=1, flags=Flag.REPLY)
    return [(frame_bytes(pull) - 16, frame_bytes(pulled) - 8), (frame_bytes(push) - 16, frame_bytes(acked) - 8)]


def psctl_rate(client: ShardClient, keys: np.ndarray) -> Rate:
    grad = np.full(len(keys), 1.0, np.float32)

    async def step(clock: int) -> None:
        plan = client.plan({"w": keys})  # routed once for the pull and the push, as a worker's step does
        await client.pull(plan, clock)
        await client.push({"w": grad}, clock, 1, plan)

    return step_rate(step)


async def run_sparse(settings: Settings) -> SectionResult:
    counts = QUICK_KEYS if settings.quick else FULL_KEYS
    result = SectionResult("sparse")
    table = Table(
        f"Sparse pull + push of random rows (one worker, async mode, a {count_label(TABLE_ROWS)}-key float32 table)",
        ["keys", "contender", "it/s", "M keys/s", "x Protocol"],
        command=settings.command("sparse"),
        notes=[
            "One iteration: pull the rows of N sorted unique random keys, push one gradient value per key, wait for "
            "the acks. M keys/s counts keys once per iteration.",
            "The baseline moves the bytes of the one-shard psctl frames (keys out, values back, keys + values out).",
        ],
    )
    async with BenchCluster(1) as one, BenchCluster(4) as four:
        with BaselineServer("protocol") as proto_server:
            proto = await ProtocolClient.connect(proto_server.address)
            try:
                for n in counts:
                    keys = random_keys(n, seed=n)
                    async with one.job(bench_spec(TABLE_ROWS)) as c1, four.job(bench_spec(TABLE_ROWS)) as c4:
                        contenders = {
                            "psctl, 1 shard": psctl_rate(c1, keys),
                            "psctl, 4 shards": psctl_rate(c4, keys),
                            "asyncio Protocol (uvloop)": protocol_rate(proto, baseline_calls(c1.job_id, keys)),
                        }
                        rates = await interleave_rates(contenders, settings.rounds, settings.round_s)
                    base = median(rates["asyncio Protocol (uvloop)"])
                    result.figures[str(n)] = {name: {"its": median(r), "its_rounds": r} for name, r in rates.items()}
                    for name, runs in rates.items():
                        its = median(runs)
                        table.rows.append([count_label(n), name, its, its * n / 1e6, ratio(its, base)])
            finally:
                proto.close()
    result.tables.append(table)
    head = result.figures.get("100000")
    if head:
        result.figures["headline"] = {"sparse_100k_pullpush_its": head["psctl, 1 shard"]["its"]}
    return result
