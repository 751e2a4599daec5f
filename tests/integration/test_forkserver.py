"""The embedded cluster forks its shards and workers from one fork server
(psctl/cluster/forkserver.py): they must look and behave as exec'd children did, and
losing the fork server must lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from psctl.cluster import forkserver, prestart
from psctl.files import modelfile

from ..conftest import EXAMPLES, run_psctl
from .cluster import cluster_children, descendants

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not forkserver.available(), reason="the fork server is Linux only"),
]

SEED = EXAMPLES / "seed_pytorch" / "data.csv"


def _stat(entry: Path) -> list[str]:
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()


def _pipes(entry: Path) -> set[str]:
    found = set()
    for fd in (entry / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("pipe:", "socket:")):
            found.add(target)
    return found


def _alive(pid: int) -> bool:
    try:
        return _stat(Path(f"/proc/{pid}"))[0] != "Z"
    except OSError:
        return False


def start_train(args: list[str], until: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # bounded by the test's timeout
        if line.startswith(until):
            break
    return proc


def test_forked_children_read_as_execd_ones_each_in_a_session_and_sharing_no_pipe(tmp_path):
    proc = start_train(["logreg", str(SEED), "--label", "1", "--drop", "0", "--workers", "3", "--shards", "2",
                        "--epochs", "100000", "--out", str(tmp_path / "m.npz")], until="epoch 1/")  # fmt: skip
    try:
        children = cluster_children(proc.pid)
        servers = [p for p in descendants(proc.pid) if b"psctl.cluster.forkserver" in (p / "cmdline").read_bytes()]
        assert len(children) == 5 and len(servers) == 1
        (server,) = servers
        assert (server / "cmdline").read_bytes().rstrip(b"\0").split(b"\0") == [
            os.fsencode(sys.executable), b"-m", b"psctl.cluster.forkserver"]  # its room for titles is not shown
        environ = dict(item.split(b"=", 1) for item in (server / "environ").read_bytes().split(b"\0") if b"=" in item)
        for name, value in prestart.ONE_THREAD.items():  # numpy loads in the server: one BLAS thread a child
            assert environ.get(name.encode()) == os.environ.get(name, value).encode(), name
        roles = []
        for child in children:
            argv = (child / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            assert argv[:3] == [os.fsencode(sys.executable), b"-m", b"psctl.cluster.child"], argv
            assert b"--parent-watch" in argv and b"--secret-fd" in argv
            roles.append(argv[3])
            stat = _stat(child)
            assert int(stat[1]) == int(server.name)  # forked by the server
            assert int(stat[3]) == int(child.name)  # the leader of a session of its own (sid = pid)
        assert sorted(roles) == [b"shard"] * 2 + [b"worker"] * 3
        pipes = [_pipes(c) for c in children]
        for i, mine in enumerate(pipes):  # no child holds another's stdin, stdout or the server's socket
            assert not mine & _pipes(server) - {os.readlink(server / "fd" / "2")}, (i, mine & _pipes(server))
            for j, theirs in enumerate(pipes):
                assert i == j or not mine & theirs, (i, j, mine & theirs)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 130


@pytest.mark.fault
def test_a_killed_fork_server_loses_no_process_and_a_killed_worker_is_forked_again_by_a_new_one(tmp_path):
    """The fork server dies in epoch 2: its children go on; then a worker is killed, and the
    replacement comes from a new fork server; every row is trained."""
    args = ["logreg", str(SEED), "--label", "1", "--drop", "0", "--workers", "2", "--epochs", "40", "--batch-size",
            "16", "--lr", "0.3", "--seed", "5", "--out", str(tmp_path / "m.npz")]  # fmt: skip
    proc = start_train(args, until="epoch 2/")
    (server,) = [p for p in descendants(proc.pid) if b"psctl.cluster.forkserver" in (p / "cmdline").read_bytes()]
    before = {int(c.name) for c in cluster_children(proc.pid)}
    os.kill(int(server.name), signal.SIGKILL)
    assert proc.stdout is not None
    for line in proc.stdout:  # the job goes on past the loss
        if line.startswith("epoch 4/"):
            break
    assert all(_alive(pid) for pid in before)  # every child lived on (reparented: no longer a descendant)
    worker = next(p for p in before if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0"))
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "started a new worker process in place of worker" in out
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert 40 * 2000 <= meta["metrics"]["rows_trained"] <= 40 * 2000 + 16


def test_psctl_forkserver_0_execs_every_child_and_trains_the_same_model(tmp_path):
    common = ["train", "logreg", str(EXAMPLES / "breast_cancer" / "train.csv"), "--workers", "3", "--epochs", "2",
              "--seed", "3"]  # fmt: skip
    forked = run_psctl(*common, "--out", str(tmp_path / "forked.npz"))
    assert forked.returncode == 0, forked.stderr
    env = {**os.environ, "PSCTL_FORKSERVER": "0"}
    execd = subprocess.run([sys.executable, "-m", "psctl", *common, "--out", str(tmp_path / "execd.npz")],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert execd.returncode == 0, execd.stderr
    a, _ = modelfile.load_model(str(tmp_path / "forked.npz"))
    b, _ = modelfile.load_model(str(tmp_path / "execd.npz"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


async def test_a_child_that_fails_reports_the_code_and_sentence_an_execd_one_does(tmp_path):
    """A worker pointed at a port where nothing listens, and one with a bad flag: each exit
    code and log line travel through the fork server as they came from an exec'd child."""
    env = {k: v for k, v in os.environ.items() if k != "PSCTL_SECRET"}
    server = await forkserver.ForkServer.start(tmp_path / "forkserver.log", env)
    try:
        for k, argv in enumerate((["worker", "--server", "127.0.0.1:1"], ["worker", "--no-such-flag"])):
            child = await server.spawn(argv, tmp_path / f"forked-{k}.log", timeout_s=30)
            code = await asyncio.wait_for(child.wait(), 60)
            child.close()
            execd = subprocess.run([sys.executable, "-m", "psctl.cluster.child", *argv], capture_output=True,
                                   text=True, env=env, timeout=60)  # fmt: skip
            assert code == execd.returncode != 0
            last = (tmp_path / f"forked-{k}.log").read_text().strip().splitlines()[-1]
            assert last == execd.stderr.strip().splitlines()[-1]
    finally:
        await server.close(10)


