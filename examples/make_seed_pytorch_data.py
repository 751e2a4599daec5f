"""Make examples/seed_pytorch/data.csv: the layout of the seed's PyTorch example.

An id column (0), a binary label (column 1) and ten numeric features
(columns 2-11). The data is synthetic: two Gaussian classes, seed 7.

    python examples/make_seed_pytorch_data.py
"""

from pathlib import Path

import numpy as np

ROWS = 2000


def main() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=ROWS)
    centers = rng.normal(0, 1, size=(2, 10))
    X = centers[y] + rng.normal(0, 1.5, size=(ROWS, 10))
    lines = ["id,label," + ",".join(f"f{i}" for i in range(1, 11))]
    lines += [f"{i + 1},{y[i]}," + ",".join(f"{v:.4f}" for v in X[i]) for i in range(ROWS)]
    out = Path(__file__).resolve().parent / "seed_pytorch" / "data.csv"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {ROWS} rows to {out}")


if __name__ == "__main__":
    main()
