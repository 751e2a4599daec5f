"""Section scale (issue 17, goal 7): what adding workers, shards or rows costs a job on one machine.

Every figure comes from a real ``psctl train logreg FILE --workers W --shards S --mode async``
run as its own process tree (the embedded cluster), on the synthetic CSV of
:func:`benchmarks.training.write_csv`. Three tables:

- workers 1, 2, 4, 8, 16 at the default 2 shards;
- shards 1, 2, 4 at 8 workers, each both placed as psctl places it (``--min-shard-bytes``
  default: this model is a few hundred bytes, so on one shard) and spread over every shard
  (``--min-shard-bytes 0``), which is what a model of more than 256 KiB per shard gets;
- rows 50k to 1M at 8 workers and 2 shards: wall time, and whether it grows linearly.

samples/s is every epoch's samples over the seconds from the job's submission to the end of
its last epoch (the model file's history), so it leaves out the cluster's start and the
driver's planning but holds each worker's read of its partition, as the job's users see it.
(The rate over epochs 2.. alone misleads in async mode: an epoch ends when its slowest worker
finishes it, and a worker that started late then trains its last epochs alone.) wall is the whole command,
CPU is the process tree's user + system seconds (``RUSAGE_CHILDREN``: the command reaps its cluster).
Configurations are interleaved round by round and each figure is the median over the rounds.
Each table ends with a one-line reading: where it stops scaling.

    python -m benchmarks --only scale [--quick]
    python -m benchmarks.scale [--quick] [--tables workers,shards,rows] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Clock, SectionResult, Settings, Table, child_env, count_label, machine_info, median, python, ratio
from benchmarks.training import write_csv

WORKERS = (1, 2, 4, 8, 16)
SHARDS = (1, 2, 4)
TABLES = ("workers", "shards", "rows")
SLOWER_AT_MOST = 0.10  # the goal: adding workers or shards makes a job at most 10% slower
RUN_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Plan:
    rows: int  # the workers and shards tables' file
    features: int
    epochs: int
    batch_size: int
    sizes: tuple[int, ...]  # the rows table
    rounds: int


FULL = Plan(rows=500_000, features=50, epochs=3, batch_size=100, sizes=(50_000, 200_000, 500_000, 1_000_000), rounds=3)
QUICK = Plan(rows=200_000, features=20, epochs=3, batch_size=100, sizes=(50_000, 100_000, 200_000), rounds=1)


@dataclass(frozen=True)
class Config:
    rows: int
    workers: int
    shards: int
    spread: bool = False  # --min-shard-bytes 0: the tables over every shard

    def label(self) -> str:
        return f"{count_label(self.rows)} rows, {self.workers} workers, {self.shards} shards{' spread' if self.spread else ''}"


def train_args(csv: Path, out: Path, c: Config, plan: Plan) -> list[str]:
    return ["-m", "psctl", "train", "logreg", str(csv), "--workers", str(c.workers), "--shards", str(c.shards),
            "--mode", "async", "--epochs", str(plan.epochs), "--batch-size", str(plan.batch_size), "--out", str(out),
            *(["--min-shard-bytes", "0"] if c.spread else [])]  # fmt: skip


def run_one(csv: Path, folder: Path, c: Config, plan: Plan) -> dict[str, float]:
    """One ``psctl train``: wall, CPU of its process tree, training samples/s, accuracy, worker memory."""
    from psctl.files import modelfile

    out = folder / "scale.npz"
    log = folder / "scale.log"
    clock = Clock()
    with open(log, "wb") as err:
        proc = subprocess.Popen([python(), *train_args(csv, out, c, plan)], stdout=subprocess.DEVNULL, stderr=err, env=child_env())
    try:
        proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{c.label()}: psctl train did not finish within {RUN_TIMEOUT_S:g} s") from None
    wall = clock()
    if proc.returncode != 0:
        raise RuntimeError(f"{c.label()}: psctl train exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
    _, meta = modelfile.load_model(str(out))
    epochs = meta["history"]["epochs"]  # each stamped with the seconds since the job was submitted
    worker_peaks = [int(w.get("peak_rss_bytes", 0)) for w in meta["metrics"].get("worker_memory", []) if w.get("peak_rss_bytes")]
    return {
        "wall_s": wall,
        "samples_s": sum(e["samples"] for e in epochs) / epochs[-1]["seconds"],
        "first_epoch_s": epochs[0]["seconds"],
        "accuracy": float(epochs[-1]["metrics"].get("accuracy", float("nan"))),
        "worker_peak_mib": median([p / 2**20 for p in worker_peaks]) if worker_peaks else float("nan"),
    }


class CpuClock:
    """The CPU seconds of this process's reaped children, read before and after each run."""

    def __init__(self) -> None:
        import resource

        self._resource = resource

    def read(self) -> float:
        ru = self._resource.getrusage(self._resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime


def measure(configs: list[Config], csvs: dict[int, Path], folder: Path, plan: Plan, say: Any) -> dict[Config, dict[str, float]]:
    """Every configuration once per round, interleaved; the median of each figure."""
    cpu = CpuClock()
    runs: dict[Config, list[dict[str, float]]] = {c: [] for c in configs}
    for r in range(plan.rounds):
        for c in configs:
            before = cpu.read()
            figures = run_one(csvs[c.rows], folder, c, plan)
            figures["cpu_s"] = cpu.read() - before  # the command reaps its cluster, so its tree is in here
            runs[c].append(figures)
            say(f"  round {r + 1}/{plan.rounds}: {c.label()}: {figures['samples_s']:,.0f} samples/s, wall {figures['wall_s']:.1f} s, "
                f"CPU {figures['cpu_s']:.1f} s")  # fmt: skip
    return {c: {k: median([f[k] for f in fs]) for k in fs[0]} | {"rounds": len(fs)} for c, fs in runs.items()}


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.0f}%"


