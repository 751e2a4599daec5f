"""Where the time goes: sample the processes of one benchmark scenario with py-spy.

    python -m benchmarks.profile dense|small|train [--seconds S] [--top N] [--native] [--out DIR]

``dense`` runs 4 MiB pull + push against one shard, ``small`` 64-byte PINGs,
``train`` logistic regression with 8 workers in async mode; py-spy (``pip
install py-spy``; not a psctl dependency) samples this process (the client or
driver, and the in-process coordinator), a shard and, for ``train``, a worker.
Each process gets a summary: the functions most often on top of the stack
(self time) and the psctl functions most often anywhere on it (inclusive).
Without py-spy, ``dense`` and ``small`` fall back to cProfile of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO
from benchmarks.harness import BenchCluster, bench_spec


def py_spy() -> str | None:
    return shutil.which("py-spy")


def start_sampler(pid: int, seconds: float, out: Path, native: bool) -> subprocess.Popen[bytes]:
    cmd = [py_spy() or "py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw", "-o", str(out), "-r", "200"]
    if native:
        cmd.append("--native")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(raw: Path, top: int) -> str:
    """Self and inclusive sample shares from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_counts[_short(frames[-1])] += n
        for frame in set(frames):
            if "psctl/" in frame or "benchmarks/" in frame:
                incl[_short(frame)] += n
    if not total:
        return f"{raw.name}: no samples\n"
    lines = [f"{raw.stem}: {total} samples", "  self (on top of the stack):"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in self_counts.most_common(top)]
    lines.append("  inclusive, psctl and benchmark code:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """'func (/long/path/psctl/wire.py:123)' -> 'func (psctl/wire.py:123)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/psctl/", "/benchmarks/", "/site-packages/", "/lib/python3"):
        if marker in where:
            where = marker.strip("/").split("/")[-1] + "/" + where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


async def dense_or_small(kind: str, seconds: float, out_dir: Path, native: bool, top: int) -> str:
    from psctl.protocol.wire import MsgType

    report = []
    async with BenchCluster(1) as cluster:
        shard_pid = cluster.cluster.children[0].proc.pid
        async with cluster.job(bench_spec(1 << 20)) as client:
            grad = np.ones(1 << 20, np.float32)
            payload = np.zeros(64, np.uint8)
            peer = client.peers[0]
            clock = 0

            async def step() -> None:
                nonlocal clock
                if kind == "dense":
                    await client.pull(["w"], clock)
                    await client.push({"w": grad}, clock, 1)
                    clock += 1
                else:
                    await peer.request(MsgType.PING, {}, [payload])

            for _ in range(20):
                await step()
            samplers = []
            profiler = None
            if py_spy():
                samplers = [
                    start_sampler(os.getpid(), seconds, out_dir / f"{kind}-client.txt", native),
                    start_sampler(shard_pid, seconds, out_dir / f"{kind}-shard.txt", native),
                ]
                await asyncio.sleep(0.3)  # let py-spy attach before the measured loop
            else:
                profiler = cProfile.Profile()
                profiler.enable()
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds + 0.3:
                await step()
                n += 1
            rate = n / (time.perf_counter() - start)
            report.append(f"{kind}: {rate:,.0f} it/s while sampled (sampling slows it)")
            if profiler is not None:
                profiler.disable()
                stats = pstats.Stats(profiler, stream=sys.stdout)
                stats.sort_stats("tottime").print_stats(top)
            for s in samplers:
                await asyncio.to_thread(s.wait)
    for name in (f"{kind}-client.txt", f"{kind}-shard.txt"):
        if (out_dir / name).exists():
            report.append(summarize(out_dir / name, top))
    return "\n".join(report)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def train_8w(seconds: float, out_dir: Path, native: bool, top: int) -> str:
    """8 async workers on 1M x 100: py-spy on a worker, a shard and this process; CPU time of every process."""
    from benchmarks.training import write_csv
    from psctl import net
    from psctl.apps.train import TrainConfig, train
    from psctl.protocol.wire import MsgType

    path = write_csv(out_dir / "train.csv", 1_000_000)
    events: list[tuple[float, dict[str, Any]]] = []
    samplers: list[subprocess.Popen[bytes]] = []
    roles: dict[int, str] = {}
    cpu: dict[str, dict[int, tuple[float, float]]] = {}

    async def attach(address: str) -> None:
        peer = await net.connect(address)
        try:
            status = (await peer.request(MsgType.STATUS)).body
        finally:
            peer.close()
        roles[os.getpid()] = "driver + coordinator"
        for e in (e for _, e in events if e["kind"] == "worker_joined"):
            roles[int(e["pid"])] = f"worker {e['worker_id']}"
        for shard in status["shards"]:
            roles[int(shard["pid"])] = f"shard {shard['shard_id']}"
        cpu["start"] = {pid: cpu_seconds(pid) for pid in roles}
        cpu["start_t"] = {0: (time.perf_counter(), 0.0)}
        if py_spy():
            worker = next(pid for pid, role in roles.items() if role.startswith("worker"))
            shard = next(pid for pid, role in roles.items() if role.startswith("shard"))
            for name, pid in (("train-driver", os.getpid()), ("train-worker", worker), ("train-shard", shard)):
                samplers.append(start_sampler(pid, seconds, out_dir / f"{name}.txt", native))

    def on_event(e: dict[str, Any]) -> None:
        events.append((time.perf_counter(), e))
        if e["kind"] == "progress" and not cpu:
            cpu["pending"] = {}
            address = next(x["address"] for _, x in events if x["kind"] == "cluster_up")
            asyncio.get_running_loop().create_task(attach(address))
        if e["kind"] == "progress" and "start" in cpu and e.get("worker_id") is not None:
            try:  # the last progress before training ends: every process is still alive
                cpu["end"] = {pid: cpu_seconds(pid) for pid in roles}
                cpu["end_t"] = {0: (time.perf_counter(), 0.0)}
            except (OSError, IndexError):
                pass

    cfg = TrainConfig(
        model="logreg", data=str(path), workers=8, mode="async", epochs=3, batch_size=1000, lr=0.1, out=str(out_dir / "m.npz")
    )
    await train(cfg, on_event)
    for s in samplers:
        await asyncio.to_thread(s.wait)
    report = [f"train: done in {next(e for _, e in events if e['kind'] == 'done')['seconds']:.1f} s"]
    if "start" in cpu and "end" in cpu:
        wall = cpu["end_t"][0][0] - cpu["start_t"][0][0]
        report.append(f"CPU while training ({wall:.2f} s wall, {os.cpu_count()} CPUs; share = CPU s / wall s):")
        totals = {"user": 0.0, "sys": 0.0}
        for pid, role in sorted(roles.items(), key=lambda kv: kv[1]):
            (u0, s0), (u1, s1) = cpu["start"][pid], cpu["end"].get(pid, cpu["start"][pid])
            totals["user"] += u1 - u0
            totals["sys"] += s1 - s0
            report.append(f"  {role:22s} user {u1 - u0:6.2f} s  sys {s1 - s0:6.2f} s  ({(u1 - u0 + s1 - s0) / wall:4.0%} of a CPU)")
        report.append(f"  {'all':22s} user {totals['user']:6.2f} s  sys {totals['sys']:6.2f} s")
    for name in ("train-driver", "train-worker", "train-shard"):
        if (out_dir / f"{name}.txt").exists():
            report.append(summarize(out_dir / f"{name}.txt", top))
    return "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=("dense", "small", "train"))
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames too (slower sampling)")
    p.add_argument("--out", help="keep py-spy's raw stacks in this folder")
    args = p.parse_args(argv)
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    from psctl import net

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="psctl-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not py_spy():
        print("py-spy not found (pip install py-spy); dense/small fall back to cProfile of this process only")
    try:
        if args.scenario == "train":
            print(net.run(lambda: train_8w(args.seconds, out_dir, args.native, args.top)))
        else:
            print(net.run(lambda: dense_or_small(args.scenario, args.seconds, out_dir, args.native, args.top)))
    finally:
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
