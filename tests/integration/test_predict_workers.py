"""``psctl predict --workers N`` and ``--user/--item`` as a person runs them: real processes.

The worker processes must give the very bytes and metrics of one process, for every
model kind; a worker that dies or stops must end the command with one sentence; a
parent that was stopped itself must judge nobody lost; Ctrl-C must leave no worker behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from psctl.apps import recommend
from psctl.data import csvfile

from ..conftest import EXAMPLES, REPO, run_psctl, write_logreg_csv
from .test_bad_input import assert_clean_error
from .test_mf_cli import COLUMNS, write_ratings
from .test_sparse_cli import write_hashed, write_libsvm
from .test_stalls import stopped_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def train(*args: str) -> None:
    r = run_psctl("train", *args, "--workers", "2")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model file, test file) per model kind, trained once for the module."""
    d = tmp_path_factory.mktemp("predict-workers")
    out = {}
    dense_train, dense_test = write_logreg_csv(d / "dense.csv", 400, seed=1), write_logreg_csv(d / "dense-test.csv", 997, seed=2)
    train("logreg", str(dense_train), "--epochs", "3", "--out", str(d / "logreg.npz"))
    out["logreg"] = (d / "logreg.npz", dense_test)
    train("softmax", str(EXAMPLES / "digits" / "train.csv"), "--epochs", "2", "--out", str(d / "softmax.npz"))
    out["softmax"] = (d / "softmax.npz", EXAMPLES / "digits" / "test.csv")
    train("linreg", str(EXAMPLES / "regression" / "train.csv"), "--epochs", "3", "--out", str(d / "linreg.npz"))
    out["linreg"] = (d / "linreg.npz", EXAMPLES / "regression" / "test.csv")
    mf_train, mf_test, _ = write_ratings(d)
    train("mf", str(mf_train), *COLUMNS, "--rank", "2", "--epochs", "5", "--lr", "0.04", "--out", str(d / "mf.npz"))
    out["mf"] = (d / "mf.npz", mf_test)
    hashed_train = write_hashed(d / "hashed.csv", 600, seed=1)
    train("logreg", str(hashed_train), "--label", "click", "--categorical", "site,user", "--hash-bits", "32", "--epochs", "3",
          "--out", str(d / "hashed.npz"))
    out["hashed"] = (d / "hashed.npz", write_hashed(d / "hashed-test.csv", 501, seed=2))
    svm_train = write_libsvm(d / "train.svm", 400, seed=1)
    train("svm", str(svm_train), "--epochs", "3", "--out", str(d / "libsvm.npz"))
    out["libsvm"] = (d / "libsvm.npz", write_libsvm(d / "test.svm", 203, seed=2, extra="1 3:1 25:2 41:1\n"))
    return out


def predict_json(model: Path, data: Path, out: Path, *extra: str) -> dict:
    r = run_psctl("predict", str(model), str(data), "--out", str(out), "--json", *extra)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    result.pop("predictions_path")
    return result


@pytest.mark.parametrize("kind", ["logreg", "softmax", "linreg", "mf", "hashed", "libsvm"])
def test_four_workers_write_the_bytes_and_metrics_of_one_process(models, tmp_path, kind):
    model, data = models[kind]
    single = predict_json(model, data, tmp_path / "single.csv")
    one = predict_json(model, data, tmp_path / "one.csv", "--workers", "1")
    four = predict_json(model, data, tmp_path / "four.csv", "--workers", "4")
    expected = (tmp_path / "single.csv").read_bytes()
    assert len(expected.splitlines()) > 100
    assert (tmp_path / "one.csv").read_bytes() == expected
    assert (tmp_path / "four.csv").read_bytes() == expected
    assert one == single and four == single  # every metric to the last bit, the confusion matrix, cold-start counts
    assert single["metrics"] is not None
    if kind in ("hashed", "libsvm"):
        assert "unknown_features" in four
    if kind == "libsvm":
        assert four["unknown_features"]["occurrences"] >= 1


