"""Checkpoints that can be trusted: the files a manifest names stay on disk whatever the
coordinator does, an older checkpoint is offered when the newest is damaged, a folder
is relocatable, and what a checkpoint holds is checked before it is used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from psctl.files import checkpoint, modelfile

from ..conftest import run_psctl
from .test_processes import assert_equal_to_clean, kill_everything, resume, seed_args, start_train, train_clean

pytestmark = [pytest.mark.integration]


def clocks(folder: Path, shard_index: int) -> list[int]:
    """The clocks of one shard's files in a checkpoint folder, oldest first."""
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in folder.glob(f"shard-{shard_index}-clock-*.npz"))


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Look at the file system until ``predicate`` holds; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)  # the interval between looks, not a synchronisation


@pytest.mark.fault
@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes")
def test_a_stalled_coordinator_does_not_let_the_shards_delete_the_checkpoint_it_committed(tmp_path):
    common = seed_args("sync", 40, workers=2)
    train_clean(tmp_path, common)
    ckpt = tmp_path / "ckpt"
    proc, address = start_train(
        [*common, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20", "--out", str(tmp_path / "never.npz")],
        until="checkpoint at clock 100",
    )
    # The coordinator runs in 'psctl train': stopped, it writes no manifest while the shards,
    # driven by the workers' pushes, go on saving clock after clock.
    os.kill(proc.pid, signal.SIGSTOP)
    committed = checkpoint.read_manifest(ckpt)["clock"]
    wait_for(
        lambda: all(max(clocks(ckpt, i), default=0) >= committed + 80 for i in range(2)),
        timeout_s=90, what=f"both shards to save 4 checkpoints past clock {committed}",
    )
    kill_everything(proc, address)
    manifest = checkpoint.read_manifest(ckpt)
    assert manifest["clock"] == committed
    assert all(checkpoint.shard_file(ckpt, i, committed).is_file() for i in range(2))
    params, meta = resume(tmp_path, common, ckpt, committed)
    assert_equal_to_clean(tmp_path, params)
    assert meta["metrics"]["rows_trained"] == 40 * 2000
    # The resumed job commits checkpoints again, and the shards then remove the old files.
    final = checkpoint.read_manifest(ckpt)
    assert final["clock"] > committed and final["previous_clock"] is not None
    for i in range(2):
        on_disk = clocks(ckpt, i)
        assert {final["clock"], final["previous_clock"]} <= set(on_disk) and min(on_disk) >= final["previous_clock"]


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's size and modification time: what a resume must leave alone."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.fault
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes")
def test_a_copied_or_moved_checkpoint_folder_resumes_where_it_is_and_leaves_the_original_alone(tmp_path):
    common = seed_args("sync", 8, workers=2)
    original = tmp_path / "ckpt"
    proc, address = start_train(
        [*common, "--checkpoint-dir", str(original), "--checkpoint-every", "10", "--out", str(tmp_path / "never.npz")],
        until="checkpoint at clock 40",
    )
    kill_everything(proc, address)
    clock = checkpoint.read_manifest(original)["clock"]
    copy, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(original, copy)
    before = folder_state(original)

    r = run_psctl("train", *common, "--resume", str(copy), "--out", str(tmp_path / "from-copy.npz"))
    assert r.returncode == 0, r.stderr
    assert f"resuming from the checkpoint at clock {clock}" in r.stdout
    assert folder_state(original) == before, "resuming a copy wrote into the folder it was copied from"
    assert checkpoint.read_manifest(copy)["clock"] > clock  # the copy went on checkpointing

    original.rename(moved)
    after_copy = folder_state(copy)
    r = run_psctl("train", *common, "--resume", str(moved), "--out", str(tmp_path / "from-moved.npz"))
    assert r.returncode == 0, r.stderr
    assert not original.exists() and folder_state(copy) == after_copy
    assert checkpoint.read_manifest(moved)["clock"] > clock
    a, _ = modelfile.load_model(str(tmp_path / "from-copy.npz"))
    b, _ = modelfile.load_model(str(tmp_path / "from-moved.npz"))
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6, atol=1e-7)  # sync: the same run twice
    assert "/" not in json.dumps(checkpoint.read_manifest(moved)["spec"].get("checkpoint"))  # no paths inside


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory) -> tuple[list[str], Path, Path]:
    """Two finished jobs of the same shapes (different seeds), each with a checkpoint folder."""
    base = tmp_path_factory.mktemp("two-jobs")
    common = seed_args("sync", 3, workers=2)
    folders = []
    for seed in (1, 2):
        folder = base / f"ckpt-{seed}"
        # --optimizer sgd: SGD's defaults (lr 0.1, batch 32), which the resumes below compare against.
        r = run_psctl("train", *common, "--seed", str(seed), "--optimizer", "sgd", "--checkpoint-dir", str(folder),
                      "--checkpoint-every", "20", "--out", str(base / f"m{seed}.npz"))
        assert r.returncode == 0, r.stderr
        folders.append(folder)
    return common, folders[0], folders[1]


