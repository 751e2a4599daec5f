"""Messages that do not mislead (issue 13, defect 14): a driver that lost its `psctl server`
names the checkpoint to resume from; a shard lost without a checkpoint fails the job with one
sentence and nothing before it about workers; kill -9 of a driver or a server leaves no log folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from psctl.files import checkpoint

from .test_processes import psctl_children, seed_args, start_train, wait_gone

pytestmark = [
    pytest.mark.integration,
    pytest.mark.fault,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes"),
]


def env_with_tmp(tmp: Path) -> dict[str, str]:
    """The environment of a psctl whose temporary folders (its children's logs) go to ``tmp``."""
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400", "TMPDIR": str(tmp)}


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "server", "--shards", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_with_tmp(tmp),
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by the test timeout
    assert "listening on" in line, line
    return proc, line.split("listening on ", 1)[1].split()[0]


def log_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("psctl-*"))


def test_a_driver_that_lost_its_server_names_the_checkpoint_and_the_resume_command(tmp_path):
    server, address = start_server(tmp_path / "tmp")
    ckpt = tmp_path / "ckpt"
    train = None
    try:
        assert len(log_folders(tmp_path / "tmp")) == 1  # the server's children log there
        train, _ = start_train(
            [*seed_args("sync", 300, workers=3), "--server", address, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "50",
             "--out", str(tmp_path / "never.npz")],
            until="checkpoint at clock 100",
        )  # fmt: skip
        children = psctl_children(address)
        server.kill()
        server.communicate(timeout=10)
        _, err = train.communicate(timeout=60)
    finally:
        for proc in (server, train):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    clock = checkpoint.read_manifest(ckpt)["clock"]
    assert train.returncode == 4, err
    assert " ".join(err.split()) == (
        f"psctl: error: lost the connection to the psctl server; the last checkpoint in '{ckpt}' is at clock {clock}: "
        f"continue with the same command and --resume {ckpt}"
    )
    # the server's shards exit once their parent is gone, and take its log folder with them
    assert children and wait_gone(address) == []
    assert log_folders(tmp_path / "tmp") == []


def test_kill_9_of_the_driver_leaves_no_log_folder(tmp_path):
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "train", *seed_args("sync", 100000), "--out", str(tmp_path / "never.npz")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_tmp(tmp),
    )  # fmt: skip
    assert proc.stdout is not None
    address = ""
    for line in proc.stdout:  # bounded by the test timeout
        if line.startswith("cluster up"):
            address = line.split(" at ")[1].strip()
        if line.startswith("epoch 1/"):
            break
    assert address and psctl_children(address) and len(log_folders(tmp)) == 1
    proc.kill()
    proc.communicate(timeout=10)
    assert wait_gone(address) == []
    assert log_folders(tmp) == []


def test_a_shard_lost_without_a_checkpoint_fails_the_job_with_one_sentence(tmp_path):
    proc, address = start_train([*seed_args("sync", 100000), "--out", str(tmp_path / "never.npz")], until="epoch 2/")
    shards = [p for p in psctl_children(address) if b"shard" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(shards[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert re.fullmatch(r"psctl: error: training failed: shard \d at \S+ was lost \(no checkpoint to recover from\)", " ".join(err.split())), err
    # nothing before it: no "worker N lost", no "started a new worker process"
    assert " lost after " not in out + err and "started a new worker process" not in out + err, out + err
    assert wait_gone(address) == []
