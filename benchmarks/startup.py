"""Section start: from calling ``train()`` to the first step with 8 workers, and its pieces.

The data is tiny (one mini-batch per worker, one epoch), so the first
``progress`` event arrives right after each worker's first and only step and
``cluster_start_s`` is start-up cost, not training. The pieces are the times
of the driver's events; beside them, how long bare Python processes take to
start and import what a psctl child imports, one alone and 8 at once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Clock,
    SectionResult,
    Settings,
    Table,
    child_env,
    median,
    python,
)
from benchmarks.training import write_csv
from psctl.apps.train import TrainConfig, train

WORKERS = 8
ROWS_PER_WORKER = 64
FEATURES = 10
PIECES = [
    ("planned", "schema read, partitions planned"),
    ("cluster_up", "coordinator listening, shards spawned and registered, worker processes spawned"),
    ("submitted", "job accepted, shards set up"),
    ("first_worker_joined", "first worker registered"),
    ("last_worker_joined", "last worker registered"),
    ("stats", "every worker read its partition (stats barrier)"),
    ("first_progress", "first step done (cluster_start_s)"),
    ("done", "every worker finished and reported"),
    ("returned", "train() returned (final pull, model file written, processes stopped)"),
]
IMPORTS = {
    "python -c pass": "pass",
    "python: import numpy": "import numpy",
    "python: import psctl.cluster.child + psctl.cluster.worker (a worker's imports)": "import psctl.cluster.child, psctl.cluster.worker",
}


def event_times(events: list[tuple[float, dict[str, Any]]], returned_s: float) -> dict[str, float]:
    def first(kind: str) -> float:
        return next(t for t, e in events if e["kind"] == kind)

    joined = [t for t, e in events if e["kind"] == "worker_joined"]
    return {
        "planned": first("planned"),
        "cluster_up": first("cluster_up"),
        "submitted": first("submitted"),
        "first_worker_joined": min(joined),
        "last_worker_joined": max(joined),
        "stats": first("stats"),
        "first_progress": first("progress"),
        "done": first("done"),
        "returned": returned_s,
    }


async def one_start(path: Path, out: Path) -> dict[str, float]:
    clock = Clock()
    events: list[tuple[float, dict[str, Any]]] = []
    cfg = TrainConfig(
        model="logreg", data=str(path), workers=WORKERS, mode="async", epochs=1, batch_size=ROWS_PER_WORKER, out=str(out)
    )
    await train(cfg, lambda e: events.append((clock(), e)))
    return event_times(events, clock())


async def spawn_seconds(code: str, n: int) -> float:
    """Wall time for ``n`` concurrent ``python -c code`` processes to start, run and exit."""
    start = time.perf_counter()
    procs = [await asyncio.create_subprocess_exec(python(), "-c", code, env=child_env()) for _ in range(n)]
    codes = await asyncio.gather(*(p.wait() for p in procs))
    if any(codes):
        raise RuntimeError(f"python -c {code!r} failed")
    return time.perf_counter() - start


async def run_startup(settings: Settings) -> SectionResult:
    result = SectionResult("start")
    repeats = 2 if settings.quick else 5
    path = write_csv(settings.tmp_dir / "tiny.csv", WORKERS * ROWS_PER_WORKER, FEATURES)
    runs = [await one_start(path, settings.tmp_dir / "tiny-model.npz") for _ in range(repeats)]
    pieces = {key: median([r[key] for r in runs]) for key, _ in PIECES}
    result.figures["runs"] = runs
    result.figures["median"] = pieces
    table = Table(
        f"Cluster start: train() to the first step, {WORKERS} workers, 2 shards, {WORKERS * ROWS_PER_WORKER} rows",
        ["event", "what has happened", "s since train()", "s since previous"],
        command=settings.command("start"),
        notes=[f"Median of {repeats} runs, each a fresh embedded cluster (all processes started anew)."],
    )
    previous = 0.0
    for key, what in PIECES:
        table.rows.append([key, what, pieces[key], pieces[key] - previous])
        previous = pieces[key]
    result.tables.append(table)

    spawn_repeats = 1 if settings.quick else repeats
    spawn = Table(
        "Process start floor: concurrent `python -c ...` processes, start to exit",
        ["what", "1 process s", f"{WORKERS + 2} at once s"],
        command=settings.command("start"),
        notes=[f"{WORKERS + 2} = the embedded cluster's {WORKERS} workers + 2 shards; median of {spawn_repeats}."],
    )
    imports = list(IMPORTS.items())[-1:] if settings.quick else list(IMPORTS.items())
    for label, code in imports:
        one = median([await spawn_seconds(code, 1) for _ in range(spawn_repeats)])
        many = median([await spawn_seconds(code, WORKERS + 2) for _ in range(spawn_repeats)])
        spawn.rows.append([label, one, many])
        result.figures.setdefault("spawn", {})[label] = {"one_s": one, f"{WORKERS + 2}_s": many}
    result.tables.append(spawn)
    result.figures["headline"] = {"cluster_start_s": pieces["first_progress"]}
    return result
