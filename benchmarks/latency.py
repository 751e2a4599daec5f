"""Section latency: one small request and its reply, psctl's Peer next to plain sockets.

psctl sends a PING carrying a 64-byte array to a shard process, which answers
with the same array. The baselines move exactly the bytes of those two frames.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import numpy as np

from benchmarks.baseline import (
    BaselineServer,
    BlockingClient,
    ProtocolClient,
    StreamsClient,
    blocking_samples,
    new_loop,
)
from benchmarks.common import (
    Sampler,
    SectionResult,
    Settings,
    Table,
    call_samples,
    interleave_samples,
    percentile,
    ratio,
)
from benchmarks.harness import BenchCluster
from psctl import net
from psctl.protocol.wire import Flag, Message, MsgType, encode_bytes

PAYLOAD_BYTES = 64
PSCTL = "psctl Peer (PING to a shard)"
PROTOCOL = "asyncio Protocol (uvloop)"
BLOCKING = "blocking sockets"
STREAMS_UV = "asyncio streams (uvloop)"
STREAMS_DEFAULT = "asyncio streams (default loop)"


def ping_sizes() -> tuple[int, int]:
    """(n_in, n_out) for a baseline call that moves the bytes of a psctl PING and its reply."""
    payload = np.zeros(PAYLOAD_BYTES, np.uint8)
    request = encode_bytes(Message(MsgType.PING, {}, [payload], req_id=1000))
    reply = encode_bytes(Message(MsgType.PING, {}, [payload], req_id=1000, flags=Flag.REPLY))
    return len(request) - 16, len(reply) - 8


def psctl_sampler(peer: net.Peer) -> Sampler:
    payload = np.zeros(PAYLOAD_BYTES, np.uint8)
    return call_samples(lambda: peer.request(MsgType.PING, {}, [payload]))


def async_client_sampler(client: ProtocolClient | StreamsClient, n_in: int, n_out: int) -> Sampler:
    return call_samples(lambda: client.call(n_in, n_out))


def blocking_sampler(client: BlockingClient, n_in: int, n_out: int) -> Sampler:
    async def run(duration_s: float) -> list[float]:
        return await asyncio.to_thread(blocking_samples, client, n_in, n_out, duration_s)

    return run


def default_loop_streams_sampler(address: tuple[str, int], n_in: int, n_out: int) -> Sampler:
    """Streams on asyncio's own loop: a thread runs that loop, so this process's uvloop stays out of it."""

    def in_thread(duration_s: float) -> list[float]:
        async def sample() -> list[float]:
            client = await StreamsClient.connect(address)
            try:
                for _ in range(50):
                    await client.call(n_in, n_out)
                return await async_client_sampler(client, n_in, n_out)(duration_s)
            finally:
                client.close()

        with asyncio.Runner(loop_factory=lambda: new_loop("asyncio")) as runner:
            return runner.run(sample())

    async def run(duration_s: float) -> list[float]:
        return await asyncio.to_thread(in_thread, duration_s)

    return run


async def run_latency(settings: Settings) -> SectionResult:
    result = SectionResult("latency")
    n_in, n_out = ping_sizes()
    with ExitStack() as stack:
        proto_srv = stack.enter_context(BaselineServer("protocol"))
        blocking_srv = stack.enter_context(BaselineServer("blocking"))
        streams_uv_srv = stack.enter_context(BaselineServer("streams", "uvloop"))
        streams_default_srv = stack.enter_context(BaselineServer("streams", "asyncio"))
        async with BenchCluster(1) as cluster:
            peer = await net.connect(cluster.shards[0])
            proto = await ProtocolClient.connect(proto_srv.address)
            streams = await StreamsClient.connect(streams_uv_srv.address)
            blocking = BlockingClient(blocking_srv.address)
            try:
                contenders = {
                    PSCTL: psctl_sampler(peer),
                    PROTOCOL: async_client_sampler(proto, n_in, n_out),
                    BLOCKING: blocking_sampler(blocking, n_in, n_out),
                    STREAMS_UV: async_client_sampler(streams, n_in, n_out),
                    STREAMS_DEFAULT: default_loop_streams_sampler(streams_default_srv.address, n_in, n_out),
                }
                samples = await interleave_samples(contenders, settings.rounds, settings.round_s)
            finally:
                peer.close()
                proto.close()
                streams.close()
                blocking.close()

    p50 = {name: percentile(s, 50) * 1e6 for name, s in samples.items()}
    table = Table(
        f"Small-message round trip ({PAYLOAD_BYTES} B payload; {n_in + 16} B request, {n_out + 8} B reply frames)",
        ["contender", "p50 us", "p99 us", "mean us", "samples", "p50 x Protocol", "p50 x blocking"],
        command=settings.command("latency"),
        notes=[
            "One connection, one request in flight. The server is a separate process on loopback; "
            "the psctl server is a real shard process.",
            f"Samples pooled over {settings.rounds} interleaved rounds of {settings.round_s:g} s per contender.",
        ],
    )
    for name, s in samples.items():
        p99 = percentile(s, 99) * 1e6
        mean = sum(s) / len(s) * 1e6
        table.rows.append([name, p50[name], p99, mean, len(s), ratio(p50[name], p50[PROTOCOL]), ratio(p50[name], p50[BLOCKING])])
        result.figures[name] = {"p50_us": p50[name], "p99_us": p99, "mean_us": mean, "samples": len(s)}
    result.tables.append(table)
    result.figures["headline"] = {
        "small_rtt_p50_us": p50[PSCTL],
        "small_rtt_p99_us": percentile(samples[PSCTL], 99) * 1e6,
        "baseline_small_rtt_p50_us": p50[PROTOCOL],
        "baseline_blocking_small_rtt_p50_us": p50[BLOCKING],
        "small_rtt_vs_protocol": ratio(p50[PSCTL], p50[PROTOCOL]),
    }
    return result