def _running(marker: str) -> list[int]:
    """The live processes whose environment holds ``marker`` (this test's own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes() and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_train_that_fails_before_its_cluster_leaves_no_fork_server(tmp_path):
    """`psctl train` starts its cluster's fork server before it imports itself; one it never
    used is gone when it exits (here the server takes 30 s to import, so it would be left
    behind importing), and the error is still one sentence."""
    marker = f"early-{os.getpid()}-{tmp_path.name}"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import time\n"
        "if b'psctl.cluster.forkserver' in open('/proc/self/cmdline', 'rb').read():\n"
        "    time.sleep(30)\n"
    )  # fmt: skip
    path = os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PSCTL_TEST_MARKER": marker, "PSCTL_LOG_DIR": str(tmp_path / "logs"), "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-m", "psctl", "train", "logreg", str(tmp_path / "missing.csv")],
                            capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.startswith("psctl: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert (tmp_path / "logs" / "forkserver.log").exists()  # it was started
    assert _running(marker) == []


async def test_an_early_fork_server_is_taken_over_only_for_the_same_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PSCTL_LOG_DIR", str(tmp_path))
    early = prestart.start_early()
    assert early is not None and prestart.start_early() is early  # one at a time
    assert prestart.take_early({**prestart.child_env(), "PSCTL_OTHER": "1"}) is None
    assert early.proc.returncode is not None  # not the cluster's: stopped
    assert prestart.take_early(prestart.child_env()) is None  # and not offered again

    early = prestart.start_early()
    assert early is not None and prestart.take_early(prestart.child_env()) is early
    server = forkserver.ForkServer(early)
    try:
        child = await server.spawn(["worker", "--no-such-flag"], tmp_path / "forked.log", timeout_s=30)
        assert await asyncio.wait_for(child.wait(), 60) == 2  # argparse's usage error, as exec'd
        child.close()
    finally:
        await server.close(10)
    assert early.proc.returncode == 0
