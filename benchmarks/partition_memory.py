"""A worker's peak memory against the compact size of its partition, in memory and streaming mode.

    python benchmarks/partition_memory.py [--rows 400000] [--workers 2] [--stream-budget 16MB]
                                          [--big-mb 1024] [--big-budget 64MB] [--folder /tmp/psctl-pm]

Each run is ``psctl train ... --json``; every worker reads its own peak RSS (VmHWM in
/proc/self/status) at its end, after the final evaluation, and reports it with its compact
size (the bytes of its rows as the model uses them: float32 features, uint32 keys and float32
values, int32 ids and float32 ratings, and the encoded labels) in ``metrics.worker_memory``.

1. The constant of each input: the peak RSS, less its compact size, of a worker whose partition
   is one slice (``csvfile.SLICE_BYTES``, 2 MiB) of that CSV: the interpreter, numpy, psctl,
   pyarrow (the reader of every slice of 1 MiB or more), one slice's parse and a training step.
   The bounds are stated over it.
2. For dense (50 float columns), hashed (``benchmarks/hashed_synth.py``: 26 categorical and 3
   numeric columns) and ratings (user, item, rating) CSVs of ``--rows`` rows, one job in memory
   mode and one forced into streaming mode with ``--stream-budget``: per worker, compact size,
   peak RSS, (peak - constant) / compact in memory mode, and peak - constant against the budget
   when streamed. The ratings file has 25 times ``--rows`` rows (a rating is 12 compact bytes).
3. A dense CSV of ``--big-mb`` MB (a block of rows repeated), larger than ``--big-budget`` times
   the workers, trained in the default mode (auto, which streams it), one epoch.

Not a test: the figures in BENCHMARKS.md come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from psctl.data.csvfile import SLICE_BYTES  # noqa: E402
from psctl.data.stream import parse_size  # noqa: E402

MB = 1 << 20


def psctl_train(*args: str) -> tuple[dict, float]:
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "psctl", "train", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"psctl train {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout), time.monotonic() - started


def dense_block(rows: int, features: int, seed: int) -> bytes:
    """``rows`` CSV lines of a logistic model over ``features`` normal columns (no header)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    w = rng.normal(size=features) / np.sqrt(features)
    y = (rng.random(rows) < 1 / (1 + np.exp(-3 * X @ w))).astype(np.int64)
    line = y.astype("S")
    for j in range(features):
        line = np.strings.add(np.strings.add(line, b","), np.round(X[:, j], 4).astype("S"))
    return b"\n".join(line.tolist()) + b"\n"


def write_dense(path: Path, rows: int | None = None, size_bytes: int | None = None, features: int = 50) -> int:
    """A dense CSV of ``rows`` rows, or of at least ``size_bytes`` (a block of rows repeated)."""
    header = ("label," + ",".join(f"x{j}" for j in range(features)) + "\n").encode()
    block_rows = min(rows or 100_000, 100_000)
    block = dense_block(block_rows, features, 1)
    n = 0
    with open(path, "wb") as fh:
        fh.write(header)
        while (rows is not None and n < rows) or (size_bytes is not None and fh.tell() < size_bytes):
            take = block if rows is None or rows - n >= block_rows else b"".join(block.split(b"\n")[: rows - n]) + b"\n"
            fh.write(take)
            n += block_rows if take is block else rows - n
    return n


def write_ratings(path: Path, rows: int, users: int = 50_000, items: int = 10_000) -> None:
    rng = np.random.default_rng(3)
    u = rng.integers(users, size=rows)
    i = np.minimum(rng.zipf(1.3, size=rows), items)
    bias_u, bias_i = rng.normal(0, 0.5, users), rng.normal(0, 0.5, items + 1)
    r = np.clip(np.round(3.5 + bias_u[u] + bias_i[i] + rng.normal(0, 0.7, rows) * 2) / 2, 0.5, 5.0)
    line = np.strings.add(np.strings.add(np.strings.add(np.strings.add(u.astype("S"), b","), i.astype("S")), b","), r.astype("S"))
    with open(path, "wb") as fh:
        fh.write(b"userId,movieId,rating\n")
        fh.write(b"\n".join(line.tolist()) + b"\n")


def workers_of(result: dict) -> list[dict]:
    return result["metrics"]["worker_memory"]


