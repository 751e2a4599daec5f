"""Make the stratified 80/20 splits (seed 42) shipped in examples/:

    examples/breast_cancer/{train,test}.csv   from ../shared/data/sklearn-toy/breast_cancer.csv
    examples/digits/{train,test}.csv          from ../shared/data/sklearn-toy/digits.csv

    python examples/make_splits.py [path/to/sklearn-toy]

Both sources are UCI data sets as scikit-learn ships them, label first (see each
folder's ATTRIBUTION.md). Rows are copied byte for byte.
"""

import sys
from pathlib import Path

import numpy as np

from psctl.data.csvfile import stratified_split

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data" / "sklearn-toy"


def split(source: Path, out: Path) -> None:
    header, *rows = source.read_text().splitlines()
    labels = np.array([r.split(",", 1)[0] for r in rows])
    train, test = stratified_split(labels, 0.2, seed=42)
    out.mkdir(exist_ok=True)
    for name, idx in (("train", train), ("test", test)):
        (out / f"{name}.csv").write_text("\n".join([header, *(rows[i] for i in idx)]) + "\n")
        print(f"{out.name}/{name}.csv: {len(idx)} rows")


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    for name in ("breast_cancer", "digits"):
        split(folder / f"{name}.csv", HERE / name)


if __name__ == "__main__":
    main()