def workers_table(plan: Plan, m: dict[Config, dict[str, float]], cfgs: list[Config]) -> Table:
    best_so_far = 0.0
    table = Table(f"Workers: {count_label(plan.rows)} rows x {plan.features}, 2 shards, async, batch {plan.batch_size}",
                  ["workers", "samples/s", "x 1 worker", "x best of fewer", "s to epoch 1", "wall s", "CPU s", "worker peak RSS MiB",
                   "accuracy"])  # fmt: skip
    worst: tuple[float, int] = (float("inf"), 0)
    for c in cfgs:
        f = m[c]
        vs_fewer = ratio(f["samples_s"], best_so_far) if best_so_far else float("nan")
        if best_so_far and vs_fewer < worst[0]:
            worst = (vs_fewer, c.workers)
        table.rows.append([c.workers, f["samples_s"], ratio(f["samples_s"], m[cfgs[0]]["samples_s"]), vs_fewer,
                           f["first_epoch_s"], f["wall_s"], f["cpu_s"], f["worker_peak_mib"], f["accuracy"]])  # fmt: skip
        best_so_far = max(best_so_far, f["samples_s"])
    peak = max(cfgs, key=lambda c: m[c]["samples_s"])
    reading = f"Most samples/s at {peak.workers} workers ({os.cpu_count()} cores here)"
    if worst[1]:
        reading += f"; the worst step is {worst[1]} workers at {_pct(worst[0])} against the best of fewer"
        reading += " (within the goal's 10%)" if worst[0] >= 1 - SLOWER_AT_MOST else " (past the goal's 10%)"
    first, last = m[cfgs[0]], m[cfgs[-1]]
    reading += (f". A worker's peak RSS is {first['worker_peak_mib']:.0f} MiB with {cfgs[0].workers} worker(s) and "
                f"{last['worker_peak_mib']:.0f} MiB with {cfgs[-1].workers}, whose partitions are "
                f"{cfgs[-1].workers // cfgs[0].workers}x smaller: "
                + ("it falls with the partition, down to the interpreter's base" if last["worker_peak_mib"] < first["worker_peak_mib"]
                   else "it does not fall with the partition"))  # fmt: skip
    table.notes.append(reading + ".")
    return table


def shards_table(plan: Plan, m: dict[Config, dict[str, float]], cfgs: list[Config]) -> Table:
    table = Table(f"Shards: {count_label(plan.rows)} rows x {plan.features}, 8 workers, async, batch {plan.batch_size}",
                  ["shards", "tables on", "samples/s", "x 1 shard", "wall s", "x 1 shard wall", "CPU s"])  # fmt: skip
    one = next(c for c in cfgs if c.shards == 1 and not c.spread)
    worst = {False: float("inf"), True: float("inf")}  # the fewest samples/s against 1 shard, of more shards
    for c in cfgs:
        f = m[c]
        x = ratio(f["samples_s"], m[one]["samples_s"])
        if c.shards > 1:
            worst[c.spread] = min(worst[c.spread], x)
        table.rows.append([c.shards, "every shard" if c.spread else "as placed", f["samples_s"], x, f["wall_s"],
                           ratio(f["wall_s"], m[one]["wall_s"]), f["cpu_s"]])  # fmt: skip
    table.notes.append(f"Against 1 shard, more shards give at worst {_pct(worst[False])} samples/s as placed (this model of "
                       f"{plan.features + 1} weights goes on one shard), and {_pct(worst[True])} spread over every shard (what "
                       "a model of more than 256 KiB a shard gets): each step then pulls and pushes once per shard, and "
                       "the shards share the cores.")  # fmt: skip
    return table


