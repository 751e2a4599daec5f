"""Synthetic Criteo-like CSV for sparse, hashed training: many categorical columns with
a heavy tail of values seen once, a few numeric columns, a binary label.

Each categorical cell is, with probability ``--cold-fraction``, a value never seen
before (the long tail: it adds one key to the model) and otherwise one of
``--hot-values`` values per column drawn with Zipf-like weights. The label follows
a hidden logistic model over the hot values and the numeric columns, so a trained
model beats the majority class on held-out rows. Touched keys are about
``rows * cat_columns * cold_fraction + cat_columns * hot_values + num_columns``
(a few fewer after hash collisions).

    python benchmarks/hashed_synth.py --rows 770000 --out /tmp/synth.csv --test-out /tmp/synth-test.csv

prints the file sizes, the expected key count and the psctl command to train on it.
Generation is vectorized (numpy formats and joins the cells), about a minute per
million rows here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CHUNK_ROWS = 100_000


def make_rows(rng: np.random.Generator, n: int, first_cold: int, args: argparse.Namespace, hidden: np.ndarray) -> tuple[bytes, int]:
    """``n`` CSV rows as bytes (no header) and how many cold values they used."""
    cols: list[np.ndarray] = []
    logit = np.full(n, args.bias)
    for j in range(args.num_columns):
        x = rng.normal(size=n)
        logit += hidden[-1 - j] * x
        cols.append(np.round(x, 3).astype("S"))
    ranks = np.arange(1, args.hot_values + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    cold_used = 0
    for j in range(args.cat_columns):
        hot = rng.choice(args.hot_values, size=n, p=p)
        cold = rng.random(n) < args.cold_fraction
        logit += np.where(cold, 0.0, hidden[j * args.hot_values + hot])
        ids = np.where(cold, first_cold + cold_used + np.cumsum(cold) - 1, hot)
        cold_used += int(cold.sum())
        # hot values spelled 'h<id>', cold ones as a hex counter: distinct strings either way
        text = np.where(cold, np.strings.add(b"c", ids.astype("S")), np.strings.add(b"h", hot.astype("S")))
        cols.append(text)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    line = y.astype("S")
    for c in cols:
        line = np.strings.add(np.strings.add(line, b","), c)
    return b"\n".join(line.tolist()) + b"\n", cold_used


def write(path: str, rows: int, args: argparse.Namespace, hidden: np.ndarray, seed: int) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    header = ["label", *(f"I{j + 1}" for j in range(args.num_columns)), *(f"C{j + 1}" for j in range(args.cat_columns))]
    size, cold = 0, 0
    with open(path, "wb") as fh:
        size += fh.write((",".join(header) + "\n").encode())
        for start in range(0, rows, CHUNK_ROWS):
            chunk, used = make_rows(rng, min(CHUNK_ROWS, rows - start), seed * 10**9 + cold, args, hidden)
            cold += used
            size += fh.write(chunk)
    return size, cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--test-rows", type=int, default=20_000)
    ap.add_argument("--cat-columns", type=int, default=26)
    ap.add_argument("--num-columns", type=int, default=3)
    ap.add_argument("--hot-values", type=int, default=1000)
    ap.add_argument("--cold-fraction", type=float, default=0.5)
    ap.add_argument("--bias", type=float, default=-1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="synth.csv")
    ap.add_argument("--test-out", default=None, help="Also write held-out rows (same hidden model) here.")
    args = ap.parse_args()
    hidden = np.random.default_rng([args.seed, 7]).normal(0, 0.5, size=args.cat_columns * args.hot_values + args.num_columns)
    started = time.monotonic()
    size, cold = write(args.out, args.rows, args, hidden, args.seed + 1)
    print(f"{args.out}: {args.rows} rows, {size / 1e6:.1f} MB, {cold} cold values")
    if args.test_out:
        tsize, _ = write(args.test_out, args.test_rows, args, hidden, args.seed + 2)
        print(f"{args.test_out}: {args.test_rows} rows, {tsize / 1e6:.1f} MB")
    keys = cold + args.cat_columns * args.hot_values + args.num_columns
    print(f"about {keys} touched keys (before hash collisions); generated in {time.monotonic() - started:.1f} s")
    cats = ",".join(f"C{j + 1}" for j in range(args.cat_columns))
    print(
        f"train: psctl train logreg {args.out} --categorical {cats} --hash-bits 32 --optimizer ftrl "
        "--workers 8 --epochs 1 --batch-size 512"
    )


if __name__ == "__main__":
    main()
