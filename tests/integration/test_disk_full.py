"""A full disk made real: a shard whose file-size limit is lowered mid-run (RLIMIT_FSIZE, set
with prlimit from this test, no root needed) cannot write its checkpoint files. The driver says
so at once, in one sentence naming the folder and the OS error (the limit is lowered on both
shards, one disk under both: with only one, the other shard's pruning would delete the files of
the committed clock, issue 13's defect 1); training goes on; a Ctrl-C whose
final checkpoint cannot be written fails with that sentence; the last checkpoint on disk is
consistent and --resume continues from it."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from psctl.files import checkpoint

from .test_fuzz_live import Process
from .test_processes import resume, seed_args

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(240)]


def _ignore_sigxfsz() -> None:
    # A write past the limit then fails with EFBIG instead of killing the process (CPython
    # ignores SIGXFSZ itself too; this says it for any shard).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class Shard(Process):
    def __init__(self, coordinator: str, log: Path):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "psctl", "shard", "--coordinator", coordinator], stdout=subprocess.PIPE, stderr=err,
                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_ignore_sigxfsz,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the test's timeout
        if "PSCTL_READY " not in line:
            self.stop()
            raise RuntimeError(f"shard did not start: {line!r} {log.read_text()}")

    def fill_disk(self) -> None:
        """From now on no file of this process may grow beyond 0 bytes: its next write fails with EFBIG."""
        _, hard = resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (0, hard))


def test_a_full_disk_is_reported_at_once_training_goes_on_and_resume_continues(tmp_path):
    coordinator = Process(["coordinator"], tmp_path / "coordinator.log", "listening on ")
    shards: list[Shard] = []
    train = None
    ckpt = tmp_path / "ckpt"
    common = seed_args("sync", 40, workers=3)  # the stop comes near epoch 8; --resume trains the rest
    try:
        shards = [Shard(coordinator.address, tmp_path / f"shard-{i}.log") for i in range(2)]
        train = subprocess.Popen(
            [sys.executable, "-m", "psctl", "train", *common, "--server", coordinator.address, "--checkpoint-dir", str(ckpt),
             "--checkpoint-every", "50", "--out", str(tmp_path / "never.npz")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"},
        )  # fmt: skip
        assert train.stdout is not None
        lines: list[str] = []
        filled = False
        for line in train.stdout:  # bounded by the test timeout; the job ends by itself otherwise
            lines.append(line)
            if line.startswith("checkpoint at clock 100") and not filled:
                for shard in shards:  # one disk under both shards
                    shard.fill_disk()
                filled = True
            if "warning: checkpoint at clock" in line:
                break
        failures = [ln for ln in lines if "warning: checkpoint at clock" in ln]
        assert failures, "".join(lines)
        # the very next epoch line: training went on without that checkpoint
        for line in train.stdout:
            lines.append(line)
            if line.startswith("epoch "):
                break
        train.send_signal(signal.SIGINT)
        rest, _ = train.communicate(timeout=90)
        text = "".join(lines) + rest
    finally:
        if train is not None and train.poll() is None:
            train.kill()
            train.communicate(timeout=10)
        for shard in shards:
            shard.stop()
        coordinator.stop()

    saved = [int(ln.split("checkpoint at clock ")[1].split()[0]) for ln in text.splitlines() if ln.startswith("checkpoint at clock")]
    last = checkpoint.read_manifest(ckpt)["clock"]
    assert saved and last == max(saved) >= 100, text
    clock = int(failures[0].split("checkpoint at clock ")[1].split()[0])
    assert clock > last
    shard = int(failures[0].split(" failed on shard ")[1].split(":")[0])
    assert failures[0].strip() == (
        f"warning: checkpoint at clock {clock} failed on shard {shard}: '{ckpt}': File too large; training goes on without it, "
        f"and the checkpoint at clock {last} stays the one to resume from (--resume {ckpt})"
    ), text
    assert train.returncode == 130, text
    flat = " ".join(text.split())
    assert "interrupted without a final checkpoint (checkpoint at clock " in flat and f"'{ckpt}': File too large)" in flat
    assert f"the last checkpoint in '{ckpt}' is at clock {last}" in flat, text
    # the push that made a save due was acked: no worker failed or was lost
    assert "Traceback" not in text and "internal error" not in text and " lost" not in text, text
    assert not (tmp_path / "never.npz").exists()
    # the checkpoint on disk is consistent: --resume from it trains every remaining row
    _, meta = resume(tmp_path, common, ckpt, last)
    assert meta["metrics"]["rows_trained"] == 40 * 2000
