"""Section start: from calling ``train()`` to the first step with 8 workers, and its pieces;
and the goal as the issue states it, from exec of ``psctl train`` to its first step.

The data is tiny (one mini-batch per worker, one epoch), so the first
``progress`` event arrives right after each worker's first and only step and
``cluster_start_s`` is start-up cost, not training. The pieces are the times
of the driver's events; beside them, how long bare Python processes take to
start and import what a psctl child imports, one alone and 8 at once.

The command's path (``cli_first_step_s``) is timed from outside: exec of ``python -m psctl
train`` with the same job, each line it prints stamped as it arrives. In a pipe the CLI
prints no line per step; its ``epoch 1/1`` line comes once every worker has done its first
and only step, so it bounds the first step from above (in-process, ``done`` comes
0.02-0.04 s after the first ``progress``). CPU is every process's, the command's included.
"""

from __future__ import annotations

import asyncio
import compileall
import json
import resource
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
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
# The lines of `psctl train` in a pipe, by how they start, and what each says has happened.
CLI_PIECES = [
    ("planned", "planned:", "imported, options parsed, schema read, partitions planned"),
    ("cluster_up", "cluster up", "coordinator listening, shards registered, worker processes forked"),
    ("submitted", "job ", "job accepted, shards set up"),
    ("first_step", "epoch 1/", "every worker's first and only step done (cli_first_step_s)"),
    ("exit", None, "the command exited (final pull, model written, processes stopped)"),
]
# Runs `psctl train` as psctl.cli.main() does, stamping (s since the exec, in T0) each first
# driver event and the command process's own CPU; prints them as one JSON line on stderr.
EVENTS_SHIM = r"""
import json, os, sys, time
t0 = float(os.environ.pop("PSCTL_BENCH_T0"))
stamps = {"interpreter_up": time.monotonic() - t0}
def stamp(key):
    stamps.setdefault(key, time.monotonic() - t0)
    stamps.setdefault("cpu_" + key, time.process_time())
import psctl.cli
if psctl.cli.starts_embedded_cluster(sys.argv[1:]):
    from psctl.apps.prestart import start_cluster_early
    start_cluster_early()
import psctl.cli.main
stamp("commands_imported")
commands = sys.modules["psctl.cli.main"]
on_event = commands._TrainView.on_event
def stamped(view, event):
    if event["kind"] == "worker_joined":  # the last one counts
        stamps.pop("last_worker_joined", None), stamps.pop("cpu_last_worker_joined", None)
        stamp("last_worker_joined")
    else:
        stamp(event["kind"])
    return on_event(view, event)
commands._TrainView.on_event = stamped
import atexit
atexit.register(lambda: print("PSCTL_BENCH " + json.dumps(stamps), file=sys.stderr, flush=True))
sys.argv = ["psctl", *sys.argv[1:]]
commands.main()
"""
EVENTS = [
    ("commands_imported", "typer, rich, numpy and psctl.cli.main imported (the fork server already started)"),
    ("planned", "options parsed (typer), driver imported, partitions planned"),
    ("cluster_up", "coordinator listening, shards registered, worker processes forked"),
    ("submitted", "job accepted, shards set up"),
    ("last_worker_joined", "last worker registered"),
    ("stats", "every worker read its partition (stats barrier)"),
    ("progress", "first step done"),
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


def cli_args(path: Path, out: Path) -> list[str]:
    """The job of :func:`one_start`, as a command line."""
    return ["-m", "psctl", "train", "logreg", str(path), "--workers", str(WORKERS), "--mode", "async", "--epochs", "1",
            "--batch-size", str(ROWS_PER_WORKER), "--out", str(out)]  # fmt: skip


async def one_cli_start(path: Path, out: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds from exec of ``psctl train`` to each of its lines (CLI_PIECES) and to its exit,
    and the CPU seconds of all its processes (``cpu_s``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        python(), *cli_args(path, out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
    )
    assert proc.stdout is not None
    times: dict[str, float] = {}
    async for line in proc.stdout:
        at = time.perf_counter() - start
        for key, prefix, _ in CLI_PIECES:
            if prefix is not None and key not in times and line.startswith(prefix.encode()):
                times[key] = at
    if await proc.wait() != 0 or len(times) != len(CLI_PIECES) - 1:
        raise RuntimeError(f"psctl train failed (exit {proc.returncode}, lines seen: {sorted(times)})")
    times["exit"] = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command reaps its fork server, which reaped the rest
    times["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return times


async def one_cli_events(path: Path, out: Path, env: dict[str, str]) -> dict[str, float]:
    """:func:`one_cli_start`'s job through EVENTS_SHIM: the driver's events inside the command
    (s since exec) and the command process's own CPU at each (``cpu_*``)."""
    start = time.monotonic()  # the shim's clock: CLOCK_MONOTONIC is one clock for every process
    proc = await asyncio.create_subprocess_exec(
        python(), "-c", EVENTS_SHIM, *cli_args(path, out)[2:], stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**env, "PSCTL_BENCH_T0": repr(start)},
    )  # fmt: skip
    _, err = await proc.communicate()
    line = next((x for x in err.decode(errors="replace").splitlines() if x.startswith("PSCTL_BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"psctl train failed (exit {proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return json.loads(line.split(" ", 1)[1])


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

    # Cached bytecode, as an installed psctl has (where PYTHONDONTWRITEBYTECODE is set no
    # process writes it, and each would compile psctl again: 0.2 s of CPU); changes no module.
    compileall.compile_dir(REPO / "psctl", quiet=2)
    cli_runs = [await one_cli_start(path, settings.tmp_dir / "tiny-model.npz", child_env()) for _ in range(repeats)]
    cli = {key: median([r[key] for r in cli_runs]) for key in [k for k, _, _ in CLI_PIECES] + ["cpu_s"]}
    result.figures["cli_runs"] = cli_runs
    result.figures["cli_median"] = cli
    cli_table = Table(
        "Cluster start from the command line: exec of `psctl train` to each of its lines, same job",
        ["line", "what has happened", "s since exec", "s since previous"],
        command=settings.command("start"),
        notes=[f"Median of {repeats} runs; CPU of all the processes, median: {cli['cpu_s']:.2f} s. "
               "The epoch line follows every worker's first step (the command prints no line per step)."],
    )  # fmt: skip
    previous = 0.0
    for key, _, what in CLI_PIECES:
        cli_table.rows.append([key, what, cli[key], cli[key] - previous])
        previous = cli[key]
    result.tables.append(cli_table)

    event_runs = [await one_cli_events(path, settings.tmp_dir / "tiny-model.npz", child_env()) for _ in range(repeats)]
    inside = {key: median([r[key] for r in event_runs]) for key in set.intersection(*(set(r) for r in event_runs))}
    result.figures["cli_event_runs"] = event_runs
    events_table = Table(
        "Inside `psctl train`: the driver's first events, s since exec, and the command process's own CPU",
        ["event", "what has happened", "s since exec", "s since previous", "CPU s of the command"],
        command=settings.command("start"),
        notes=[f"Median of {repeats} runs of the same job through a shim that runs psctl.cli.main() as the command "
               "does and stamps each event (benchmarks/startup.py EVENTS_SHIM)."],
    )  # fmt: skip
    previous = inside["interpreter_up"]
    events_table.rows.append(["interpreter_up", "python started, site imported", previous, previous, float("nan")])
    for key, what in EVENTS:
        events_table.rows.append([key, what, inside[key], inside[key] - previous, inside["cpu_" + key]])
        previous = inside[key]
    result.tables.append(events_table)

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
    result.figures["headline"] = {"cluster_start_s": pieces["first_progress"], "cli_first_step_s": cli["first_step"]}
    return result
