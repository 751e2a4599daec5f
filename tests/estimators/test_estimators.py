"""psctl.sklearn against psctl's own commands: training from memory equals training on the
same data as a CSV, predictions equal ``psctl predict`` on the saved model, and the
estimators work inside scikit-learn's model selection."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the estimators need scikit-learn: pip install 'psctl[sklearn]'")
pd = pytest.importorskip("pandas", reason="DataFrame input needs pandas")

from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from psctl.errors import ConnectError, ModelFileError  # noqa: E402
from psctl.files import modelfile  # noqa: E402
from psctl.sklearn import (  # noqa: E402
    PSLinearRegression,
    PSLinearSVC,
    PSLogisticRegression,
    PSMatrixFactorization,
    PSSoftmaxRegression,
)
from tests.conftest import EXAMPLES, REPO, psctl_json, run_psctl  # noqa: E402
from tests.integration.cluster import ServerProcess  # noqa: E402

pytestmark = pytest.mark.integration
CANCER = EXAMPLES / "breast_cancer"
RATINGS = EXAMPLES / "ratings"
FAST = {"in_process": True, "workers": 2, "shards": 1}


def _cancer(name: str) -> tuple[pd.DataFrame, pd.Series]:
    df = pd.read_csv(CANCER / name)
    return df.drop(columns="label"), df["label"]


@pytest.mark.timeout(120)
def test_training_from_memory_equals_training_on_the_csv(tmp_path: Path):
    """The estimator (a worker process mapping the .npy) and psctl train on the CSV: the
    same statistics pass, standardization and model, to float tolerance. One worker: a
    CSV's partitions are byte ranges and an array's row ranges, so with more workers the
    rows are dealt out differently (and the batches differ)."""
    X, y = _cancer("train.csv")
    est = PSLogisticRegression(workers=1, shards=2, epochs=3, seed=5).fit(X, y)
    psctl_json("train", "logreg", str(CANCER / "train.csv"), "--workers", "1", "--shards", "2", "--epochs", "3",
               "--seed", "5", "--out", str(tmp_path / "csv.npz"))  # fmt: skip
    params, meta = modelfile.load_model(str(tmp_path / "csv.npz"))
    assert est.model_meta_["feature_names"] == meta["feature_names"] == list(X.columns)
    assert list(est.feature_names_in_) == list(X.columns) and est.n_features_in_ == 30
    np.testing.assert_allclose(est.model_meta_["standardize"]["mean"], meta["standardize"]["mean"], rtol=1e-12)
    np.testing.assert_allclose(est.model_meta_["standardize"]["std"], meta["standardize"]["std"], rtol=1e-12)
    np.testing.assert_allclose(est.model_params_["w"], params["w"], rtol=1e-5, atol=1e-7)
    assert est.model_meta_["training"]["data"] == "(in memory)"


@pytest.mark.timeout(120)
def test_predictions_equal_psctl_predict_on_the_saved_model(tmp_path: Path):
    X, y = _cancer("train.csv")
    X_test, y_test = _cancer("test.csv")
    est = PSLogisticRegression(epochs=5, **FAST).fit(X, y)
    est.save(str(tmp_path / "model.npz"))
    out = psctl_json("predict", str(tmp_path / "model.npz"), str(CANCER / "test.csv"), "--out", str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["predicted"]) for r in rows] == est.predict(X_test).tolist()
    np.testing.assert_allclose([float(r["probability"]) for r in rows], est.predict_proba(X_test)[:, 1], atol=1e-6)
    assert out["metrics"]["accuracy"] == pytest.approx(est.score(X_test, y_test))
    # and the file loads back as an estimator that predicts the same
    loaded = PSLogisticRegression.load(str(tmp_path / "model.npz"))
    assert loaded.predict(X_test).tolist() == est.predict(X_test).tolist()
    assert list(loaded.classes_) == [0, 1] and list(loaded.feature_names_in_) == list(X.columns)
    assert loaded.epochs == 5 and loaded.workers == 2
    np.testing.assert_allclose(loaded.coef_, est.coef_)
    with pytest.raises(ModelFileError, match="is a logreg model; PSSoftmaxRegression loads softmax models"):
        PSSoftmaxRegression.load(str(tmp_path / "model.npz"))


@pytest.mark.timeout(120)
def test_linear_weights_on_the_input_scale_and_string_classes():
    X, y = _cancer("train.csv")
    named = np.where(y == 1, "benign", "malignant")
    est = PSSoftmaxRegression(epochs=3, **FAST).fit(X.to_numpy(), named)
    assert list(est.classes_) == ["benign", "malignant"]
    z = X.to_numpy() @ est.coef_.T + est.intercept_
    np.testing.assert_allclose(z[:, 1] - z[:, 0], est.decision_function(X.to_numpy()), rtol=1e-6, atol=1e-6)
    assert set(est.predict(X.to_numpy())) <= {"benign", "malignant"}
    reg = PSLinearRegression(epochs=3, **FAST).fit(X.iloc[:, 1:], X.iloc[:, 0])
    np.testing.assert_allclose(X.iloc[:, 1:].to_numpy() @ reg.coef_ + reg.intercept_, reg.predict(X.iloc[:, 1:]), rtol=1e-6)


@pytest.mark.timeout(120)
def test_matrix_factorization_equals_psctl_predict_and_recommend(tmp_path: Path):
    train = pd.read_csv(RATINGS / "train.csv")
    test = pd.read_csv(RATINGS / "test.csv")
    mf = PSMatrixFactorization(rank=5, epochs=5, lr=0.16, l2=0.1, **FAST).fit(train)
    mf.save(str(tmp_path / "mf.npz"))
    run = run_psctl("predict", str(tmp_path / "mf.npz"), str(RATINGS / "test.csv"), "--cold-start", "mean",
                    "--out", str(tmp_path / "p.csv"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    with open(tmp_path / "p.csv") as fh:
        theirs = [float(r["predicted"]) for r in csv.DictReader(fh)]
    np.testing.assert_allclose(mf.predict(test), theirs, rtol=1e-5)  # the CSV holds 6 significant digits
    # (user, item) rows as an array predict the same as the frame
    np.testing.assert_allclose(mf.predict(test[["userId", "movieId"]].to_numpy()), mf.predict(test))
    top = json.loads(run_psctl("recommend", str(tmp_path / "mf.npz"), "--user", "7", "--top", "3", "--json").stdout)
    ours = mf.recommend(7, 3)
    assert [item for item, _ in ours] == [str(r["item"]) for r in top["items"]]
    loaded = PSMatrixFactorization.load(str(tmp_path / "mf.npz"))
    np.testing.assert_allclose(loaded.predict(test), mf.predict(test))


@pytest.mark.timeout(180)
def test_grid_search_gets_the_same_best_score_twice():
    """GridSearchCV over lr and mode, 2-fold, through the embedded cluster. Every point of
    the grid is deterministic under a seed: sync mode with 2 workers (a clock's pushes are
    summed, each weighted in float64, and two add the same in either order; the statistics
    are merged in partition order), and async mode with one worker (nothing to race).
    Async with several workers is not, nor bit for bit sync with three or more (their
    pushes are summed in arrival order), so neither is in the grid."""
    X, y = _cancer("train.csv")
    base = PSLogisticRegression(epochs=3, seed=7, in_process=True, shards=1)
    grid = [{"mode": ["sync"], "workers": [2], "lr": [0.01, 0.3]}, {"mode": ["async"], "workers": [1], "lr": [0.01, 0.3]}]
    runs = [GridSearchCV(base, grid, cv=2).fit(X, y) for _ in range(2)]
    assert runs[0].best_score_ == runs[1].best_score_
    assert runs[0].best_params_ == runs[1].best_params_
    np.testing.assert_array_equal(runs[0].cv_results_["mean_test_score"], runs[1].cv_results_["mean_test_score"])
    assert runs[0].best_score_ > 0.9


@pytest.mark.timeout(120)
def test_pipeline_cross_val_clone_and_pickle():
    X, y = _cancer("train.csv")
    pipe = make_pipeline(StandardScaler(), PSLogisticRegression(epochs=3, **FAST))
    scores = cross_val_score(pipe, X, y, cv=2)
    assert len(scores) == 2 and min(scores) > 0.9
    est = PSLogisticRegression(epochs=3, **FAST).fit(X, y)
    copy = clone(est)
    assert copy.get_params() == est.get_params() and not hasattr(copy, "model_params_")
    again = pickle.loads(pickle.dumps(est))
    assert again.predict(X).tolist() == est.predict(X).tolist()
    assert all(isinstance(v, np.ndarray) for v in again.model_params_.values())


@pytest.mark.timeout(60)
def test_bad_options_and_an_unreachable_server_are_one_sentence():
    X, y = _cancer("train.csv")
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        PSLogisticRegression(optimizer="newton", **FAST).fit(X, y)
    with pytest.raises(ValueError, match="--staleness is the bound of --mode ssp"):
        PSLogisticRegression(staleness=2, **FAST).fit(X, y)
    with pytest.raises(ValueError, match="Only binary classification is supported"):
        PSLogisticRegression(**FAST).fit(X, np.arange(len(y)) % 3)
    with pytest.raises(ConnectError):
        PSLogisticRegression(server="127.0.0.1:1", in_process=True, workers=1).fit(X, y)


def test_a_missing_extra_names_the_pip_install():
    code = "import sys; sys.modules['sklearn'] = None\ntry:\n import psctl.sklearn\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "psctl.sklearn needs scikit-learn: run pip install 'psctl[sklearn]'"


@pytest.mark.timeout(120)
def test_a_sparse_matrix_trains_as_libsvm_rows_and_predicts_as_psctl_predict(tmp_path: Path):
    sp = pytest.importorskip("scipy.sparse", reason="sparse input needs scipy")
    X, y = _cancer("train.csv")
    dense = (X / X.max()).to_numpy()
    S = sp.csr_matrix(np.where(dense > 0.5, dense, 0.0))
    est = PSLogisticRegression(epochs=5, lr=0.008, **FAST).fit(S, y)  # SGD on per-key sums: 0.5 / (2 x 32) per row
    assert est.model_meta_["input"] == {"format": "libsvm", "index_base": 0, "n_features": 30}
    est.save(str(tmp_path / "sparse.npz"))
    lines = []
    for label, row in zip(y, S):
        lines.append(" ".join([str(label), *(f"{j}:{float(v)!r}" for j, v in zip(row.indices, row.data))]))
    (tmp_path / "rows.libsvm").write_text("\n".join(lines) + "\n")
    psctl_json("predict", str(tmp_path / "sparse.npz"), str(tmp_path / "rows.libsvm"), "--out", str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv") as fh:
        theirs = [float(r["probability"]) for r in csv.DictReader(fh)]
    np.testing.assert_allclose(est.predict_proba(S)[:, 1], theirs, atol=1e-6)
    np.testing.assert_allclose(est.predict_proba(S.toarray()), est.predict_proba(S))  # dense rows of the same numbers
    # S in float64 here; psctl holds sparse rows as float32 (SparseRows): a score near 0 differs by that rounding
    np.testing.assert_allclose(S @ est.coef_[0] + est.intercept_[0], est.decision_function(S), rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(120)
def test_a_sparse_matrix_takes_the_sparse_defaults_and_a_dense_one_the_dense_ones():
    """The defaults are chosen once the input's kind is known: FTRL on per-key sums for a
    scipy CSR matrix (as for LIBSVM and hashed files), AdaGrad for the same rows dense."""
    sp = pytest.importorskip("scipy.sparse", reason="sparse input needs scipy")
    X, y = _cancer("train.csv")
    dense = (X / X.max()).to_numpy()
    sparse = PSLogisticRegression(epochs=3, **FAST).fit(sp.csr_matrix(dense), y)
    assert sparse.model_meta_["optimizer"] == {"name": "ftrl", "params": {"lr": 0.1, "l1": 0.0, "l2": 0.001}}
    assert sparse.model_meta_["training"]["batch_size"] == 16 and sparse.score(sp.csr_matrix(dense), y) > 0.8
    plain = PSLogisticRegression(epochs=3, **FAST).fit(dense, y)
    assert plain.model_meta_["optimizer"] == {"name": "adagrad", "params": {"lr": 0.1}}


@pytest.mark.timeout(120)
def test_categorical_columns_are_hashed_as_a_hashed_csv_and_predict_as_psctl_predict(tmp_path: Path):
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"site": rng.choice(["news", "shop", "mail"], 600), "hour": rng.integers(0, 24, 600),
                       "price": rng.normal(size=600)})  # fmt: skip
    df.loc[::17, "price"] = np.nan  # missing: no key, as an empty CSV cell
    y = ((df.site == "shop") | (df.hour > 18)).astype(int)
    est = PSLogisticRegression(epochs=8, lr=0.5, categorical=["site", "hour"], hash_bits=18, **FAST).fit(df, y)
    assert est.model_meta_["input"] == {"format": "hashed_csv", "hash_bits": 18, "categorical": ["hour", "site"]}
    assert list(est.feature_names_in_) == ["site", "hour", "price"] and est.score(df, y) > 0.8
    est.save(str(tmp_path / "hashed.npz"))
    df.assign(label=y).to_csv(tmp_path / "rows.csv", index=False)
    psctl_json("predict", str(tmp_path / "hashed.npz"), str(tmp_path / "rows.csv"), "--out", str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv") as fh:
        theirs = [float(r["probability"]) for r in csv.DictReader(fh)]
    np.testing.assert_allclose(est.predict_proba(df)[:, 1], theirs, atol=1e-6)
    loaded = PSLogisticRegression.load(str(tmp_path / "hashed.npz"))
    assert (loaded.categorical, loaded.hash_bits) == (["hour", "site"], 18)
    assert loaded.predict(df).tolist() == est.predict(df).tolist()
    with pytest.raises(AttributeError, match="no coef_"):
        est.coef_
    with pytest.raises(ValueError, match="lacks the column 'price'"):
        est.predict(df.drop(columns="price"))


@pytest.mark.timeout(60)
async def test_fit_works_where_an_event_loop_already_runs():
    """As in a Jupyter notebook: fit runs the training on a loop of its own, in a thread."""
    X, y = _cancer("train.csv")
    est = PSLogisticRegression(epochs=2, **FAST).fit(X, y)
    assert est.score(X, y) > 0.9


@pytest.mark.timeout(120)
def test_fits_on_a_running_psctl_server_reuse_it():
    """server=HOST:PORT: each fit is a job on that server's shards, its workers started here
    (worker processes, then tasks of this process); the server serves job after job."""
    X, y = _cancer("train.csv")
    server = ServerProcess(2)
    try:
        on_server = [
            PSLogisticRegression(epochs=3, seed=2, workers=2, server=server.address, in_process=in_process).fit(X, y)
            for in_process in (False, True)
        ]
    finally:
        code, _, err = server.stop()
    assert code == 0, err
    embedded = PSLogisticRegression(epochs=3, seed=2, workers=2, in_process=True).fit(X, y)
    for est in on_server:  # sync with two workers: the same model on any cluster
        np.testing.assert_array_equal(est.model_params_["w"], embedded.model_params_["w"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "cls, folder, label",
    [(PSSoftmaxRegression, "digits", "label"), (PSLinearSVC, "digits", "label"), (PSLinearRegression, "regression", "target")],
)
def test_every_linear_kind_predicts_as_psctl_predict(tmp_path: Path, cls, folder, label):
    train, test = (pd.read_csv(EXAMPLES / folder / f"{n}.csv") for n in ("train", "test"))
    est = cls(epochs=3, **FAST).fit(train.drop(columns=label), train[label])
    est.save(str(tmp_path / "m.npz"))
    psctl_json("predict", str(tmp_path / "m.npz"), str(EXAMPLES / folder / "test.csv"), "--out", str(tmp_path / "p.csv"))
    theirs = pd.read_csv(tmp_path / "p.csv")
    X_test = test.drop(columns=label)
    if cls is PSLinearRegression:
        np.testing.assert_allclose(est.predict(X_test), theirs["predicted"], rtol=1e-5)  # 6 significant digits
        return
    assert est.predict(X_test).tolist() == theirs["predicted"].tolist()
    scores = theirs[[f"score_{c}" for c in est.classes_]].to_numpy()
    ours = est.predict_proba(X_test) if cls is PSSoftmaxRegression else est.decision_function(X_test)
    np.testing.assert_allclose(ours, scores, atol=1e-6)
