"""Section limits: what this machine can do at all, to set the other sections against.

The issue's reference rows, re-measured here: one-way bulk messages (send N
bytes, get an 8-byte ack) over loopback with blocking sockets, an asyncio
Protocol reading into a preallocated buffer and asyncio streams; and a numpy
copy of 16 MiB.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np

from benchmarks.baseline import (
    BaselineServer,
    BlockingClient,
    ProtocolClient,
    StreamsClient,
)
from benchmarks.common import (
    SectionResult,
    Settings,
    Table,
    interleave_rates,
    median,
    size_label,
)
from benchmarks.dense import protocol_rate, threaded_blocking_rate

FULL_SIZES = [1 << 20, 4 << 20, 16 << 20]
QUICK_SIZES = [4 << 20]
COPY_BYTES = 16 << 20


def numpy_copy_gb_s(n_bytes: int, duration_s: float) -> float:
    src = np.ones(n_bytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        np.copyto(dst, src)
        n += 1
    return n * n_bytes / (time.perf_counter() - start) / 1e9


async def run_limits(settings: Settings) -> SectionResult:
    result = SectionResult("limits")
    sizes = QUICK_SIZES if settings.quick else FULL_SIZES
    table = Table(
        "Limits: one-way bulk messages over loopback (send N bytes, 8-byte ack), one connection",
        ["message", "contender", "msg/s", "GB/s"],
        command=settings.command("limits"),
        notes=[f"Median of {settings.rounds} interleaved rounds of {settings.round_s:g} s per contender."],
    )
    with ExitStack() as stack:
        proto_srv = stack.enter_context(BaselineServer("protocol"))
        blocking_srv = stack.enter_context(BaselineServer("blocking"))
        streams_srv = stack.enter_context(BaselineServer("streams", "uvloop"))
        proto = await ProtocolClient.connect(proto_srv.address)
        streams = await StreamsClient.connect(streams_srv.address)
        blocking = BlockingClient(blocking_srv.address)
        try:
            for n_bytes in sizes:
                calls = [(n_bytes, 0)]
                rates = await interleave_rates(
                    {
                        "blocking sockets": threaded_blocking_rate(blocking, calls),
                        "asyncio Protocol (uvloop), preallocated buffer": protocol_rate(proto, calls),
                        "asyncio streams (uvloop)": protocol_rate(streams, calls),
                    },
                    settings.rounds,
                    settings.round_s,
                )
                for name, runs in rates.items():
                    its = median(runs)
                    table.rows.append([size_label(n_bytes), name, its, its * n_bytes / 1e9])
                    result.figures.setdefault(str(n_bytes), {})[name] = {"msg_s": its, "gb_s": its * n_bytes / 1e9}
        finally:
            proto.close()
            streams.close()
            blocking.close()
    copy = numpy_copy_gb_s(COPY_BYTES, settings.round_s * 2)
    table.rows.append([size_label(COPY_BYTES), "numpy copy (np.copyto), in memory", float("nan"), copy])
    result.figures["numpy_copy_16mib_gb_s"] = copy
    result.tables.append(table)
    return result
