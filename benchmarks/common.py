"""What every section shares: the run's settings, tables, timing loops, the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """How long and how big: ``quick`` trades precision for a run under a minute."""

    quick: bool
    rounds: int
    round_s: float
    tmp_dir: Path

    @classmethod
    def make(cls, quick: bool, tmp_dir: Path) -> Settings:
        if quick:
            return cls(True, rounds=3, round_s=0.2, tmp_dir=tmp_dir)
        return cls(False, rounds=5, round_s=1.0, tmp_dir=tmp_dir)

    def command(self, section: str) -> str:
        """The command that reproduces a section's figures."""
        return f"python -m benchmarks{' --quick' if self.quick else ''} --only {section}"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    command: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "command": self.command, "notes": self.notes}

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        if self.command:
            lines += [f"`{self.command}`", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
        lines += [""] + [f"{n}  " for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


@dataclass
class SectionResult:
    name: str
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # detail, nested as the section likes
    skipped: str | None = None  # why the section did not run
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "tables": [t.to_json() for t in self.tables],
            "figures": self.figures,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


def fmt(value: Any) -> str:
    """Three significant digits for floats; everything else as text."""
    if isinstance(value, float):
        if value != value:  # NaN: not measured
            return "-"
        if value == 0 or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def size_label(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:g} {unit}"
    return f"{n_bytes} B"


def count_label(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# -- timing ------------------------------------------------------------------

Rate = Callable[[float], Awaitable[tuple[int, float]]]  # run for ~seconds -> (iterations, elapsed_s)


def step_rate(step: Callable[[int], Awaitable[Any]]) -> Rate:
    """A Rate that awaits ``step(i)`` with a running counter (kept across rounds, e.g. a clock)."""
    state = {"i": 0}

    async def run(duration_s: float) -> tuple[int, float]:
        n = 0
        start = time.perf_counter()
        while True:
            await step(state["i"])
            state["i"] += 1
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= duration_s:
                return n, elapsed

    return run


Sampler = Callable[[float], Awaitable[list[float]]]  # run for ~seconds -> one duration (s) per op


def call_samples(call: Callable[[], Awaitable[Any]]) -> Sampler:
    """A Sampler that times each ``await call()`` until the duration is up."""

    async def run(duration_s: float) -> list[float]:
        out = []
        clock = time.perf_counter
        end = clock() + duration_s
        while True:
            t0 = clock()
            await call()
            t1 = clock()
            out.append(t1 - t0)
            if t1 >= end:
                return out

    return run


async def _interleave(
    contenders: dict[str, Callable[[float], Awaitable[Any]]], rounds: int, round_s: float, warmup: bool = True
) -> dict[str, list[Any]]:
    """Each contender's result of every round, in alternating rounds so drift hits all alike.

    With ``warmup``, each contender first runs a short warm-up round that is not counted.
    """
    names = list(contenders)
    for name in names if warmup else ():
        await contenders[name](min(round_s, 0.1))
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(await contenders[name](round_s))
    return results


async def interleave_rates(contenders: dict[str, Rate], rounds: int, round_s: float) -> dict[str, list[float]]:
    """Iterations/s of each contender, one figure per round (see _interleave)."""
    rounds_done = await _interleave(contenders, rounds, round_s)
    return {name: [n / elapsed for n, elapsed in done] for name, done in rounds_done.items()}


async def interleave_samples(contenders: dict[str, Sampler], rounds: int, round_s: float) -> dict[str, list[float]]:
    """Per-operation durations of each contender, pooled over the rounds (see _interleave)."""
    rounds_done = await _interleave(contenders, rounds, round_s)
    return {name: [d for done in per_round for d in done] for name, per_round in rounds_done.items()}


async def interleave_runs(
    contenders: dict[str, Callable[[float], Awaitable[Any]]], rounds: int, round_s: float = 0.0, warmup: bool = False
) -> dict[str, list[Any]]:
    """Whatever each contender returns, one per round, in rotating order (see _interleave).

    For contenders that warm up by themselves, or whose every run is a whole job.
    """
    return await _interleave(contenders, rounds, round_s, warmup)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the machine --------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import numpy

    import psctl

    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = None
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": numpy.__version__,
        "uvloop": uvloop_version,
        "psctl_path": str(Path(psctl.__file__).parent),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout
        info["git_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def use_this_checkout() -> None:
    """Child processes (shards, workers, baseline servers) import this checkout, like this process."""
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")


def child_env() -> dict[str, str]:
    """The environment for child processes: they import this checkout's psctl and benchmarks."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    return env


class Clock:
    """Seconds since the clock was made (monotonic)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def python() -> str:
    return sys.executable
