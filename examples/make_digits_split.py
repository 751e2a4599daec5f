"""Make examples/digits/{train,test}.csv: a stratified 80/20 split (seed 42) of the
UCI optical digits test set as scikit-learn ships it (label, then 64 pixels 0..16).

    python examples/make_digits_split.py [path/to/digits.csv]
"""

import sys
from pathlib import Path

import numpy as np

from psctl.data import stratified_split

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data" / "sklearn-toy" / "digits.csv"


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    header, *rows = source.read_text().splitlines()
    labels = np.array([r.split(",", 1)[0] for r in rows])
    train, test = stratified_split(labels, 0.2, seed=42)
    out = HERE / "digits"
    out.mkdir(exist_ok=True)
    for name, idx in (("train", train), ("test", test)):
        (out / f"{name}.csv").write_text("\n".join([header, *(rows[i] for i in idx)]) + "\n")
        print(f"{name}: {len(idx)} rows")


if __name__ == "__main__":
    main()
