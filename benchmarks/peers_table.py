"""Issue 17's peers table in one command: every workload with psctl and its peers, in interleaved rounds.

    python -m benchmarks.peers_table [--quick] [--json FILE] [--markdown FILE] [--only ROW,...] [--plain]

Rows (``--only``): dense and dense-2w (4 MiB pull + push, one and two workers), rtt (64 B round trip),
logreg (1M x 100, batch 1000: samples/s and wall time including the CSV), logreg-b100
(batch 100), a9a, hashed (hashed CTR-like rows, with peak memory), mf (MovieLens small).
Each row reuses the code of the section or script that measures it alone (dense.py,
latency.py, peers.py, training.py, quality.py, hashed_vw.py, mf_movielens.py); this
module only runs the contenders of a row in rotating order, round after round, and puts
psctl's figure next to each peer's with the ratio. The peers come with
``pip install -e '.[benchmarks]'``; one that does not import is skipped with a sentence
saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Table, interleave_runs, machine_info, median, percentile, use_this_checkout

ROWS = ("dense", "dense-2w", "rtt", "logreg", "logreg-b100", "a9a", "hashed", "mf")
INSTALL = "pip install -e '.[benchmarks]'"
# A timed round of a peer, its start-up included, normally takes 5-15 s; PyTorch RPC's shared-memory
# transport sometimes never finishes (BENCHMARKS.md, section 6), and that round is then dropped.
PEER_ROUND_TIMEOUT_S = 60.0
# module -> what it brings, for the sentence printed when it does not import
PEER_MODULES = {
    "torch": "PyTorch RPC and gloo",
    "ray": "the Ray actor",
    "sklearn": "scikit-learn",
    "vowpalwabbit": "Vowpal Wabbit",
    "pyspark": "Spark ALS",
}


@dataclass(frozen=True)
class Plan:
    """How big and how many rounds; ``quick`` finishes in about 10 minutes on a loaded 2-core machine."""

    quick: bool
    rounds: int  # timed rows (dense, rtt): rounds of round_s seconds per contender
    round_s: float
    job_rounds: int  # whole-job rows: runs per contender
    logreg_rows: int
    logreg_epochs: int
    gloo_processes: tuple[int, ...]
    hashed_rows: int
    hashed_test_rows: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 2, 1.0, 1, 200_000, 2, (2,), 100_000, 10_000)
        return cls(False, 5, 3.0, 2, 1_000_000, 3, (2, 8), 1_000_000, 100_000)


@dataclass(frozen=True)
class Figure:
    """One contender's figure on one workload (NaN and a note when it did not run)."""

    workload: str
    contender: str
    value: float
    higher_is_better: bool
    note: str = ""
    psctl: bool = False


def assemble(figures: list[Figure]) -> Table:
    """The table: each workload's figures, psctl's first, and how far psctl is ahead of each.

    "psctl x" is psctl's figure over the peer's when higher is better, the peer's over
    psctl's when lower is: above 1, psctl is ahead. A workload without a psctl figure
    gets no ratios.
    """
    table = Table(
        "psctl and its peers (issue 17), same run",
        ["workload", "contender", "figure", "psctl x", "note"],
        notes=["psctl x: above 1 psctl is ahead (faster, less time or memory); below 1 the peer is."],
    )
    for workload in dict.fromkeys(f.workload for f in figures):
        rows = [f for f in figures if f.workload == workload]
        mine = next((f.value for f in rows if f.psctl), float("nan"))
        for f in sorted(rows, key=lambda f: not f.psctl):
            table.rows.append([workload, f.contender, f.value, _ahead(mine, f.value, f.higher_is_better), f.note])
    return table


def _ahead(mine: float, theirs: float, higher_is_better: bool) -> float:
    if not (mine == mine and theirs == theirs) or (mine if not higher_is_better else theirs) == 0:
        return float("nan")
    return mine / theirs if higher_is_better else theirs / mine


def missing(module: str) -> str | None:
    """Why a peer's module cannot be used here, or None."""
    from benchmarks.peers import importable

    if not importable(module):
        return f"{module} is not installed ({INSTALL})"
    if module == "pyspark" and shutil.which("java") is None:
        return "java (17 or newer) is not on the PATH"
    return None


Contender = Callable[[float], Awaitable[Any]]


def whole_job(fn: Callable[[], Any]) -> Contender:
    """A contender whose every run is one whole job, run in a thread (the loop stays free for psctl)."""

    async def run(_: float) -> Any:
        return await asyncio.to_thread(fn)

    return run