def row(kind: str, mode: str, w: dict, constant: int, budget: int) -> str:
    compact, peak = w["compact_bytes"], w["peak_rss_bytes"]
    over = peak - constant
    bound = (f"(peak - constant) / compact {over / compact:.2f}" if mode == "memory"
             else f"peak - constant {over / MB:.0f} MB of a {budget / MB:.0f} MB budget")
    return f"| {kind} | {mode} | {w['worker_id']} | {compact / MB:.1f} | {peak / MB:.0f} | {bound} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stream-budget", default="16MB")
    ap.add_argument("--big-mb", type=int, default=1024, help="size of the large dense CSV (0: skip it)")
    ap.add_argument("--big-budget", default="64MB")
    ap.add_argument("--folder", default="/tmp/psctl-pm")
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)

    def common(workers: int) -> list[str]:
        return ["--workers", str(workers), "--epochs", "1", "--batch-size", "4096", "--out", str(folder / "m.npz")]

    inputs = {}
    dense = folder / "dense.csv"
    write_dense(dense, rows=args.rows)
    inputs["dense"] = ["logreg", str(dense)]
    hashed = folder / "hashed.csv"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "hashed_synth.py"), "--rows", str(args.rows), "--out", str(hashed)],
                   check=True, capture_output=True, cwd=REPO)
    cats = ",".join(f"C{j + 1}" for j in range(26))
    inputs["hashed"] = ["logreg", str(hashed), "--categorical", cats, "--hash-bits", "24"]
    rated = folder / "ratings.csv"
    write_ratings(rated, args.rows * 25)
    inputs["ratings"] = ["mf", str(rated), "--rank", "10"]

    # The constant of each input: a worker whose partition is one slice of it (pyarrow parses it).
    constants = {}
    for kind, job in inputs.items():
        head = folder / f"head-{kind}.csv"
        with open(job[1], "rb") as src:
            text = src.read(SLICE_BYTES - (64 << 10))
        head.write_bytes(text[: text.rindex(b"\n") + 1])
        result, _ = psctl_train(job[0], str(head), *job[2:], *common(1), "--partition-mode", "memory")
        (w,) = workers_of(result)
        constants[kind] = w["peak_rss_bytes"] - w["compact_bytes"]
        print(f"constant ({kind}): a worker holding one slice ({head.stat().st_size / MB:.1f} MB of CSV): "
              f"peak {w['peak_rss_bytes'] / MB:.0f} MB - compact {w['compact_bytes'] / MB:.1f} MB = {constants[kind] / MB:.0f} MB")

    stream_budget = parse_size(args.stream_budget)
    print("| input | mode | worker | compact MB | peak RSS MB | bound |")
    print("|---|---|---|---|---|---|")
    for kind, job in inputs.items():
        size = Path(job[1]).stat().st_size
        for mode, extra in (("memory", ["--partition-mode", "memory"]), ("stream", ["--partition-mode", "stream", "--worker-memory", args.stream_budget])):
            result, seconds = psctl_train(*job, *common(args.workers), *extra)
            for w in workers_of(result):
                print(row(f"{kind} ({size / MB:.0f} MB CSV, {seconds:.0f} s)", mode, w, constants[kind], stream_budget))

    if args.big_mb:
        big = folder / "big.csv"
        n = write_dense(big, size_bytes=args.big_mb * MB)
        budget = parse_size(args.big_budget)
        size = big.stat().st_size
        print(f"large: {big} {size / MB:.0f} MB, {n} rows; budget {budget / MB:.0f} MB x {args.workers} workers = {budget * args.workers / MB:.0f} MB")
        result, seconds = psctl_train("logreg", str(big), *common(args.workers), "--worker-memory", args.big_budget)
        for w in workers_of(result):
            over = w["peak_rss_bytes"] - constants["dense"]
            print(f"  worker {w['worker_id']}: {w['mode']} mode, compact {w['compact_bytes'] / MB:.0f} MB, peak RSS {w['peak_rss_bytes'] / MB:.0f} MB "
                  f"= constant {constants['dense'] / MB:.0f} MB + {over / MB:.0f} MB (budget {budget / MB:.0f} MB)")
        m = result["metrics"]
        print(f"  {seconds:.0f} s, rows trained {result['rows_trained']}, train accuracy {m.get('train_accuracy', float('nan')):.4f}")
    host = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(" \t:")
    print(f"host: {host}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
