"""Several hosts on one machine: network namespaces joined by veth pairs.

The server (coordinator and shards) lives in one namespace, each worker in
its own with its own address, and the driver talks to the server across the
links. Then one worker's link is cut mid-run: its heartbeats stop, it is
declared lost, the other worker takes its partition over, and the job
finishes without it, every row trained. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import EXAMPLES, REPO, psctl_json

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(180)]

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
TEST = EXAMPLES / "breast_cancer" / "test.csv"
SUBNET = "10.213"  # test hosts only: namespaces this test makes and removes


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's 'ip' command"
    probe = f"psctl-probe-{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create network namespaces here: {exc}"
    return None


class Hosts:
    """A server namespace and worker namespaces, each worker on its own veth link."""

    def __init__(self, n_workers: int):
        self.procs: list[subprocess.Popen] = []
        tag = uuid.uuid4().hex[:5]
        self.server = f"psctl-s-{tag}"
        self.workers = [f"psctl-w{i}-{tag}" for i in range(n_workers)]
        self.links = [f"pw{i}{tag}" for i in range(n_workers)]
        sh("ip", "netns", "add", self.server)
        sh("ip", "netns", "exec", self.server, "ip", "link", "set", "lo", "up")
        for i, (ns, link) in enumerate(zip(self.workers, self.links), start=1):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p")
            sh("ip", "link", "set", link, "netns", self.server)
            sh("ip", "link", "set", f"{link}p", "netns", ns)
            sh("ip", "netns", "exec", self.server, "ip", "addr", "add", f"{SUBNET}.{i}.1/24", "dev", link)
            sh("ip", "netns", "exec", self.server, "ip", "link", "set", link, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i}.2/24", "dev", f"{link}p")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{link}p", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", f"{SUBNET}.{i}.1")
        self.address = f"{SUBNET}.1.1"  # the server's address on the first link; reachable from every worker

    def run(self, ns: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "psctl", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )
        self.procs.append(proc)
        return proc

    def cut(self, worker: int) -> None:
        sh("ip", "netns", "exec", self.server, "ip", "link", "set", self.links[worker], "down")

    def remove(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for ns in [self.server, *self.workers]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = can_make_namespaces()
    if reason:
        pytest.skip(reason)
    h = Hosts(2)
    try:
        yield h
    finally:
        h.remove()


def start_server(h: Hosts) -> tuple[subprocess.Popen, str]:
    server = h.run(h.server, "server", "--shards", "2", "--host", h.address, *INSECURE)
    assert server.stdout is not None
    line = server.stdout.readline()  # bounded by the test timeout
    assert "listening on" in line, line + (server.stderr.read() if server.stderr else "")
    return server, line.split("listening on ", 1)[1].split()[0]


INSECURE = ["--insecure"]  # a non-loopback bind without a secret must say so; these hosts are the test's own


def test_workers_on_other_hosts_train_and_survive_a_cut_link(hosts: Hosts, tmp_path: Path):
    server, address = start_server(hosts)
    try:
        # 1. Two workers in their own namespaces, the driver in the server's: same accuracy as on loopback.
        workers = [hosts.run(ns, "worker", "--server", address) for ns in hosts.workers]
        model = tmp_path / "m.npz"
        driver = hosts.run(hosts.server, "train", "logreg", str(TRAIN), "--server", address, "--workers", "2",
                           "--local-workers", "0", "--epochs", "20", "--lr", "0.5", "--out", str(model))
        out, err = driver.communicate(timeout=90)
        assert driver.returncode == 0, err
        for w in workers:
            w.communicate(timeout=30)
            assert w.returncode == 0
        assert psctl_json("predict", str(model), str(TEST))["metrics"]["accuracy"] >= 0.96

        # 2. Cut one worker's link mid-run: declared lost by heartbeat timeout, the job finishes without it.
        workers = [hosts.run(ns, "worker", "--server", address) for ns in hosts.workers]
        driver = hosts.run(hosts.server, "train", "logreg", str(TRAIN), "--server", address, "--workers", "2",
                           "--local-workers", "0", "--epochs", "400", "--optimizer", "sgd", "--failure-timeout-s", "2",
                           "--heartbeat-interval-s", "0.2", "--out", str(tmp_path / "cut.npz"))
        assert driver.stdout is not None
        for line in driver.stdout:  # bounded by the test timeout
            if line.startswith("epoch 2/"):
                break
        hosts.cut(1)
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, err
        assert "no heartbeat for" in out + err
        lost = out.split("warning: workers lost during training: [", 1)[1].split("]")[0]
        assert len(lost.split(",")) == 1  # exactly the cut worker (ids follow registration order)
        # No worker to spare: the surviving host took the cut worker's partition over, so no row was dropped.
        assert "a surviving worker process took over lost partition" in out
        rows = len(TRAIN.read_text().strip().splitlines()) - 1
        trained = int(out.split("rows trained: ", 1)[1].split()[0])
        assert 400 * rows <= trained <= 400 * rows + 32  # a push that reached one shard of two is redone
        workers[0].communicate(timeout=30)
        assert workers[0].returncode == 0
    finally:
        server.terminate()
        server.communicate(timeout=20)  # the fixture reaps whatever is left
