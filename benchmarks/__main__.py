"""``python -m benchmarks [--quick] [--json FILE] [--markdown FILE] [--only SECTION ...] [--plain]``."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks.common import SectionResult, Settings, Table, fmt, machine_info, use_this_checkout

SECTIONS = ("dense", "sparse", "latency", "limits", "train", "start", "peers")
# Minutes each, so only when named: robustness runs (--only fuzz, --only faults) and the scale tables (--only scale).
ON_REQUEST = ("fuzz", "faults", "scale")
ACCURACY_TOLERANCE = 0.005  # "at the same accuracy": within half a percentage point of numpy's

# (key, what, target, passes(measured, figures))
GOALS: list[tuple[str, str, str, Callable[[dict[str, float]], float | None], Callable[[float, dict[str, float]], bool]]] = [
    (
        "dense_4mb_vs_protocol",
        "dense 4 MiB pull+push, 1 shard, x asyncio Protocol baseline",
        ">= 0.8",
        lambda h: h.get("dense_4mb_vs_protocol"),
        lambda v, h: v >= 0.8,
    ),
    (
        "small_rtt_vs_protocol",
        "64 B round trip p50, x asyncio Protocol baseline",
        "<= 2",
        lambda h: h.get("small_rtt_vs_protocol"),
        lambda v, h: v <= 2.0,
    ),
    (
        "small_rtt_p99_us",
        "64 B round trip p99, us",
        "< 1000",
        lambda h: h.get("small_rtt_p99_us"),
        lambda v, h: v < 1000,
    ),
    (
        "train_logreg_8w_async_vs_numpy",
        "logreg 8 workers async samples/s, x numpy one process (same accuracy)",
        ">= 1.0",
        lambda h: h.get("train_logreg_8w_async_vs_numpy"),
        lambda v, h: v >= 1.0
        and abs(h.get("train_logreg_8w_async_accuracy", 0) - h.get("numpy_logreg_accuracy", 1)) <= ACCURACY_TOLERANCE,
    ),
    (
        "cluster_start_s",
        "train() to the first step, 8 workers, s",
        "< 1.5",
        lambda h: h.get("cluster_start_s"),
        lambda v, h: v < 1.5,
    ),
    (
        "cli_first_step_s",
        "exec of `psctl train` to every worker's first step, 8 workers, s (idle machine)",
        "< 0.5",
        lambda h: h.get("cli_first_step_s"),
        lambda v, h: v < 0.5,
    ),
]


class Printer:
    """rich tables when rich imports and --plain is not given; plain text otherwise."""

    def __init__(self, plain: bool):
        self.console = None
        if not plain:
            try:
                from rich.console import Console

                self.console = Console()
            except ImportError:
                pass

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def table(self, table: Table) -> None:
        if self.console is not None:
            from rich.table import Table as RichTable

            rich_table = RichTable(title=table.title, caption=table.command or None, title_justify="left")
            for i, column in enumerate(table.columns):
                rich_table.add_column(column, justify="left" if i == 0 or column in ("contender", "mode") else "right")
            for row in table.rows:
                rich_table.add_row(*(fmt(v) for v in row))
            self.console.print(rich_table)
            for note in table.notes:
                self.console.print(f"  {note}", markup=False, highlight=False, style="dim")
            return
        cells = [table.columns] + [[fmt(v) for v in row] for row in table.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(table.columns))]
        print(f"\n{table.title}")
        if table.command:
            print(f"  ({table.command})")
        for k, row in enumerate(cells):
            print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if k == 0:
                print("  " + "  ".join("-" * w for w in widths))
        for note in table.notes:
            print(f"  {note}")
        sys.stdout.flush()


def _section_runner(
    name: str, settings: Settings, results: dict[str, SectionResult], args: argparse.Namespace
) -> Callable[[], Coroutine[Any, Any, SectionResult]]:
    if name == "dense":
        from benchmarks.dense import run_dense

        return lambda: run_dense(settings)
    if name == "sparse":
        from benchmarks.sparse import run_sparse

        return lambda: run_sparse(settings)
    if name == "latency":
        from benchmarks.latency import run_latency

        return lambda: run_latency(settings)
    if name == "limits":
        from benchmarks.limits import run_limits

        return lambda: run_limits(settings)
    if name == "train":
        from benchmarks.training import run_training

        return lambda: run_training(settings)
    if name == "start":
        from benchmarks.startup import run_startup

        return lambda: run_startup(settings)
    if name == "peers":
        from benchmarks.peers import run_peers

        dense = results.get("dense")
        its = dense.figures.get("headline", {}).get("dense_4mb_pullpush_its") if dense else None
        return lambda: run_peers(settings, its)
    if name == "fuzz":
        from benchmarks.fuzz import run_fuzz

        return lambda: run_fuzz(settings, args.fuzz_frames)
    if name == "scale":
        from benchmarks.scale import run_scale

        return lambda: run_scale(settings)
    if name == "faults":
        from benchmarks.faults import run_faults

        return lambda: run_faults(settings, args.fault_repeats)
    raise ValueError(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="psctl benchmarks (not tests)")
    p.add_argument("--quick", action="store_true", help="small sizes and short rounds: under a minute on 2 cores")
    p.add_argument("--json", metavar="FILE", help="write every figure, the machine and the goals as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    p.add_argument(
        "--only",
        metavar="SECTION",
        action="append",
        help=f"run only these sections (repeat or comma-separate): {', '.join(SECTIONS)}; "
        f"and, only when named: {', '.join(ON_REQUEST)}",
    )
    p.add_argument("--fuzz-frames", type=int, metavar="N", help="fuzz: hostile frames to send (default 50,000; --quick 10,000)")
    p.add_argument("--fault-repeats", type=int, metavar="N", help="faults: runs of each fault (default 2; --quick 1)")
    p.add_argument("--plain", action="store_true", help="plain-text tables even when rich is importable")
    args = p.parse_args(argv)
    only = [s.strip() for item in args.only or [] for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS + ON_REQUEST]
    if unknown:
        p.error(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS + ON_REQUEST)}")
    for name, value in (("--fuzz-frames", args.fuzz_frames), ("--fault-repeats", args.fault_repeats)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1")
    args.sections = [s for s in SECTIONS if not only or s in only] + [s for s in ON_REQUEST if s in only]
    return args


def evaluate_goals(headline: dict[str, float]) -> list[dict[str, Any]]:
    goals = []
    for key, what, target, measure, passes in GOALS:
        value = measure(headline)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            goals.append({"key": key, "goal": what, "target": target, "measured": None, "met": None})
        else:
            goals.append({"key": key, "goal": what, "target": target, "measured": value, "met": bool(passes(value, headline))})
    return goals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    from psctl import net

    out = Printer(args.plain)
    started = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix="psctl-bench-"))
    settings = Settings.make(args.quick, tmp_dir)
    machine = machine_info()
    out.line(
        f"psctl benchmarks{' (quick)' if args.quick else ''}: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, numpy {machine['numpy']}, uvloop {machine['uvloop']}; psctl from {machine['psctl_path']}"
    )
    results: dict[str, SectionResult] = {}
    failed: list[str] = []
    try:
        for name in args.sections:
            t0 = time.perf_counter()
            out.line(f"\n== {name}")
            try:
                result = net.run(_section_runner(name, settings, results, args))
            except Exception as exc:
                traceback.print_exc()
                failed.append(name)
                result = SectionResult(name, skipped=f"failed: {type(exc).__name__}: {exc}")
            result.seconds = time.perf_counter() - t0
            if hasattr(os, "getloadavg"):
                result.figures["loadavg_after"] = list(os.getloadavg())  # others' load shows here
            results[name] = result
            if result.skipped:
                out.line(f"{name}: {result.skipped}")
            for table in result.tables:
                out.table(table)
            out.line(f"({name}: {result.seconds:.1f} s)")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    headline: dict[str, float] = {}
    for result in results.values():
        headline.update(result.figures.get("headline", {}))
    goals = evaluate_goals(headline)
    goal_table = Table("Goals (from the issue; reported, not asserted)", ["goal", "target", "measured", "met"])
    for g in goals:
        met = "-" if g["met"] is None else ("yes" if g["met"] else "NO")
        goal_table.rows.append([g["goal"], g["target"], g["measured"] if g["measured"] is not None else "-", met])
    out.line("")
    out.table(goal_table)
    total_s = time.perf_counter() - started
    out.line(f"total {total_s:.1f} s")

    command = "python -m benchmarks" + (" " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    if args.json:
        doc = {
            **headline,
            "quick": args.quick,
            "command": command,
            "total_s": total_s,
            "machine": {**machine, "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "goals": goals,
            "sections": {name: r.to_json() for name, r in results.items()},
        }
        Path(args.json).write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
    if args.markdown:
        parts = [t.to_markdown() for r in results.values() for t in r.tables] + [goal_table.to_markdown()]
        parts += [f"{name}: {r.skipped}\n" for name, r in results.items() if r.skipped]
        Path(args.markdown).write_text("\n".join(parts))
    return 1 if failed else 0


def _finite(value: Any) -> Any:
    """NaN (not measured) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


if __name__ == "__main__":
    sys.exit(main())
