"""Stopped processes (SIGSTOP): a stalled coordinator judges nobody lost; a stopped shard is
declared lost within the failure timeout and recovered from the checkpoint, or fails the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from psctl.files import modelfile

from ..conftest import EVERY_SHARD, EXAMPLES, run_psctl
from .test_processes import psctl_children, start_train, worker_pids

pytestmark = [
    pytest.mark.integration,
    pytest.mark.fault,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes"),
]

SEED = EXAMPLES / "seed_pytorch" / "data.csv"
FAILURE_TIMEOUT_S = 1.5
LIVENESS = ["--heartbeat-interval-s", "0.2", "--failure-timeout-s", str(FAILURE_TIMEOUT_S)]


def seed_job(mode: str, epochs: int) -> list[str]:
    # A decaying step, as in test_processes.train_args: async runs then agree to a point.
    return ["logreg", str(SEED), "--label", "1", "--drop", "0", "--workers", "4", "--mode", mode,
            "--epochs", str(epochs), "--lr-decay", "0.01", *EVERY_SHARD]


def shard_pids(address: str) -> list[int]:
    return [p for p in psctl_children(address) if b"shard" in Path(f"/proc/{p}/cmdline").read_bytes()]


def stopped_for(pid: int, seconds: float) -> None:
    """SIGSTOP ``pid``, keep it stopped ``seconds`` (the length of the fault, not a wait for
    anything), SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(150)
def test_a_stopped_coordinator_declares_no_worker_lost(tmp_path):
    """kill -STOP of 'psctl train' (its embedded coordinator) for twice the failure timeout:
    the workers' heartbeats were queued on its sockets, so when it runs again nobody is lost."""
    proc, address = start_train([*seed_job("sync", 60), *LIVENESS, "--out", str(tmp_path / "m.npz")], until="epoch 2/")
    assert len(worker_pids(address)) == 4
    stopped_for(proc.pid, 2 * FAILURE_TIMEOUT_S)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "lost" not in out + err
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert meta["metrics"]["rows_trained"] == 60 * 2000


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stopped_shard_is_declared_lost_and_the_job_recovers_from_its_checkpoint(tmp_path, mode):
    common = seed_job(mode, 40)  # a stopped shard holds every worker at its next clock: the job cannot end first
    clean = run_psctl("train", *common, "--out", str(tmp_path / "clean.npz"))
    assert clean.returncode == 0, clean.stderr
    proc, address = start_train(
        [*common, *LIVENESS, "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "50",
         "--out", str(tmp_path / "m.npz")],
        until="checkpoint at clock 150",
    )
    os.kill(shard_pids(address)[1], signal.SIGSTOP)  # it stays stopped: the cluster must kill it
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "did not answer for" in out and "rolling back to the checkpoint at clock" in out
    a, clean_meta = modelfile.load_model(str(tmp_path / "clean.npz"))
    b, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert meta["metrics"]["rows_trained"] >= 40 * 2000
    if mode == "sync":  # sync replays the same batches from the checkpoint: the same model
        np.testing.assert_allclose(b["w"], a["w"], rtol=1e-5, atol=1e-7)
        assert meta["metrics"]["rows_trained"] == 40 * 2000
    assert abs(meta["metrics"]["train_accuracy"] - clean_meta["metrics"]["train_accuracy"]) <= 0.01


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stopped_shard_without_a_checkpoint_fails_the_job_in_time(tmp_path, mode):
    proc, address = start_train([*seed_job(mode, 100000), *LIVENESS, "--out", str(tmp_path / "m.npz")], until="epoch 2/")
    os.kill(shard_pids(address)[0], signal.SIGSTOP)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    elapsed_s = time.monotonic() - started
    assert proc.returncode not in (0, None)
    assert "Traceback" not in err
    # one sentence naming the shard and why
    assert "shard " in err and "did not answer for" in err and "no checkpoint to recover from" in err, err
    # declared lost within the failure timeout (plus the detector's tick), the job ended
    # and every process stopped: a margin for a loaded machine
    assert elapsed_s < FAILURE_TIMEOUT_S + 8, elapsed_s
    assert not shard_pids(address)


@pytest.mark.timeout(180)
def test_psctl_server_replaces_a_stopped_shard_and_the_job_recovers(tmp_path):
    from .cluster import ServerProcess

    server = ServerProcess(2)
    try:
        proc, _ = start_train(
            [*seed_job("sync", 60), "--server", server.address, *LIVENESS,
             "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "50", "--out", str(tmp_path / "m.npz")],
            until="checkpoint at clock 150",
        )
        stopped = shard_pids(server.address)[0]
        os.kill(stopped, signal.SIGSTOP)
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err
        assert " recovered from clock " in out
        assert stopped not in shard_pids(server.address)  # killed, not left stopped
        _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
        assert meta["metrics"]["rows_trained"] == 60 * 2000
    finally:
        code, out, err = server.stop()
    assert code == 0, err
    assert "starting another" in out and "a new shard is at" in out
