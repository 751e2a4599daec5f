"""The command line as a user and a script meet it: refusals before anything starts,
``status`` against the wrong address and under ``--watch``, ``--json`` results, piped output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from psctl import net

from ..conftest import EXAMPLES, REPO, run_psctl
from .cluster import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
TEST = EXAMPLES / "breast_cancer" / "test.csv"


def assert_refused(r: subprocess.CompletedProcess, sentence: str, code: int = 2) -> None:
    """One sentence on stderr, the usage exit code, and nothing started (no 'planned:' or 'cluster up' line)."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    message = " ".join(r.stderr.split())
    assert message.startswith("psctl: error:") and sentence in message, r.stderr
    assert r.stdout == "", r.stdout


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--workers", "2", "--local-workers", "1"], "--local-workers is for a job on a running server (--server HOST:PORT)"),
        (["--mode", "sync", "--staleness", "2"], "--staleness is the bound of --mode ssp; --mode sync has staleness 0"),
        (["--mode", "async", "--staleness", "2"], "--staleness is the bound of --mode ssp; --mode async has none"),
        (["--out", "{tmp}"], "--out names the folder"),
        (["--server", "127.0.0.1:1", "--shards", "3"], "--shards is for the embedded cluster"),
        (["--resume", "{tmp}/a", "--checkpoint-dir", "{tmp}/b"], "--resume continues in its own folder"),
    ],
)
def test_train_refuses_contradicting_options_before_starting(tmp_path, args, sentence):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_refused(run_psctl("train", "logreg", str(TRAIN), "--epochs", "1", *args, timeout_s=30), sentence)


def test_linreg_huber_delta_needs_huber_loss(tmp_path):
    r = run_psctl("train", "linreg", str(TRAIN), "--huber-delta", "2", "--out", str(tmp_path / "m.npz"), timeout_s=30)
    assert_refused(r, "--huber-delta is for --loss huber")


def test_predict_refuses_a_folder_and_cold_start_for_a_classifier(tmp_path, trained):
    model, _ = trained
    assert_refused(run_psctl("predict", str(model), str(TEST), "--out", str(tmp_path)), "--out names the folder")
    assert_refused(run_psctl("predict", str(model), str(TEST), "--cold-start", "drop"), "--cold-start is for mf models")


def test_server_refuses_a_port_when_joining_a_coordinator():
    r = run_psctl("server", "--coordinator", "127.0.0.1:1", "--port", "5000", timeout_s=30)
    assert_refused(r, "--port is the coordinator's port; with --coordinator the shards take free ports")


def test_status_refuses_watch_with_json():
    assert_refused(run_psctl("status", "--server", "127.0.0.1:1", "--watch", "--json"), "--json prints one status")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small model trained with --json (and a checkpoint folder); the parsed result."""
    folder = tmp_path_factory.mktemp("json")
    model = folder / "model.npz"
    r = run_psctl("train", "logreg", str(TRAIN), "--workers", "2", "--epochs", "3", "--lr", "0.5", "--json",
                  "--checkpoint-dir", str(folder / "ckpt"), "--checkpoint-every", "10", "--out", str(model))
    assert r.returncode == 0, r.stderr
    assert "cluster up in" in r.stderr and "checkpoint at clock 10" in r.stderr  # progress goes to stderr
    return model, json.loads(r.stdout)  # stdout is the one JSON object


def test_train_json_carries_the_result(trained):
    model, result = trained
    assert result["model_path"] == str(model) and result["model"] == "logreg"
    assert result["mode"] == "sync" and result["workers"] == 2 and result["epochs"] == 3
    assert result["rows_trained"] == 3 * 456 and result["lost_workers"] == []
    assert result["seconds"] > 0 and result["last_checkpoint_clock"] >= 10
    assert result["metrics"]["train_accuracy"] >= 0.9 and result["metrics"]["train_loss"] > 0


def test_predict_json_carries_metrics(trained, tmp_path):
    model, _ = trained
    r = run_psctl("predict", str(model), str(TEST), "--json", "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["rows"] == 113 and result["metrics"]["rows"] == 113
    assert result["metrics"]["accuracy"] >= 0.9 and result["classes"] == ["0", "1"]
    assert len(result["metrics"]["confusion"]) == 2 and result["predictions_path"] == str(tmp_path / "p.csv")


def test_piped_output_is_not_wrapped(tmp_path):
    """Without COLUMNS and without a terminal, rich would wrap at 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    r = subprocess.run(
        [sys.executable, "-m", "psctl", "train", "logreg", str(TRAIN), "--workers", "2", "--epochs", "1",
         "--out", str(tmp_path / "a-rather-long-model-file-name-so-that-the-line-is-long.npz")],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    done = [ln for ln in r.stdout.splitlines() if ln.startswith("done:")]
    assert len(done) == 1 and len(done[0]) > 80 and done[0].endswith("-is-long.npz"), r.stdout
    traffic = [ln for ln in r.stdout.splitlines() if ln.startswith("traffic per epoch")]
    assert len(traffic) == 1 and len(traffic[0]) > 80 and traffic[0].endswith("of that)"), r.stdout


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(1)
    yield server
    code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err


def test_status_watch_refreshes_until_ctrl_c(server):
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "status", "--server", server.address, "--watch", "--interval-s", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        refreshes = 0
        for line in proc.stdout:  # bounded by the test timeout
            refreshes += f"psctl server {server.address}: shards" in line
            if refreshes == 2:
                break
        assert refreshes == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err + out


def test_status_of_a_shard_address_is_one_sentence(server):
    body = json.loads(run_psctl("status", "--server", server.address, "--json").stdout)
    shard = body["shards"][0]["address"]
    started = time.monotonic()
    r = run_psctl("status", "--server", shard)
    took_s = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    message = " ".join(r.stderr.split())
    assert message == (f"psctl: error: {shard} is a psctl shard (shard 0); psctl status asks the coordinator "
                       "(the address 'psctl server' printed)"), r.stderr  # fmt: skip
    assert took_s < net.DEFAULT_HANDSHAKE_TIMEOUT_S, took_s


def test_a_terminal_shows_the_address_and_the_checkpoints(tmp_path):
    """On a terminal a progress bar replaces the per-epoch log lines, but not the lines that matter."""
    import pty

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "train", "logreg", str(TRAIN), "--workers", "2", "--epochs", "2",
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "10", "--out", str(tmp_path / "m.npz")],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=REPO, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    try:
        while True:  # until the process closes the terminal (bounded by the test timeout)
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer has closed it
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        assert proc.wait(timeout=30) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "cluster up in" in text and "checkpoint at clock 10" in text and "model written to" in text, text
    assert "planned:" not in text  # a log line the progress bar stands for on a terminal
