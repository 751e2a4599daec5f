"""Make examples/ratings/{ratings,train,test}.csv: synthetic MovieLens-style ratings.

    python examples/make_ratings.py

300 users rate items drawn with a popularity skew from 250 items whose ids are
scattered over 1..10000 (ids are ids, not row numbers). A rating is a global
mean plus a user and an item bias plus a rank-3 interaction plus noise, clipped
to 0.5..5 and rounded to half stars, as on MovieLens. ``train.csv`` and
``test.csv`` are a random 80/20 split (seed 42) of ``ratings.csv``; some test
rows have users or items that train.csv lacks (cold start). Seeded: the same
files every time.
"""

from pathlib import Path

import numpy as np

from psctl.data.ratings import random_split

HERE = Path(__file__).resolve().parent / "ratings"
USERS, ITEMS, RANK = 300, 250, 3


def make_ratings(seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    item_ids = np.sort(rng.choice(np.arange(1, 10_001), size=ITEMS, replace=False))
    popularity = 1.0 / np.arange(1, ITEMS + 1) ** 1.1
    popularity = rng.permutation(popularity / popularity.sum())
    user_bias, item_bias = rng.normal(0, 0.4, USERS), rng.normal(0, 0.5, ITEMS)
    P, Q = rng.normal(0, 0.5, (USERS, RANK)), rng.normal(0, 0.5, (ITEMS, RANK))
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(USERS):
        n = min(int(rng.geometric(1 / 20)), ITEMS)
        items = np.sort(rng.choice(ITEMS, size=n, replace=False, p=popularity))
        value = 3.5 + user_bias[u] + item_bias[items] + Q[items] @ P[u] + rng.normal(0, 0.5, n)
        stars = np.clip(np.round(value * 2) / 2, 0.5, 5.0)
        stamps = rng.integers(1_000_000_000, 1_600_000_000, n)
        lines += [f"{u + 1},{item_ids[i]},{s:.1f},{t}" for i, s, t in zip(items, stars, stamps)]
    return lines


def main() -> None:
    header, *rows = make_ratings()
    HERE.mkdir(exist_ok=True)
    train, test = random_split(len(rows), 0.2, seed=42)
    for name, idx in (("ratings", np.arange(len(rows))), ("train", train), ("test", test)):
        (HERE / f"{name}.csv").write_text("\n".join([header, *(rows[i] for i in idx)]) + "\n")
        print(f"{name}.csv: {len(idx)} rows")


if __name__ == "__main__":
    main()
