"""psctl from Python: scikit-learn estimators that train on a psctl cluster.

    pip install -e '.[sklearn]' && python examples/from_python.py

Trains logistic regression on the breast cancer data (a stratified 80/20 split, seed 42)
from a DataFrame in memory, saves the model file that `psctl predict` reads (model.npz,
with the held-out rows as test.csv in the current folder), and runs a small grid search
through the embedded cluster.
"""

import time

from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import GridSearchCV, train_test_split

from psctl.sklearn import PSLogisticRegression

X, y = load_breast_cancer(return_X_y=True, as_frame=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=42)

started = time.monotonic()
est = PSLogisticRegression(workers=4, epochs=20, lr=0.5).fit(X_train, y_train)  # 4 worker processes, 2 shards
print(f"fit in {time.monotonic() - started:.1f} s; held-out accuracy {est.score(X_test, y_test):.3f}")
print("first features:", list(est.feature_names_in_[:3]), "coef_", est.coef_.shape)
print("P(benign) of the first 3 test rows:", est.predict_proba(X_test[:3])[:, 1].round(3))
est.save("model.npz")  # the model file psctl predict reads; PSLogisticRegression.load("model.npz") reads it back
X_test.assign(label=y_test).to_csv("test.csv", index=False)  # for: psctl predict model.npz test.csv

# Small data: in_process=True runs the cluster's shard and workers as tasks of this process.
started = time.monotonic()
grid = {"lr": [0.05, 0.5], "mode": ["sync", "ssp"]}
search = GridSearchCV(PSLogisticRegression(in_process=True, workers=2, epochs=10), grid, cv=3).fit(X_train, y_train)
print(f"grid search: 12 fits + 1 in {time.monotonic() - started:.1f} s; best {search.best_params_}, "
      f"CV accuracy {search.best_score_:.3f}, held-out {search.score(X_test, y_test):.3f}")