async def rounds_of(contenders: dict[str, Contender], rounds: int, round_s: float = 0.0) -> dict[str, list[Any]]:
    """Each contender's result per round; a contender that raises gives its error in place of results."""

    def guarded(run: Contender) -> Contender:
        async def call(duration_s: float) -> Any:
            try:
                return await run(duration_s)
            except subprocess.TimeoutExpired as exc:
                return RuntimeError(f"no result in {exc.timeout:g} s")
            except (Exception, SystemExit) as exc:  # quality.py and friends sys.exit on a failed psctl command
                return RuntimeError(str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__)

        return call

    return await interleave_runs({name: guarded(run) for name, run in contenders.items()}, rounds, round_s)


def figures_of(
    workload: str, results: dict[str, list[Any]], value: Callable[[list[Any]], float], higher_is_better: bool, psctl: str
) -> list[Figure]:
    """A figure per contender from the rounds that finished; the note says how many did not, and why."""
    out = []
    for name, runs in results.items():
        done = [r for r in runs if not isinstance(r, BaseException)]
        failed = [r for r in runs if isinstance(r, BaseException)]
        note = f"{len(failed)} of {len(runs)} rounds failed: {failed[0]}" if failed else ""
        out.append(Figure(workload, name, value(done) if done else float("nan"), higher_is_better, note, name == psctl))
    return out


def skipped(workload: str, contender: str, reason: str, higher_is_better: bool = True) -> Figure:
    return Figure(workload, contender, float("nan"), higher_is_better, reason)


# -- dense 4 MiB and 64 B round trips ------------------------------------------------------


async def row_dense(plan: Plan, n_workers: int) -> list[Figure]:
    """it/s summed over the workers; psctl's and the Protocol baseline's workers share this process's loop."""
    from benchmarks import dense, peers
    from benchmarks.baseline import BaselineServer, ProtocolClient
    from benchmarks.harness import BenchCluster, bench_spec

    workload = f"dense 4 MiB pull + push, {n_workers} worker{'s' * (n_workers > 1)}, it/s"
    psctl = "psctl, 1 shard" + (f", {n_workers} workers on one event loop" if n_workers > 1 else "")

    def summed_its(rates: list[Any]) -> Contender:
        async def run(duration_s: float) -> float:
            return sum(n / elapsed for n, elapsed in await asyncio.gather(*(rate(duration_s) for rate in rates)))

        return run

    def peer_its(args: list[str], pair: bool) -> Contender:
        def run(duration_s: float) -> float:
            timed = [*args, "--seconds", str(duration_s)]
            if pair:  # PyTorch RPC: rank 0 serves, the other ranks are the workers
                return sum(r["its"] for r in peers._run_ranks(timed, n_workers + 1, PEER_ROUND_TIMEOUT_S))
            return peers._run_single([*timed, "--workers", str(n_workers)], PEER_ROUND_TIMEOUT_S)["its"]

        return lambda duration_s: asyncio.to_thread(run, duration_s)

    out: list[Figure] = []
    with BaselineServer("protocol") as server:
        async with BenchCluster(1) as cluster, cluster.workers(bench_spec(dense.HEADLINE_SIZE, n_workers=n_workers)) as clients:
            protos = [await ProtocolClient.connect(server.address) for _ in clients]
            try:
                calls = dense.baseline_calls(clients[0].job_id, dense.HEADLINE_SIZE)
                contenders: dict[str, Contender] = {
                    psctl: summed_its([dense.psctl_rate(c, dense.HEADLINE_SIZE) for c in clients]),
                    "raw asyncio Protocol on uvloop, the same bytes": summed_its([dense.protocol_rate(p, calls) for p in protos]),
                }
                for run in contenders.values():
                    await run(0.2)  # warm-up; each peer warms up in its own process
                out += [skipped(workload, name, reason) for name, reason in _add_peers(contenders, peer_its, rtt=False)]
                results = await rounds_of(contenders, plan.rounds, plan.round_s)
            finally:
                for p in protos:
                    p.close()
    return figures_of(workload, results, median, True, psctl) + out


