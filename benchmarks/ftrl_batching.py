"""What FTRL's accumulator does to large batches: a sync run of the hashed file replayed in
this process, with psctl's rule and with the accumulators a per-example learner would keep.

    python benchmarks/ftrl_batching.py [--batches 32,512,2048] [--alphas 0.1] [--rules batch,example,count,newton,pushes]
                                       [--workers 8] [--workdir /tmp/psctl-hashed-vw] [--bands]

A sync clock applies the per-key sums of every worker's batch at once, and every batch of
the clock was computed at the weights of the clock before, so a sync run is a function of
the partitions and the seed alone. This replays one, one pass, in process: the workers'
partitions of benchmarks/hashed_vw.py's training file (its 200k rows; it writes them), their
batches (``batch_indices``), each worker's gradient (``LogReg`` at the pulled float32 weights,
times the batch's rows: ``Model.key_sums``), the clock's combine (``SyncAccumulator``) and
psctl's FTRL on float32 tables at the sparse defaults (beta 1, L2 0.001). With ``--rules
batch`` it gives the held-out log loss of ``psctl train logreg ... --mode sync --epochs 1``
(benchmarks/hashed_vw.py; the same to 4 decimals in the runs of BENCHMARKS.md 9b) in seconds.

The rules are how FTRL's per-key accumulator n grows at a clock; z and the weight are
FTRL-Proximal's in each:

- ``batch``: psctl's, n += (sum_i g_i)^2 over the rows i of the clock that touched the key;
- ``example``: n += sum_i g_i^2, a per-example learner's n (the workers would push these
  squared sums beside the gradient, and a clock adds them as it adds the gradients);
- ``count``: n += (sum_i g_i)^2 / k, k the rows that touched the key (a pushed count);
- ``newton``: ``example``, with each key's change clipped to its own rows' Newton step,
  |sum_i g_i| / sum_i p_i (1 - p_i) x_i^2 (a curvature sum pushed as well);
- ``pushes``: n += sum over the clock's pushes of (that push's sum g)^2, each worker's push one
  round, as async mode counts them (the shard would square each push as it comes; nothing more
  on the wire). Sync then no longer equals one process pushing the union batch for FTRL.

``--bands`` says where batch 512 loses to batch 32 under psctl's rule: keys banded by the
training rows that touch them, and for each band the held-out loss of batch 512's weights with
that band's replaced by batch 32's.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks")]

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.hashed_vw import CATEGORICAL, make_data  # noqa: E402
from psctl.core.batching import batch_indices  # noqa: E402
from psctl.core.consistency import SyncAccumulator  # noqa: E402
from psctl.core.optim import FTRL  # noqa: E402
from psctl.core.sparse import SparseRows  # noqa: E402
from psctl.data import csvfile, formats  # noqa: E402
from psctl.models import metrics  # noqa: E402
from psctl.models.logreg import LogReg  # noqa: E402

HASH_BITS = 24
RULES = ("batch", "example", "count", "newton", "pushes")


@dataclass
class Rule(FTRL):
    """FTRL-Proximal whose accumulator grows by ``dn`` (the rule's) instead of grad^2: FTRL.apply's
    arithmetic with that one change (the ``batch`` rule calls FTRL.apply itself)."""

    def step(self, values: np.ndarray, grad: np.ndarray, dn: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray) -> None:
        g, dn = grad.astype(np.float64), dn.astype(np.float64)
        w, z, n = (a[rows].astype(np.float64) for a in (values, state["z"], state["n"]))
        z += g - (np.sqrt(n + dn) - np.sqrt(n)) / self.lr * w
        n += dn
        w = np.where(np.abs(z) <= self.l1, 0.0, -(z - np.sign(z) * self.l1) / ((self.beta + np.sqrt(n)) / self.lr + self.l2))
        state["z"][rows], state["n"][rows], values[rows] = z, n, w


def read_parts(path: Path, n_parts: int) -> list[tuple[SparseRows, np.ndarray]]:
    schema = csvfile.read_schema(path)
    out = []
    for part in csvfile.plan_partitions(path, n_parts, schema.has_header):
        X, labels = formats.read_hashed_csv(path, part, schema, CATEGORICAL, HASH_BITS)
        out.append((X, (labels == "1").astype(np.float64)))
    return out


def key_moments(model: LogReg, w: np.ndarray, X: SparseRows, y: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A worker's push for one batch: its keys (the bias key last) and per key: ``g`` the
    gradient sum (as the worker pushes it), ``sq`` its rows' squared gradients, ``count`` its
    rows and ``curv`` the loss's second derivative, each summed over the batch's rows."""
    _, grads, p = model.loss_grad({"w": w}, X, y)
    g = grads["w"] * len(y)
    keys, inverse = X._unique
    inverse = inverse.reshape(-1)
    err = p - y
    # a row's gradient for a key is the sum of that row's entries of the key (hashing may repeat one)
    pair, at = np.unique(X.row_of_entry * len(keys) + inverse, return_inverse=True)
    per_row = np.bincount(at.reshape(-1), weights=X.values * err[X.row_of_entry])
    sq = np.append(np.bincount(pair % len(keys), weights=per_row**2, minlength=len(keys)), err @ err)
    count = np.append(np.bincount(pair % len(keys), minlength=len(keys)), len(y)).astype(np.float64)
    h = p * (1 - p)
    curv = np.append(np.bincount(inverse, weights=X.values**2 * h[X.row_of_entry], minlength=len(keys)), h.sum())
    return np.append(keys, model.n_features), {"g": g, "sq": sq, "count": count, "curv": curv}


def replay(parts: list[tuple[SparseRows, np.ndarray]], batch_size: int, alpha: float, rule: str) -> np.ndarray:
    """The weights after one sync pass (a dense float32 array over the key space and the bias)."""
    space = 2**HASH_BITS - 1
    model = LogReg(space, ["0", "1"], sparse=True)
    ftrl = Rule(lr=alpha, l2=1e-3)
    values = np.zeros(space + 1, np.float32)
    state = ftrl.init_state(values)
    max_rows = max(len(y) for _, y in parts)
    batches = [list(batch_indices(len(y), batch_size, 0, i, 0, max_rows)) for i, (_, y) in enumerate(parts)]
    for clock in range(max(map(len, batches))):
        acc = SyncAccumulator()
        for (X, y), own in zip(parts, batches):
            if clock < len(own):
                rows = own[clock]
                keys, sums = key_moments(model, values[np.append(X[rows].keys, space)], X[rows], y[rows])
                sums["push_sq"] = sums["g"].astype(np.float64) ** 2
                acc.add(clock, {name: (keys, v) for name, v in sums.items()}, len(rows), sums=True)
        [(_, combined)] = acc.complete(None)
        keys, g = combined["g"]
        if rule == "batch":
            FTRL.apply(ftrl, values, g, state, keys, clock)  # psctl's own arithmetic
        elif rule == "newton":
            before = values[keys].astype(np.float64)
            ftrl.step(values, g, combined["sq"][1], state, keys)
            bound = np.abs(g) / np.maximum(combined["curv"][1], 1e-12)
            values[keys] = np.clip(values[keys], before - bound, before + bound)
        elif rule == "pushes":
            ftrl.step(values, g, combined["push_sq"][1], state, keys)
        else:
            dn = combined["sq"][1] if rule == "example" else g * g / combined["count"][1]
            ftrl.step(values, g, dn, state, keys)
    return values


def held_out_loss(values: np.ndarray, test: tuple[SparseRows, np.ndarray]) -> float:
    X, y = test
    model = LogReg(len(values) - 1, ["0", "1"], sparse=True)
    return metrics.log_loss(y, model.predict({"w": values[np.append(X.keys, len(values) - 1)]}, X))


def bands(parts: list[tuple[SparseRows, np.ndarray]], test: tuple[SparseRows, np.ndarray], alpha: float) -> None:
    touched = np.bincount(np.concatenate([X.indices.astype(np.int64) for X, _ in parts]), minlength=2**HASH_BITS)
    touched[-1] = sum(len(y) for _, y in parts)  # the bias key
    small, large = replay(parts, 32, alpha, "batch"), replay(parts, 512, alpha, "batch")
    print(f"alpha {alpha:g}, psctl's rule: batch 32 {held_out_loss(small, test):.4f}, batch 512 {held_out_loss(large, test):.4f}")
    for low, high in ((1, 1), (2, 10), (11, 100), (101, 1000), (1001, 10_000), (10_001, None)):
        band = (touched >= low) & (touched <= (high or touched.max()))
        mixed = np.where(band, small, large)
        print(f"keys in {low}{f'-{high}' if high else '+'} rows ({int(band.sum())} keys): batch 512 with batch 32's weights there"
              f" {held_out_loss(mixed, test):.4f}; mean |w| batch 32 {np.abs(small[band]).mean():.4f},"
              f" batch 512 {np.abs(large[band]).mean():.4f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="32,512,2048", help="per-worker batch sizes")
    ap.add_argument("--alphas", default="0.1", help="FTRL's alpha (psctl's --lr)")
    ap.add_argument("--rules", default=",".join(RULES), help=f"accumulator rules: {', '.join(RULES)}")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--test-rows", type=int, default=20_000)
    ap.add_argument("--workdir", default="/tmp/psctl-hashed-vw")
    ap.add_argument("--bands", action="store_true", help="where batch 512 loses to batch 32 (psctl's rule, the first alpha)")
    args = ap.parse_args()
    rules = args.rules.split(",")
    if not set(rules) <= set(RULES):
        sys.exit(f"--rules: each one of {', '.join(RULES)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, load {info['loadavg_at_start']}, "
          f"psctl {info.get('git_commit')}{' (dirty)' if info.get('git_dirty') else ''}")  # fmt: skip
    train, test_path = make_data(workdir, args.rows, args.test_rows)
    parts = read_parts(train, args.workers)
    [test] = read_parts(test_path, 1)
    y = np.concatenate([y for _, y in parts])
    base = metrics.log_loss(test[1], np.full(len(test[1]), y.mean()))
    print(f"{args.rows} training rows, {args.workers} workers, sync, one pass; held-out log loss (base rate {base:.4f})")
    if args.bands:
        bands(parts, test, float(args.alphas.split(",")[0]))
        return
    for alpha in map(float, args.alphas.split(",")):
        for rule in rules:
            losses = {}
            for batch in map(int, args.batches.split(",")):
                started = time.monotonic()
                losses[batch] = held_out_loss(replay(parts, batch, alpha, rule), test)
                print(f"alpha {alpha:g}, rule {rule:<8} batch {batch:>5}: {losses[batch]:.4f}  ({time.monotonic() - started:.0f} s)", flush=True)
            if 32 in losses and 512 in losses:
                print(f"alpha {alpha:g}, rule {rule:<8} batch 512 - batch 32: {losses[512] - losses[32]:+.4f} (goal <= 0.005)", flush=True)


if __name__ == "__main__":
    main()