def refused(r, *words: str) -> str:
    """The one sentence a refused resume printed (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr
    return r.stderr


@pytest.mark.timeout(180)
def test_a_shard_file_of_another_job_is_refused_with_one_sentence(two_jobs, tmp_path):
    common, mine, other = two_jobs
    folder = tmp_path / "ckpt"
    shutil.copytree(mine, folder)
    clock = checkpoint.read_manifest(folder)["clock"]
    assert checkpoint.read_manifest(other)["clock"] == clock
    shutil.copy(checkpoint.shard_file(other, 0, clock), checkpoint.shard_file(folder, 0, clock))  # same shapes, another job
    r = run_psctl("train", *common, "--seed", "1", "--resume", str(folder), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    refused(r, f"cannot restore shard 0 from clock {clock}", "of job", "not this checkpoint's")
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (("spec", "epochs"), "five", ["'epochs' must be an integer >= 1"]),
        (("spec", "optimizer", "params", "lr"), "x", ["'optimizer.params.lr' must be a positive number"]),
        (("spec", "checkpoint", "every"), "five", ["'checkpoint.every' must be an integer >= 0"]),
        (("clock",), "60", ["damaged checkpoint manifest: bad 'clock'"]),
    ],
)
def test_a_hand_edited_manifest_is_refused_with_one_sentence(two_jobs, tmp_path, path, value, words):
    common, mine, _ = two_jobs
    folder = tmp_path / "ckpt"
    shutil.copytree(mine, folder)
    body = json.loads((folder / "checkpoint.json").read_text())
    inner = body
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    (folder / "checkpoint.json").write_text(json.dumps(body))
    r = run_psctl("train", *common, "--seed", "1", "--resume", str(folder), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    refused(r, *words)


@pytest.mark.timeout(180)
def test_resume_refuses_options_that_contradict_the_checkpoint(two_jobs, tmp_path):
    common, mine, _ = two_jobs  # sync, 3 epochs, batch 32, sgd at lr 0.1
    folder = tmp_path / "ckpt"
    shutil.copytree(mine, folder)
    before = folder_state(folder)
    args = [*common, "--seed", "1", "--epochs", "2", "--lr", "0.05", "--batch-size", "256", "--mode", "async"]
    r = run_psctl("train", *args, "--resume", str(folder), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    refused(r, "--resume continues the checkpoint's job with its settings", "--epochs 2 (the checkpoint has 3)",
            "--lr 0.05 (the checkpoint has 0.1)", "--batch-size 256 (the checkpoint has 32)", "--mode async (the checkpoint has sync)")
    assert not (tmp_path / "m.npz").exists() and folder_state(folder) == before


@pytest.mark.timeout(180)
def test_resume_takes_the_checkpoints_settings_and_records_what_it_used(two_jobs, tmp_path):
    common, mine, _ = two_jobs
    folder = tmp_path / "ckpt"
    shutil.copytree(mine, folder)
    # Neither --workers (default 8) nor --epochs (default 10) nor --lr: the checkpoint's 2, 3 and 0.1.
    data_args = common[:common.index("--workers")]
    r = run_psctl("train", *data_args, "--resume", str(folder), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    assert r.returncode == 0, r.stderr
    assert "epoch 3/3" in r.stdout and "/10" not in r.stdout
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    used = meta["training"]
    assert (used["workers"], used["epochs"], used["lr"], used["mode"], used["batch_size"], used["seed"]) == (2, 3, 0.1, "sync", 32, 1)
    assert used["checkpoint_dir"] == str(folder) and used["checkpoint_every"] == 20
    assert meta["metrics"]["rows_trained"] == 3 * 2000


@pytest.mark.timeout(180)
def test_resume_with_more_epochs_trains_them_and_says_so(two_jobs, tmp_path):
    common, mine, _ = two_jobs
    folder = tmp_path / "ckpt"
    shutil.copytree(mine, folder)
    more = [a if a != "3" else "5" for a in common]  # --epochs 5
    r = run_psctl("train", *more, "--seed", "1", "--resume", str(folder), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    assert r.returncode == 0, r.stderr
    assert "applying --epochs 5 (the checkpoint's job had 3)" in r.stdout and "epoch 5/5" in r.stdout
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert meta["training"]["epochs"] == 5 and meta["metrics"]["rows_trained"] == 5 * 2000


@pytest.mark.timeout(180)
def test_a_damaged_newest_checkpoint_names_the_older_one_and_that_one_resumes(two_jobs, tmp_path):
    common, mine, _ = two_jobs
    folder = tmp_path / "ckpt"
    shutil.copytree(mine, folder)
    manifest = checkpoint.read_manifest(folder)
    clock, older = manifest["clock"], manifest["previous_clock"]
    assert older is not None and older < clock
    checkpoint.shard_file(folder, 1, clock).write_bytes(b"PK\x03\x04 cut short by a crash")
    r = run_psctl("train", *common, "--seed", "1", "--resume", str(folder), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    older_manifest = folder / f"checkpoint-clock-{older}.json"
    err = " ".join(refused(r, f"cannot restore shard 1 from clock {clock}").split())  # rich wraps long lines
    assert f"the checkpoint before it, at clock {older}, is complete: --resume {older_manifest} continues from it" in err
    r = run_psctl("train", *common, "--seed", "1", "--resume", str(older_manifest), "--out", str(tmp_path / "m.npz"), timeout_s=90)
    assert r.returncode == 0, r.stderr
    assert f"resuming from the checkpoint at clock {older}" in r.stdout
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert meta["metrics"]["rows_trained"] == 3 * 2000
