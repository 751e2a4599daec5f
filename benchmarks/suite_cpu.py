"""Where the test suite's time goes: each test's wall time and the CPU it cost.

    python -m pytest -p benchmarks.suite_cpu [--suite-cpu-out DIR]     # record (default DIR: suite-cpu)
    python -m benchmarks.suite_cpu DIR [--top N]                       # report by file and by test

pytest's ``--durations`` gives wall time only. On a 2-core machine the suite is bound by CPU
(the test files' wall times add up to about the cores times the suite's wall time), so what a
test costs in CPU decides how long the suite takes, and a test whose wall time is far above its
CPU is waiting (a timeout, a lingering close) and holds a test process idle.

A test's CPU is its own process's plus that of every child it waited for
(``RUSAGE_CHILDREN``: the psctl processes it started, with their forked workers and shards).
A process a test leaves running, or a grandchild nobody waited for (Spark's JVM), counts nowhere.
Each test process (one per pytest-xdist worker) appends to its own file in DIR.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest


def _cpu() -> tuple[float, float]:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--suite-cpu-out", default="suite-cpu", help="folder for benchmarks.suite_cpu's records")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: Any, nextitem: Any) -> Any:
    own0, children0 = _cpu()
    started = time.perf_counter()
    yield
    own1, children1 = _cpu()
    out = Path(item.config.getoption("suite_cpu_out"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"tests-{os.getpid()}.tsv", "a", encoding="utf-8") as f:
        f.write(f"{item.nodeid}\t{time.perf_counter() - started:.3f}\t{own1 - own0:.3f}\t{children1 - children0:.3f}\n")


def read(folder: Path) -> list[tuple[str, float, float]]:
    """(test id, wall s, CPU s) of every recorded test."""
    rows = []
    for path in sorted(folder.glob("tests-*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            nodeid, wall, own, children = line.rsplit("\t", 3)
            rows.append((nodeid, float(wall), float(own) + float(children)))
    return rows


def report(rows: list[tuple[str, float, float]], top: int) -> str:
    by_file: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for nodeid, wall, cpu in rows:
        entry = by_file[nodeid.split("::", 1)[0]]
        entry[0] += cpu
        entry[1] += wall
        entry[2] += 1
    cpu_total, wall_total = sum(r[2] for r in rows), sum(r[1] for r in rows)
    lines = [f"{len(rows)} tests: CPU {cpu_total:.0f} s, wall {wall_total:.0f} s (summed over the test processes)", "",
             f"{'CPU s':>8} {'wall s':>8} {'tests':>6}  file (by CPU)"]  # fmt: skip
    for name, (cpu, wall, n) in sorted(by_file.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{cpu:8.1f} {wall:8.1f} {n:6d}  {name}")
    lines += ["", f"{'CPU s':>8} {'wall s':>8}  test (by CPU)"]
    for nodeid, wall, cpu in sorted(rows, key=lambda r: -r[2])[:top]:
        lines.append(f"{cpu:8.1f} {wall:8.1f}  {nodeid}")
    lines += ["", f"{'CPU s':>8} {'wall s':>8}  test (waiting most: wall - CPU)"]
    for nodeid, wall, cpu in sorted(rows, key=lambda r: r[2] - r[1])[:top]:
        lines.append(f"{cpu:8.1f} {wall:8.1f}  {nodeid}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("suite-cpu"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    rows = read(args.folder)
    if not rows:
        parser.exit(2, f"no records in {args.folder}: run python -m pytest -p benchmarks.suite_cpu first\n")
    print(report(rows, args.top))


if __name__ == "__main__":
    main()