def test_more_workers_than_rows_and_the_python_api(models, tmp_path):
    import psctl

    model, data = models["logreg"]
    small = tmp_path / "small.csv"
    small.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))  # 3 rows for 8 workers
    whole = psctl.predict(str(model), str(small), out=str(tmp_path / "a.csv"))
    spread = psctl.predict(str(model), str(small), workers=8, out=str(tmp_path / "b.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert np.array_equal(whole.outputs, spread.outputs) and whole.predicted == spread.predicted
    assert whole.metrics["rows"] == spread.metrics["rows"] == 3


def _worker_pids(parent: int) -> list[int]:
    """The predict workers whose parent is ``parent`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"psctl.apps.predict_workers" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop_all(pids: list[int], timeout_s: float = 30) -> None:
    """SIGSTOP the workers ``pids`` and wait until each is stopped: from then on the command
    cannot finish on its own, however slowly this test process ran since it found them."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while True:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("T", "t"):
                break
            assert state not in ("Z", "X", "gone"), "a predict worker finished before it was stopped: the data file is too small"
            assert time.monotonic() < deadline, f"predict worker {pid} did not stop (state {state})"
            time.sleep(0.01)  # a polling interval: the state is re-read


def _start_predict(model: Path, data: Path, out: Path, workers: int, *extra: str, log: str = "ERROR") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "psctl", "predict", str(model), str(data), "--workers", str(workers), "--out", str(out), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200", "PSCTL_LOG": log},
    )


def _wait_heard(proc: subprocess.Popen, n: int) -> None:
    """Read the parent's log (PSCTL_LOG=info) until it has heard each of its ``n`` workers
    (bounded by the test's timeout): then every one is past its start and working."""
    assert proc.stderr is not None
    heard: set[int] = set()
    for line in proc.stderr:
        if m := re.search(r"predict worker (\d+) of \d+: alive", line):
            heard.add(int(m[1]))
            if len(heard) == n:
                return
    pytest.fail(f"the parent heard only workers {sorted(heard)} of {n} before it exited (code {proc.wait()})")


def _worker_k(pid: int) -> int:
    return int(Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").rsplit(b"\0", 1)[1])


def _task_folder(pid: int) -> Path:
    return Path(next(a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if b"psctl-predict-" in a).decode())


def _wait_for_workers(proc: subprocess.Popen, n: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(pids := _worker_pids(proc.pid)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the predict workers did not start"
        time.sleep(0.01)  # a polling interval, not a synchronisation: the condition is re-checked
    return pids


@pytest.fixture(scope="module")
def big(models, tmp_path_factory):
    """A file big enough that its workers are still running when the test acts on them."""
    return write_logreg_csv(tmp_path_factory.mktemp("big") / "big.csv", 200_000, seed=3)


@pytest.mark.timeout(120)
def test_a_killed_worker_ends_the_command_with_one_sentence(models, big, tmp_path):
    model, _ = models["logreg"]
    proc = _start_predict(model, big, tmp_path / "p.csv", 3)
    victim = _wait_for_workers(proc, 3)[1]
    _stop_all([victim])  # so it is killed before it finished, however slow this test is
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_clean_error(result, "predict worker", "was killed by signal SIGKILL before it finished", "no predictions were written")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.timeout(120)
def test_ctrl_c_leaves_no_worker_behind(models, big, tmp_path):
    model, _ = models["logreg"]
    # A long failure timeout: the stopped workers must not be judged silent before Ctrl-C is handled.
    proc = _start_predict(model, big, tmp_path / "p.csv", 3, "--failure-timeout-s", "100")
    pids = _wait_for_workers(proc, 3)
    _stop_all(pids)  # the command cannot have finished when Ctrl-C reaches it (the parent kills stopped workers too)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "a predict worker outlived Ctrl-C"
        time.sleep(0.01)


@pytest.mark.timeout(120)
def test_workers_of_a_killed_parent_exit(models, big, tmp_path):
    model, _ = models["logreg"]
    proc = _start_predict(model, big, tmp_path / "p.csv", 2)
    pids = _wait_for_workers(proc, 2)
    _stop_all(pids)  # still working when their parent dies, however slow this test is
    folder = Path(next(a for a in Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0") if b"psctl-predict-" in a).decode())
    proc.kill()
    proc.communicate(timeout=30)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "a predict worker outlived its parent"
        time.sleep(0.01)
    assert not folder.exists()  # the task folder the parent could not remove

FAILURE_TIMEOUT_S = 2.0


@pytest.mark.timeout(120)
def test_a_stopped_worker_is_declared_lost_within_the_failure_timeout(models, big, tmp_path):
    """kill -STOP of one worker: its pipe stays open and it never exits, so only its
    silence tells. Every worker goes, and neither the task folder nor --out is left."""
    model, _ = models["logreg"]
    victim = None
    with _start_predict(model, big, tmp_path / "p.csv", 3, "--failure-timeout-s", str(FAILURE_TIMEOUT_S), log="info") as proc:
        try:
            _wait_heard(proc, 3)
            pids = _worker_pids(proc.pid)
            assert len(pids) == 3, "a worker finished before it was stopped: the data file is too small"
            _stop_all(pids)  # all, so none can finish meanwhile; then every one but the victim goes on
            victim = next(p for p in pids if _worker_k(p) == 1)
            stopped = time.monotonic()
            for pid in pids:
                if pid != victim:
                    os.kill(pid, signal.SIGCONT)
            folder = _task_folder(victim)
            proc.wait(timeout=FAILURE_TIMEOUT_S + 60)
            took_s = time.monotonic() - stopped
            result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.read(), proc.stderr.read())
        finally:  # without the watch the command waits forever: leave nothing behind
            if proc.poll() is None:
                proc.kill()
            if victim is not None and _alive(victim):
                os.kill(victim, signal.SIGKILL)
    second = csvfile.plan_partitions(big, 3)[1]
    assert_clean_error(
        result, f"predict worker 2 of 3 ({second.n_rows} rows from line {second.first_line} of '{big}') gave no sign of life for",
        f"--failure-timeout-s is {FAILURE_TIMEOUT_S:g}", "so every worker was stopped; no predictions were written",
    )
    assert result.returncode == 1
    silent_s = float(re.search(r"no sign of life for ([\d.]+) s", result.stderr)[1])
    assert FAILURE_TIMEOUT_S <= silent_s <= took_s + 0.5  # printed to 0.1 s: 2.04 s reads "2.0"
    assert took_s < FAILURE_TIMEOUT_S + 15, f"declared lost after {took_s:.1f} s"
    assert not any(_alive(p) for p in pids), "a predict worker outlived the command"
    assert not folder.exists() and not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="module")
def bigger(big, tmp_path_factory):
    """600,000 rows (big's, three times): each of two workers works for seconds, so they
    are still working when a parent stopped for a few seconds runs again."""
    path = tmp_path_factory.mktemp("bigger") / "bigger.csv"
    header, rows = big.read_bytes().split(b"\n", 1)
    path.write_bytes(header + b"\n" + rows * 3)
    return path


@pytest.fixture(scope="module")
def bigger_single(models, bigger, tmp_path_factory) -> bytes:
    """The predictions file of ``bigger`` written by one process."""
    out = tmp_path_factory.mktemp("bigger-single") / "single.csv"
    single = run_psctl("predict", str(models["logreg"][0]), str(bigger), "--out", str(out))
    assert single.returncode == 0, single.stderr
    return out.read_bytes()


@pytest.mark.timeout(240)
def test_a_stopped_parent_declares_no_worker_lost(models, bigger, bigger_single, tmp_path):
    """kill -STOP of 'psctl predict' itself for twice the failure timeout: its workers went
    on and wrote to their pipes meanwhile, so when it runs again it reads that before it
    judges them, and the prediction completes, equal to one process's."""
    model, _ = models["logreg"]
    timeout_s = 1.5
    with _start_predict(model, bigger, tmp_path / "p.csv", 2, "--failure-timeout-s", str(timeout_s), log="info") as proc:
        try:
            _wait_heard(proc, 2)
            stopped_for(proc.pid, 2 * timeout_s)
            proc.wait(timeout=180)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "no sign of life" not in err
    assert (tmp_path / "p.csv").read_bytes() == bigger_single


@pytest.mark.timeout(240)
def test_a_worker_inside_one_long_numpy_call_is_not_declared_lost(models, bigger, bigger_single, tmp_path):
    """One worker parses 600,000 rows in one np.loadtxt call, which holds the interpreter's
    lock for seconds on a loaded machine (a Python heartbeat thread would fall silent)."""
    model, _ = models["logreg"]
    r = run_psctl("predict", str(model), str(bigger), "--workers", "1", "--failure-timeout-s", "1", "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.csv").read_bytes() == bigger_single


def test_bad_input_is_one_sentence(models, tmp_path):
    model, data = models["logreg"]
    assert_clean_error(run_psctl("predict", str(model), str(data), "--workers", "0"), "--workers must be between 1 and", code=2)
    for bad_timeout in ("0", "-1", "nan", "inf"):
        assert_clean_error(run_psctl("predict", str(model), str(data), "--workers", "2", "--failure-timeout-s", bad_timeout),
                           "--failure-timeout-s must be a positive number of seconds", code=2)
    assert_clean_error(run_psctl("predict", str(model), str(data), "--failure-timeout-s", "2"), "it needs --workers N", code=2)
    assert_clean_error(run_psctl("predict", str(model), str(tmp_path / "none.csv"), "--workers", "2"), "does not exist", code=2)
    bad = tmp_path / "bad.csv"
    lines = data.read_text().splitlines()
    lines[900] = lines[900].replace(lines[900].split(",")[2], "oops", 1)
    bad.write_text("\n".join(lines) + "\n")
    # The worker holding line 901 reports the same sentence as one process would.
    single = run_psctl("predict", str(model), str(bad))
    spread = run_psctl("predict", str(model), str(bad), "--workers", "4")
    assert_clean_error(single, "line 901", "'oops' is not a number", code=2)
    assert_clean_error(spread, "line 901", "'oops' is not a number", code=2)
    assert spread.stderr == single.stderr


def test_one_rating_without_a_file(models):
    model, data = models["mf"]
    mf = recommend.load_mf(str(model))
    user, item = mf.users.labels(np.array([3]))[0], mf.items.labels(np.array([5]))[0]
    expected = float(mf.model.predict(mf.params, np.array([[3, 5]]))[0])
    r = run_psctl("predict", str(model), "--user", user, "--item", item, "--json")
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    assert one["predicted_rating"] == pytest.approx(expected, abs=1e-12) and one["user"] == user
    assert one["rating_range"] == list(mf.model.rating_range)
    plain = run_psctl("predict", str(model), "--user", user, "--item", item)
    assert plain.returncode == 0 and float(plain.stdout) == pytest.approx(expected, abs=1e-4)
    assert_clean_error(run_psctl("predict", str(model), "--user", "ghost", "--item", item), "user 'ghost' is not in the model", code=2)
    mean = run_psctl("predict", str(model), "--user", "ghost", "--item", item, "--cold-start", "mean", "--json")
    assert json.loads(mean.stdout)["predicted_rating"] == pytest.approx(mf.model.mean + mf.params["item_bias"][5])
    assert_clean_error(run_psctl("predict", str(model), "--user", user), "--user and --item go together", code=2)
    assert_clean_error(run_psctl("predict", str(model), str(data), "--user", user, "--item", item), "without a data file", code=2)
    assert_clean_error(run_psctl("predict", str(models["logreg"][0]), "--user", user, "--item", item), "are for mf models", code=2)
    assert_clean_error(run_psctl("predict", str(model)), "give a data file", code=2)


def test_a_trained_mf_model_never_predicts_outside_the_training_range(tmp_path):
    """The issue saw 5.31 on a 0.5-5 scale: a large step overshoots for users with few ratings."""
    train_file = EXAMPLES / "ratings" / "train.csv"
    model = tmp_path / "mf.npz"
    r = run_psctl("train", "mf", str(train_file), "--workers", "2", "--rank", "8", "--epochs", "8", "--lr", "0.0625", "--l2", "0",
                  "--out", str(model))
    assert r.returncode == 0, r.stderr
    mf = recommend.load_mf(str(model))
    truth = np.loadtxt(train_file, delimiter=",", skiprows=1, usecols=2)
    assert mf.model.rating_range == (truth.min(), truth.max()) == (0.5, 5.0)
    raw = recommend.scores_for(mf, np.arange(len(mf.users)))
    assert raw.max() > 5.0  # unclipped, the model does overshoot
    users = np.repeat(np.array(mf.users.labels(np.arange(len(mf.users)))), len(mf.items))
    items = np.tile(np.array(mf.items.labels(np.arange(len(mf.items)))), len(mf.users))
    import psctl

    every = psctl.predict_pairs(str(model), users, items)
    assert every.min() >= 0.5 and every.max() == 5.0
    out = tmp_path / "rec.csv"
    assert run_psctl("recommend", str(model), "--top", "5", "--out", str(out)).returncode == 0
    scores = np.loadtxt(out, delimiter=",", skiprows=1, usecols=3)
    assert scores.max() <= 5.0
    p = run_psctl("predict", str(model), str(EXAMPLES / "ratings" / "test.csv"), "--out", str(tmp_path / "p.csv"))
    assert p.returncode == 0, p.stderr
    predicted = np.genfromtxt(tmp_path / "p.csv", delimiter=",", skip_header=1, usecols=3)
    assert np.nanmin(predicted) >= 0.5 and np.nanmax(predicted) <= 5.0