def rows_table(plan: Plan, m: dict[Config, dict[str, float]], cfgs: list[Config]) -> Table:
    table = Table(f"Rows: x {plan.features} features, 8 workers, 2 shards, async, {plan.epochs} epochs",
                  ["rows", "wall s", "wall s per 100k rows", "x linear from the one before", "samples/s", "worker peak RSS MiB"])  # fmt: skip
    prev: Config | None = None
    steps = []
    for c in cfgs:
        f = m[c]
        linear = ratio(f["wall_s"], m[prev]["wall_s"] * c.rows / prev.rows) if prev else float("nan")
        if prev:
            steps.append((linear, c.rows))
        table.rows.append([c.rows, f["wall_s"], f["wall_s"] / (c.rows / 100_000), linear, f["samples_s"], f["worker_peak_mib"]])
        prev = c
    if steps:
        last, rows = steps[-1]
        first, end = m[cfgs[0]], m[cfgs[-1]]
        table.notes.append(f"From {count_label(cfgs[-2].rows)} to {count_label(rows)} rows the wall time grows {last:.2f}x a linear "
                           "growth (below 1: the start-up's fixed cost is spread thinner); a worker's peak RSS grows "
                           f"{ratio(end['worker_peak_mib'], first['worker_peak_mib']):.2f}x while its partition grows "
                           f"{cfgs[-1].rows / cfgs[0].rows:g}x.")  # fmt: skip
    return table


async def run_scale(
    settings: Settings, tables: tuple[str, ...] = TABLES, rounds: int | None = None, batch_size: int | None = None
) -> SectionResult:
    plan = QUICK if settings.quick else FULL
    plan = Plan(plan.rows, plan.features, plan.epochs, batch_size or plan.batch_size, plan.sizes, rounds or plan.rounds)
    return await asyncio.to_thread(_run, plan, settings, tables)


def _run(plan: Plan, settings: Settings, tables: tuple[str, ...]) -> SectionResult:
    result = SectionResult("scale")
    folder = Path(tempfile.mkdtemp(prefix="scale-", dir=settings.tmp_dir))
    sizes = sorted({plan.rows} | (set(plan.sizes) if "rows" in tables else set()))
    csvs = {n: write_csv(folder / f"rows{n}.csv", n, plan.features) for n in sizes}
    w_cfgs = [Config(plan.rows, w, 2) for w in WORKERS] if "workers" in tables else []
    s_cfgs = [Config(plan.rows, 8, s, spread) for s in SHARDS for spread in (False, True) if not (s == 1 and spread)] if "shards" in tables else []
    r_cfgs = [Config(n, 8, 2) for n in plan.sizes] if "rows" in tables else []
    configs = list(dict.fromkeys(w_cfgs + s_cfgs + r_cfgs))  # one run serves every table it appears in
    m = measure(configs, csvs, folder, plan, lambda line: print(line, file=sys.stderr, flush=True))
    command = settings.command("scale")
    for name, cfgs, make in (("workers", w_cfgs, workers_table), ("shards", s_cfgs, shards_table), ("rows", r_cfgs, rows_table)):
        if cfgs:
            table = make(plan, m, cfgs)
            table.command = command
            result.tables.append(table)
            result.figures[name] = [{"config": c.__dict__, **m[c]} for c in cfgs]
    result.figures["plan"] = plan.__dict__
    return result


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import Printer
    from benchmarks.common import use_this_checkout

    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200k rows x 20, sizes 50k-200k, one round")
    p.add_argument("--batch-size", type=int, help="rows per step and worker (default 100)")
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of {', '.join(TABLES)}")
    p.add_argument("--rounds", type=int, help="rounds per configuration (default 3; --quick 1)")
    p.add_argument("--json", metavar="FILE", help="write the figures and the machine as JSON")
    args = p.parse_args(argv)
    tables = tuple(t.strip() for t in args.tables.split(",") if t.strip())
    if bad := [t for t in tables if t not in TABLES]:
        p.error(f"unknown table {', '.join(bad)}; choose from {', '.join(TABLES)}")
    for name, value in (("--rounds", args.rounds), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1")
    use_this_checkout()
    with tempfile.TemporaryDirectory(prefix="psctl-scale-") as tmp:
        settings = Settings.make(args.quick, Path(tmp))
        result = asyncio.run(run_scale(settings, tables, args.rounds, args.batch_size))
    out = Printer(plain=False)
    for table in result.tables:
        table.command = " ".join(["python -m benchmarks.scale", *(sys.argv[1:] if argv is None else argv)])
        out.table(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "load": os.getloadavg(), **result.to_json()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
