"""deploy/slurm/psctl.sbatch, run as Slurm would run it on one node, with `srun` replaced by
tests/integration/fake_slurm/srun (each step's tasks as local processes): it trains the job,
every step exits cleanly, and it refuses a missing argument or secret in one sentence."""

from __future__ import annotations

import os
import sys
import secrets
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from ..conftest import EXAMPLES, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = REPO / "deploy" / "slurm" / "psctl.sbatch"
FAKE_SRUN = Path(__file__).parent / "fake_slurm" / "srun"
ROWS = 456  # examples/breast_cancer/train.csv


def slurm_env(tmp_path: Path, secret_file: Path) -> dict[str, str]:
    """A batch script's environment on the allocation's first node, with psctl and srun on the PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(FAKE_SRUN)
    psctl = bin_dir / "psctl"  # what `pip install` puts on a node's PATH, for this repository
    psctl.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m psctl "$@"\n')
    psctl.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PSCTL_", "SLURM"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
            "SLURMD_NODENAME": "127.0.0.1", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "6",
            "COORDINATOR_PORT": str(port), "SECRET_FILE": str(secret_file), "HOME": str(tmp_path)}  # fmt: skip


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


def test_the_batch_script_trains_with_one_coordinator_two_shards_and_two_workers(tmp_path, secret_file):
    model = tmp_path / "model.npz"
    r = subprocess.run(
        ["bash", str(SCRIPT), "logreg", str(EXAMPLES / "breast_cancer" / "train.csv"), "--epochs", "3", "--out", str(model)],
        env=slurm_env(tmp_path, secret_file), cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "psctl coordinator listening on 0.0.0.0:" in out, out
    assert "is up (2 shards registered, no job running); starting psctl train" in out, out
    assert f"rows trained: {ROWS * 3}" in out and model.is_file(), out
    assert out.count("worker done:") == 2, out
    assert "Traceback" not in r.stderr, r.stderr


def test_the_batch_script_refuses_missing_arguments_and_a_missing_secret(tmp_path, secret_file):
    env = slurm_env(tmp_path, secret_file)
    r = subprocess.run(["bash", str(SCRIPT), "logreg"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("psctl.sbatch: give psctl train's MODEL and DATA"), r.stderr
    env["SECRET_FILE"] = str(tmp_path / "absent")
    r = subprocess.run(["bash", str(SCRIPT), "logreg", "d.csv"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith(f"psctl.sbatch: no readable secret file at {tmp_path / 'absent'}"), r.stderr
