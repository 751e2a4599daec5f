"""What TLS costs on the data plane: a 4 MB pull plus a 4 MB push, with and without TLS.

Run from the repository root (needs the openssl command, or the cryptography
package, for a throwaway certificate):

    python benchmarks/tls_cost.py [--mib 4] [--steps 50] [--rounds 5]

Each mode starts an embedded cluster on loopback (a coordinator in this
process, one shard process), both with a shared secret, submits a one-worker
async job with one float32 table of the given size, and times steps of
pull (whole table) + push (a gradient of the same size) from this process,
which plays the worker. Rounds alternate between the modes. It prints, per
mode, the best round's median time per step and the CPU time per step of
the worker and the shard together, then both ratios TLS/plain. On a busy
machine the wall-clock ratio wanders; the CPU ratio is the steadier measure
of what TLS costs. The handshake happens once per connection, outside the
timed loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from psctl import net  # noqa: E402
from psctl.cluster.client import ShardClient  # noqa: E402
from psctl.cluster.launch import LocalCluster  # noqa: E402
from psctl.cluster.session import Session  # noqa: E402
from psctl.protocol.wire import MsgType  # noqa: E402
from tests.certs import self_signed_cert  # noqa: E402


class Setup:
    """One embedded cluster with one shard and this process as the job's worker."""

    def __init__(self, security: net.Security, rows: int):
        self.security, self.rows = security, rows
        self.max_frame_bytes = rows * 4 + (1 << 20)
        self.grad = np.random.default_rng(0).standard_normal(rows).astype(np.float32)
        self.clock = 0

    async def __aenter__(self) -> Setup:
        self.cluster = LocalCluster(max_frame_bytes=self.max_frame_bytes, security=self.security)
        address = await self.cluster.start_coordinator()
        await self.cluster.start_shards(1, address)
        spec = {
            "model": "bench", "n_workers": 1, "tables": [{"name": "w", "rows": self.rows}], "mode": "async",
            "staleness": 0, "optimizer": {"name": "sgd", "params": {"lr": 0.001}}, "partitions": [{}],
        }  # fmt: skip
        frames = {"max_frame_bytes": self.max_frame_bytes, "security": self.security}
        self.driver = await Session.open(address, keep_events=False, **frames)
        self.control = await Session.open(address, **frames)  # heartbeats from its thread
        submitted = await self.driver.submit(spec, timeout_s=60)
        placed = (await self.driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=60)).body
        reg = await self.control.register_worker({"pid": 0, "host": "bench"}, timeout_s=60)
        self.worker = await ShardClient.connect(
            placed["shards"], placed["ranges"], submitted["job_id"], {"role": "worker", "worker_id": 0, "session": reg["session"]},
            max_frame_bytes=self.max_frame_bytes, security=self.security,
        )  # fmt: skip
        return self

    async def round(self, steps: int) -> tuple[float, float]:
        """Median wall seconds of ``steps`` pull + push steps, and CPU seconds per step
        (this process plus the shard's: CPU time barely moves when others load the machine)."""
        times = []
        cpu_before = time.process_time() + self._shard_cpu_s()
        for _ in range(steps):
            started = time.perf_counter()
            await self.worker.pull(["w"], self.clock)
            await self.worker.push({"w": self.grad}, self.clock, 1)
            times.append(time.perf_counter() - started)
            self.clock += 1
        cpu_s = time.process_time() + self._shard_cpu_s() - cpu_before
        return statistics.median(times), cpu_s / steps

    def _shard_cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.cluster.children[0].proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")  # no /proc: CPU time is not reported
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    async def __aexit__(self, *exc: object) -> None:
        self.worker.close()
        self.control.close()
        self.driver.close()
        await self.cluster.stop()


async def main(mib: float, steps: int, rounds: int) -> int:
    rows = int(mib * (1 << 20)) // 4
    with tempfile.TemporaryDirectory(prefix="psctl-tls-") as folder:
        made = self_signed_cert(Path(folder))
        if made is None:
            print("needs the openssl command or the cryptography package for a test certificate", file=sys.stderr)
            return 2
        cert, key = (str(p) for p in made)
        secret = secrets.token_hex(32).encode()
        plain = net.Security(secret=secret)
        tls = net.Security(secret=secret, tls=net.TlsConfig(cert, key, cert))
        wall: dict[str, list[float]] = {"plain": [], "tls": []}
        cpu: dict[str, list[float]] = {"plain": [], "tls": []}
        async with Setup(plain, rows) as a, Setup(tls, rows) as b:
            setups = {"plain": a, "tls": b}
            for n in range(rounds + 1):  # rounds alternate, so a change in machine load hits both
                for name, setup in setups.items():
                    wall_s, cpu_s = await setup.round(steps)
                    if n:  # round 0 warms up
                        wall[name].append(wall_s)
                        cpu[name].append(cpu_s)
    size = rows * 4 / (1 << 20)
    for name in wall:
        best = min(wall[name])
        print(
            f"{name:5s}: {size:g} MiB pull + {size:g} MiB push: best round {best * 1e3:6.2f} ms per step "
            f"({2 * size / best:5.0f} MiB/s), CPU {statistics.median(cpu[name]) * 1e3:6.2f} ms per step; "
            f"round medians {', '.join(f'{m * 1e3:.1f}' for m in wall[name])} ms"
        )
    print(f"TLS/plain time per step (best rounds): {min(wall['tls']) / min(wall['plain']):.2f}")
    print(f"TLS/plain CPU per step (worker + shard): {statistics.median(cpu['tls']) / statistics.median(cpu['plain']):.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=4.0, help="table size in MiB (float32)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds after one warm-up round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the in-process coordinator notes the worker leaving first
    sys.exit(net.run(lambda: main(args.mib, args.steps, args.rounds)))
