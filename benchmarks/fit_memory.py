"""Training from memory: how soon a fit starts its first step, and what memory it takes.

    python benchmarks/fit_memory.py [--rows 1000000] [--features 100] [--workers 2] [--shards 2]

Makes a float32 array of ROWS x FEATURES (400 MB at the defaults) and binary labels, then
calls ``PSLogisticRegression(...).fit(X, y)`` (worker processes, the default) and reports:

- seconds from ``fit`` being called to the driver hearing of the first training step
  (a worker reports its first step at once; the figure includes writing the .npy,
  starting the cluster, the statistics pass and scaling);
- this process's peak RSS before and after the fit (the driver: the user's array plus
  what fit adds), from ``ru_maxrss``;
- for every child process (shards and workers), sampled every 20 ms from /proc: peak RSS
  (VmHWM), and the most seen of its private memory (RssAnon) and of its mapped file pages
  (RssFile: the .npy rows it maps, shared with every process through the page cache).
  A worker's one extra copy is its scaled float32 partition (rows/workers x features x 4
  bytes), on top of its baseline (its RssAnon when the job is submitted, before it reads
  any data), plus the scaling's temporaries (a few 4 MiB blocks) and a batch.

It trains one epoch with a large batch so the run is short; the timing and memory of the
start do not depend on that. Not a test: the figure for the README comes from here.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import psctl.sklearn as pss  # noqa: E402

MB = 1 << 20


def _status(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon, RssFile of a process, in bytes (empty once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _children(parent: int) -> dict[int, str]:
    """pid -> role of this process's children (from their command lines)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        role = next((a.decode() for a in argv if a in (b"shard", b"worker")), "other")
        found[int(entry)] = role
    return found


class Sampler(threading.Thread):
    """Keeps the largest VmHWM / RssAnon / RssFile seen of every child while the fit runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, dict[str, Any]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            for pid, role in _children(me).items():
                seen = self.peaks.setdefault(pid, {"role": role})
                for key, value in _status(pid).items():
                    seen[key] = max(seen.get(key, 0), value)
            self.stop.wait(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.rows, args.features), dtype=np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int8)
    data_bytes = X.nbytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    first_step: list[float] = []
    phases: dict[str, float] = {}
    at_submit: dict[int, int] = {}
    real_train = pss.train

    def observed_train(cfg: Any, **kwargs: Any) -> Any:  # the estimator's own call, with an observer of its events
        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("kind")
            if kind == "progress" and not first_step:
                first_step.append(time.monotonic())
            if kind in ("cluster_up", "submitted", "stats") and kind not in phases:
                phases[kind] = time.monotonic()
            if kind == "submitted":  # every worker is up and has read nothing yet: its baseline
                for pid, role in _children(os.getpid()).items():
                    if role == "worker":
                        at_submit[pid] = _status(pid).get("RssAnon", 0)

        return real_train(cfg, on_event=on_event, **kwargs)

    pss.train = observed_train
    sampler = Sampler()
    sampler.start()
    est = pss.PSLogisticRegression(workers=args.workers, shards=args.shards, epochs=1, batch_size=args.batch_size)
    started = time.monotonic()
    est.fit(X, y)
    ended = time.monotonic()
    sampler.stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"data: {args.rows} x {args.features} float32 = {data_bytes / MB:.0f} MB; "
          f"{args.workers} workers (partition {data_bytes / args.workers / MB:.0f} MB), {args.shards} shards")  # fmt: skip
    if first_step:
        print(f"first step {first_step[0] - started:.2f} s after fit was called (fit took {ended - started:.2f} s)")
        print("  on the way: " + ", ".join(f"{k} at {t - started:.2f} s" for k, t in phases.items()))
    else:
        print(f"no progress event seen (fit took {ended - started:.2f} s)")
    print(f"driver peak RSS: {before / MB:.0f} MB before fit (the array made), {after / MB:.0f} MB after "
          f"(+{(after - before) / MB:.0f} MB)")  # fmt: skip
    print("per process (a worker's baseline: its private memory when the job was submitted, before it read any data):")
    for pid, p in sorted(sampler.peaks.items(), key=lambda kv: (kv[1]["role"], kv[0])):
        if p["role"] not in ("shard", "worker"):
            continue
        extra = ""
        if p["role"] == "worker" and pid in at_submit:
            copies = (p.get("RssAnon", 0) - at_submit[pid]) / (data_bytes / args.workers)
            extra = f"; baseline {at_submit[pid] / MB:.0f} MB, private beyond it = {copies:.2f} x its partition"
        print(f"  {p['role']:6} pid {pid}: peak RSS {p.get('VmHWM', 0) / MB:.0f} MB, private {p.get('RssAnon', 0) / MB:.0f} MB, "
              f"mapped file {p.get('RssFile', 0) / MB:.0f} MB{extra}")  # fmt: skip
    print(f"train accuracy {est.score(X[:100_000], y[:100_000]):.3f}")


if __name__ == "__main__":
    main()
