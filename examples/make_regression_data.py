"""Make examples/regression/{train,test}.csv: a synthetic linear regression problem.

y = 3 x1 - 2 x2 + 0.5 x3 + 4 + noise, with x4, x5 irrelevant; 1,000 rows for
training and 250 for testing, seed 3.

    python examples/make_regression_data.py
"""

from pathlib import Path

import numpy as np


def main() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(1250, 5)) * [1.0, 2.0, 5.0, 1.0, 3.0]
    y = X @ [3.0, -2.0, 0.5, 0.0, 0.0] + 4.0 + rng.normal(scale=1.5, size=1250)
    out = Path(__file__).resolve().parent / "regression"
    out.mkdir(exist_ok=True)
    header = "target,x1,x2,x3,x4,x5"
    for name, rows in (("train", slice(0, 1000)), ("test", slice(1000, 1250))):
        lines = [f"{t:.4f}," + ",".join(f"{v:.4f}" for v in x) for t, x in zip(y[rows], X[rows])]
        (out / f"{name}.csv").write_text("\n".join([header, *lines]) + "\n")
        print(f"{name}: {len(lines)} rows")


if __name__ == "__main__":
    main()
