"""The issue's splits of scikit-learn's toy data sets, written as CSV (label first).

Issue 16 measured scikit-learn's defaults on ``train_test_split(X, y, test_size=0.2,
stratify=y, random_state=42)`` of ``load_digits()`` / ``load_breast_cancer()`` (its
LogisticRegression 0.972 on digits reproduces there, not on examples/digits, a different
stratified split made by psctl's own ``stratified_split``). ``python benchmarks/quality.py
--split sklearn`` trains on it; scikit-learn ships the data, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LOADERS = {"digits": "load_digits", "breast_cancer": "load_breast_cancer"}


def issue_split(name: str, folder: Path) -> tuple[Path, Path]:
    """``folder``/{train,test}.csv of ``name`` ("digits" or "breast_cancer"), written once."""
    train, test = folder / "train.csv", folder / "test.csv"
    if train.exists() and test.exists():
        return train, test
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    X, y = getattr(sklearn.datasets, LOADERS[name])(return_X_y=True)
    parts = train_test_split(X, y, test_size=0.2, stratify=y, random_state=42)
    header = ",".join(["label", *(f"f{i}" for i in range(X.shape[1]))])
    folder.mkdir(parents=True, exist_ok=True)
    fmt = "%d" if name == "digits" else "%.10g"
    for path, (features, labels) in ((train, (parts[0], parts[2])), (test, (parts[1], parts[3]))):
        np.savetxt(path, np.column_stack([labels, features]), fmt=fmt, delimiter=",", header=header, comments="")
    return train, test
