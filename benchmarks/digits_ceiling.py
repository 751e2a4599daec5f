"""How high a linear model gets on the digits split: the exact optimum of softmax's objective.

    python benchmarks/digits_ceiling.py

For each L2 (psctl's ``--l2``, mean-loss scale: scikit-learn's C = 1 / (rows x l2)) it solves
the objective psctl trains (mean cross-entropy + l2/2 ||W||^2 on standardized features, bias
not penalized) with scikit-learn's lbfgs to tol 1e-10 and prints the held-out rows it gets
right, and the 10-fold cross-validated accuracy on the training split (no test rows used).
0.96 of examples/digits/test.csv needs 345 of its 359 rows (docs/DEFAULTS.md, Limits).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
L2 = (1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2)


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = (np.loadtxt(DIGITS / f, delimiter=",", skiprows=1) for f in ("train.csv", "test.csv"))
    X, y, Xt, yt = train[:, 1:], train[:, 0], test[:, 1:], test[:, 0]
    n = len(y)
    print(f"{'l2':>8} {'test rows right':>16} {'10-fold CV (train)':>19}")
    for l2 in L2:
        exact = make_pipeline(StandardScaler(), LogisticRegression(C=1 / (n * l2), max_iter=20000, tol=1e-10))
        right = int((exact.fit(X, y).predict(Xt) == yt).sum())
        folds = StratifiedKFold(10, shuffle=True, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs's ConvergenceWarning at these fold sizes
            cv = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=1 / (0.9 * n * l2), max_iter=5000)), X, y, cv=folds)
        print(f"{l2:>8g} {right:>10}/{len(yt)} {cv.mean():>19.4f}")


if __name__ == "__main__":
    main()