def _add_peers(contenders: dict[str, Contender], launch: Callable[[list[str], bool], Contender], rtt: bool) -> list[tuple[str, str]]:
    """PyTorch RPC (both transports) and the Ray actor into ``contenders``; (name, why) of each skipped."""
    payload = ["--payload-bytes", "64"] if rtt else []
    plans = [
        ("PyTorch RPC, TensorPipe defaults (shared memory)", "torch", ["torch-rpc", "--transport", "default", *payload], True),
        ("PyTorch RPC, TCP only", "torch", ["torch-rpc", "--transport", "tcp", *payload], True),
        ("Ray actor", "ray", ["ray", *payload], False),
    ]
    out = []
    for name, module, args, pair in plans:
        reason = missing(module)
        if reason:
            out.append((name, reason))
        else:
            contenders[name] = launch(args, pair)
    return out


async def row_rtt(plan: Plan) -> list[Figure]:
    from benchmarks import latency, peers
    from benchmarks.baseline import BaselineServer, ProtocolClient
    from benchmarks.harness import BenchCluster
    from psctl import net

    psctl = "psctl Peer, PING to a shard"

    def peer_samples(args: list[str], pair: bool) -> Contender:
        def run(duration_s: float) -> list[float]:
            launch = peers._run_pair if pair else peers._run_single
            return launch([*args, "--seconds", str(duration_s)], timeout_s=PEER_ROUND_TIMEOUT_S)["samples_s"]

        return lambda duration_s: asyncio.to_thread(run, duration_s)

    def psctl_samples(address: str) -> Contender:
        # A connection per round: a shard drops one that has not said HELLO within a minute,
        # and the peers' rounds, their start-up included, take longer than that.
        async def run(duration_s: float) -> list[float]:
            peer = await net.connect(address)
            try:
                sampler = latency.psctl_sampler(peer)
                await sampler(0.1)  # warm-up
                return await sampler(duration_s)
            finally:
                peer.close()

        return run

    n_in, n_out = latency.ping_sizes()
    skips: list[Figure] = []
    with BaselineServer("protocol") as server:
        async with BenchCluster(1) as cluster:
            proto = await ProtocolClient.connect(server.address)
            try:
                contenders: dict[str, Contender] = {
                    psctl: psctl_samples(cluster.shards[0]),
                    "raw asyncio Protocol on uvloop, the same bytes": latency.async_client_sampler(proto, n_in, n_out),
                }
                for run in contenders.values():
                    await run(0.2)
                for name, reason in _add_peers(contenders, peer_samples, rtt=True):
                    skips += [skipped(f"64 B round trip p{q}, us", name, reason, False) for q in (50, 99)]
                results = await rounds_of(contenders, plan.rounds, plan.round_s)
            finally:
                proto.close()
    out = []
    for q in (50, 99):
        out += figures_of(
            f"64 B round trip p{q}, us", results, lambda runs, q=q: percentile([s for r in runs for s in r], q) * 1e6, False, psctl
        )
    return out + skips


# -- dense logistic regression -------------------------------------------------------------


async def row_logreg(plan: Plan, tmp: Path, batch_size: int) -> list[Figure]:
    from benchmarks import peers, training

    epochs = plan.logreg_epochs if batch_size >= training.BATCH_SIZE else 1  # batch 100 is 10x the steps
    size = f"{plan.logreg_rows / 1e6:g}M x {training.FEATURES}, batch {batch_size}, {epochs} epoch{'s' * (epochs > 1)}"
    rate_workload = f"logreg {size}, samples/s while training"
    wall_workload = f"logreg {size}, wall s including reading the CSV"
    psctl = "psctl train, 8 workers, async"
    path = tmp / f"logreg-{plan.logreg_rows}.csv"
    if not path.exists():
        training.write_csv(path, plan.logreg_rows)
    X, y = training.load_standardized(path)
    prefix = tmp / f"logreg-{plan.logreg_rows}"
    np.save(f"{prefix}-X.npy", X)
    np.save(f"{prefix}-y.npy", y)

    async def psctl_job(_: float) -> dict[str, Any]:
        return await training.run_job(path, tmp, 8, "async", epochs, batch_size)

    def numpy_job() -> dict[str, Any]:
        started = time.perf_counter()
        Xr, yr = training.load_standardized(path)  # psctl's CSV reader: the one a numpy user would pick if fast
        out = training.numpy_sgd(Xr, yr, epochs, batch_size, training.LR)
        return {**out, "wall_s": time.perf_counter() - started}

    contenders: dict[str, Contender] = {psctl: psctl_job, "numpy SGD, one process": whole_job(numpy_job)}
    skips = []
    if batch_size >= training.BATCH_SIZE:
        if missing("sklearn"):
            skips.append(skipped(rate_workload, "scikit-learn LogisticRegression", missing("sklearn") or ""))
        else:
            contenders["scikit-learn LogisticRegression (lbfgs; passes x rows / s)"] = whole_job(lambda: sklearn_logreg(X, y))
    for n in plan.gloo_processes:
        name = f"PyTorch gloo data-parallel, {n} processes"
        if missing("torch"):
            skips.append(skipped(rate_workload, name, missing("torch") or ""))
            continue
        args = ["gloo-logreg", "--data", str(prefix), "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", str(training.LR)]
        contenders[name] = whole_job(lambda args=args, n=n: peers._run_pair(args, world=n, timeout_s=1800))
    results = await rounds_of(contenders, plan.job_rounds)

    def with_accuracy(runs: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in runs])

    out = figures_of(rate_workload, results, lambda runs: with_accuracy(runs, "samples_s"), True, psctl)
    accuracies = {name: runs[-1].get("accuracy") for name, runs in results.items() if not isinstance(runs[-1], BaseException)}
    out = [Figure(**{**asdict(f), "note": f.note or (f"accuracy {accuracies[f.contender]:.3f}" if accuracies.get(f.contender) else "")})
           for f in out]  # fmt: skip
    if batch_size < training.BATCH_SIZE:
        return out + skips
    walls = {name: runs for name, runs in results.items() if name in (psctl, "numpy SGD, one process")}
    out += figures_of(wall_workload, walls, lambda runs: with_accuracy(runs, "wall_s"), False, psctl)
    return out + skips


def sklearn_logreg(X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    model = LogisticRegression().fit(X, y)
    seconds = time.perf_counter() - started
    passes = int(model.n_iter_[0])
    return {"samples_s": passes * len(y) / seconds, "seconds": seconds, "accuracy": float(model.score(X, y)), "passes": passes}


# -- sparse: a9a and hashed CTR-like rows ------------------------------------------------------


async def row_a9a(plan: Plan, tmp: Path, shared: Path) -> list[Figure]:
    from benchmarks import quality

    row = next(r for r in quality.ROWS if r.key == "a9a")
    workload = "a9a -> a9a.t logistic regression, train s"
    found = quality.files(row, tmp, shared)
    if isinstance(found, str):
        return [skipped(workload, "psctl train logreg, 8 workers, defaults", found, False)]
    train, test = found
    psctl = "psctl train logreg, 8 workers, defaults"
    contenders: dict[str, Contender] = {psctl: whole_job(lambda: quality.run_psctl(row, "sync", train, test, tmp, 8))}
    skips = []
    for module, name, fn in (
        ("vowpalwabbit", "Vowpal Wabbit, one pass (reading included)", lambda: vw_libsvm(train, test)),
        ("sklearn", "scikit-learn LogisticRegression (fit only)", lambda: quality.run_peer(row, train, test, tmp)),
    ):
        if missing(module):
            skips.append(skipped(workload, name, missing(module) or "", False))
        else:
            contenders[name] = whole_job(fn)
    results = await rounds_of(contenders, plan.job_rounds)
    out = figures_of(workload, results, lambda runs: median([r["seconds"] for r in runs]), False, psctl)
    notes = {n: f"test accuracy {runs[-1]['value']:.3f}" for n, runs in results.items() if isinstance(runs[-1], dict)}
    return [Figure(**{**asdict(f), "note": f.note or notes.get(f.contender, "")}) for f in out] + skips


def vw_libsvm(train: Path, test: Path) -> dict[str, Any]:
    """Vowpal Wabbit's logistic loss, its defaults otherwise, one pass over a LIBSVM file; test accuracy."""
    from vowpalwabbit import Workspace

    def line(text: str) -> tuple[float, str]:
        label, _, features = text.strip().partition(" ")
        return float(label), f"{'1' if float(label) > 0 else '-1'} |f {features}"

    started = time.monotonic()
    vw = Workspace("--loss_function logistic --link logistic -b 18 --quiet")
    with open(train) as fh:
        for text in fh:
            vw.learn(line(text)[1])
    right = total = 0
    with open(test) as fh:
        for text in fh:
            label, example = line(text)
            right += (vw.predict(example) >= 0.5) == (label > 0)
            total += 1
    seconds = time.monotonic() - started
    vw.finish()
    return {"value": right / total, "seconds": seconds}


class TreeMemory(threading.Thread):
    """The largest summed PSS (and summed RSS) of this process and all its descendants, sampled
    every 50 ms. PSS (proportional set size, ``/proc/PID/smaps_rollup``) counts a page shared
    by n processes as 1/n in each, so the fork server's imports, which its children share
    copy-on-write, count once; summed RSS counts them once per process (smem's reasoning)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_bytes = 0  # PSS
        self.peak_rss_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss, pss = tree_memory_bytes(os.getpid())
            self.peak_bytes, self.peak_rss_bytes = max(self.peak_bytes, pss), max(self.peak_rss_bytes, rss)
            self.stop.wait(0.05)

    def __enter__(self) -> TreeMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def tree_memory_bytes(root: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) of ``root`` and its descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    rss = pss = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:  # gone meanwhile
            continue
    return rss, pss


def measured(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``'s result with the process tree's peak memory above where it started: PSS in
    ``peak_mb``, summed RSS in ``peak_rss_mb``."""

    def run() -> Any:
        rss_before, pss_before = tree_memory_bytes(os.getpid())
        with TreeMemory() as memory:
            out = fn()
        if isinstance(out, dict):
            out = {**out, "peak_mb": (memory.peak_bytes - pss_before) / 1e6, "peak_rss_mb": (memory.peak_rss_bytes - rss_before) / 1e6}
        return out

    return run


async def row_hashed(plan: Plan, tmp: Path) -> list[Figure]:
    from benchmarks import hashed_vw

    rows = f"{plan.hashed_rows / 1e6:g}M rows" if plan.hashed_rows >= 1_000_000 else f"{plan.hashed_rows // 1000}k rows"
    time_workload = f"hashed CTR-like, {rows} x 26 categorical, 1 epoch, train s"
    memory_workload = f"hashed CTR-like, {rows}, peak memory (PSS) of the process tree above its start, MB"
    psctl = "psctl train logreg, 8 workers, defaults"
    vw_name = "Vowpal Wabbit, one pass"
    if missing("vowpalwabbit"):
        peer_skip = [skipped(time_workload, vw_name, missing("vowpalwabbit") or "", False)]
    else:
        peer_skip = []
    train_path, test_path = hashed_vw.make_data(tmp, plan.hashed_rows, plan.hashed_test_rows)
    train, test = hashed_vw.read_rows(train_path), hashed_vw.read_rows(test_path)
    contenders: dict[str, Contender] = {
        psctl: whole_job(measured(lambda: hashed_vw.run_psctl("sync", train_path, test_path, tmp, 8)))
    }
    if not peer_skip:
        contenders[vw_name] = whole_job(measured(lambda: hashed_vw.run_vw(train, test)))
    results = await rounds_of(contenders, plan.job_rounds)
    out = figures_of(time_workload, results, lambda runs: median([r["seconds"] for r in runs]), False, psctl)
    notes = {n: f"held-out log loss {runs[-1]['log_loss']:.4f}" for n, runs in results.items() if isinstance(runs[-1], dict)}
    out = [Figure(**{**asdict(f), "note": f.note or notes.get(f.contender, "")}) for f in out]
    memory = figures_of(memory_workload, results, lambda runs: max(r["peak_mb"] for r in runs), False, psctl)
    rss = {n: max(r["peak_rss_mb"] for r in runs if isinstance(r, dict)) for n, runs in results.items()
           if any(isinstance(r, dict) for r in runs)}  # fmt: skip
    out += [Figure(**{**asdict(f), "note": f.note or (f"summed RSS {rss[f.contender]:,.0f} MB" if f.contender in rss else "")})
            for f in memory]  # fmt: skip
    return out + peer_skip


# -- matrix factorization -------------------------------------------------------------------


async def row_mf(plan: Plan, tmp: Path, shared: Path) -> list[Figure]:
    from benchmarks import mf_movielens, quality

    workload = "MovieLens small mf, end to end s"
    psctl = "psctl train mf, 8 workers, tuned flags (mf_movielens.py)"
    source = shared / mf_movielens.DEFAULT_DATA.relative_to(quality.SHARED)
    if not source.is_file():
        return [skipped(workload, psctl, f"MovieLens not found at {source}", False)]
    train, test = mf_movielens.split(source, tmp)
    flags = argparse.Namespace(workers=8, rank=10, epochs=30, batch_size=512, l2=0.1, staleness=2)
    spark = "Spark ALS local[2], rank 10, maxIter 10"
    defaults = "psctl train mf, 8 workers, default flags (goal 5)"
    contenders: dict[str, Contender] = {
        psctl: whole_job(lambda: mf_movielens.psctl_mode("sync", train, test, tmp, flags)),
        defaults: whole_job(lambda: mf_movielens.psctl_mode("sync", train, test, tmp, flags, defaults=True)),
    }
    skips = []
    if missing("pyspark"):
        skips.append(skipped(workload, spark, missing("pyspark") or "", False))
    else:
        contenders[spark] = whole_job(lambda: mf_movielens.spark_als(train, test, [(10, 0.1)])[0])
    results = await rounds_of(contenders, plan.job_rounds)
    out = figures_of(workload, results, lambda runs: median([r["seconds"]["total"] for r in runs]), False, psctl)
    notes = {n: f"test RMSE {runs[-1]['rmse']:.3f}" for n, runs in results.items() if isinstance(runs[-1], dict)}
    seconds = {f.contender: f.value for f in out}
    if defaults in notes and spark in seconds:  # goal 5: default flags in at most 0.25x Spark's time, to RMSE 0.86
        notes[defaults] += f"; {seconds[defaults] / seconds[spark]:.2f}x Spark's time (goal: at most 0.25x, RMSE at most 0.86)"
    return [Figure(**{**asdict(f), "note": f.note or notes.get(f.contender, "")}) for f in out] + skips


# -- the command ------------------------------------------------------------------------------


async def run_rows(plan: Plan, rows: list[str], tmp: Path, shared: Path, out: Any) -> list[Figure]:
    """Every row's figures; each row's table is printed as soon as it is done (a long run stopped keeps them)."""
    runners: dict[str, Callable[[], Awaitable[list[Figure]]]] = {
        "dense": lambda: row_dense(plan, 1),
        "dense-2w": lambda: row_dense(plan, 2),
        "rtt": lambda: row_rtt(plan),
        "logreg": lambda: row_logreg(plan, tmp, 1000),
        "logreg-b100": lambda: row_logreg(plan, tmp, 100),
        "a9a": lambda: row_a9a(plan, tmp, shared),
        "hashed": lambda: row_hashed(plan, tmp),
        "mf": lambda: row_mf(plan, tmp, shared),
    }
    figures: list[Figure] = []
    for name in rows:
        started = time.perf_counter()
        got = await runners[name]()
        out.table(assemble(got))
        out.line(f"({name}: {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f})")
        figures += got
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers_table", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smaller data, 2 timed rounds, 1 run per whole job: about 10 min on a loaded 2-core machine")
    p.add_argument("--only", metavar="ROW,...", help=f"rows, comma-separated: {','.join(ROWS)}")
    p.add_argument("--json", metavar="FILE", help="write every figure, the machine and the load as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    p.add_argument("--shared", type=Path, metavar="DIR", help="the data sets folder with a9a and MovieLens (default: shared/data beside the repository)")
    p.add_argument("--plain", action="store_true", help="plain-text table even when rich is importable")
    args = p.parse_args(argv)
    rows = [r for r in (args.only or ",".join(ROWS)).split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    use_this_checkout()
    from benchmarks.__main__ import Printer, _finite, _json_default
    from benchmarks.quality import SHARED
    from psctl import net

    out = Printer(args.plain)
    plan = Plan.make(args.quick)
    machine = machine_info()
    machine["peers"] = peer_versions()
    out.line(f"peers table{' (quick)' if plan.quick else ''}: {machine['nproc']} CPUs ({machine['cpu_model']}), "
             f"Python {machine['python']}, psctl {machine.get('git_commit')}, peers {machine['peers']}")  # fmt: skip
    for module in PEER_MODULES:
        if missing(module):
            out.line(f"{PEER_MODULES[module]} skipped: {missing(module)}.")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="psctl-peers-"))
    try:
        figures = net.run(lambda: run_rows(plan, rows, tmp, args.shared or SHARED, out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = assemble(figures)
    table.command = "python -m benchmarks.peers_table" + (" --quick" if plan.quick else "") + (f" --only {args.only}" if args.only else "")
    out.table(table)
    total_s = time.perf_counter() - started
    out.line(f"total {total_s:.0f} s, load at the end {os.getloadavg()}")
    if args.json:
        doc = {"command": table.command, "plan": asdict(plan), "total_s": total_s,
               "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
               "figures": [asdict(f) for f in figures], "table": table.to_json()}  # fmt: skip
        Path(args.json).write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table.to_markdown())
    return 0


def peer_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("torch", "ray", "vowpalwabbit", "pyspark", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


if __name__ == "__main__":
    sys.exit(main())
