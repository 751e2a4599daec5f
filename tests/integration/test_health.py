"""psctl health against real coordinators and shards, a port that is not psctl and one where
nothing listens; psctl start waiting for a coordinator that comes up after it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from ..conftest import REPO, run_psctl
from .cluster import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MARGIN_S = 10.0  # a fresh process's imports on a loaded machine


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(1)
    try:
        yield srv
    finally:
        srv.stop()


def shard_address(coordinator: str) -> str:
    r = run_psctl("status", "--server", coordinator, "--json", timeout_s=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["shards"][0]["address"]


def one_error(r: subprocess.CompletedProcess, code: int, sentence: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip() == f"psctl: error: {sentence}", r.stderr
    assert "Traceback" not in r.stderr


def test_a_coordinator_and_a_shard_answer_as_their_roles(server):
    r = run_psctl("health", "--server", server.address, "--role", "coordinator", timeout_s=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"psctl coordinator at {server.address} is up: 1 shard registered, no job running"
    shard = shard_address(server.address)
    r = run_psctl("health", "--server", shard, "--role", "shard", timeout_s=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"psctl shard at {shard} is up: shard 0, no job"
    one_error(run_psctl("health", "--server", shard, "--role", "coordinator", timeout_s=30), 1,
              f"{shard} is a psctl shard, not a coordinator")  # fmt: skip


def test_a_silent_port_fails_within_the_timeout_and_a_closed_one_at_once():
    with socket.socket() as silent:  # listens, the kernel accepts, nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        started = time.monotonic()
        r = run_psctl("health", "--server", address, "--timeout-s", "1.5", timeout_s=30)
        elapsed = time.monotonic() - started
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("psctl: error:") == 1 and "within 1.5 s" in r.stderr, r.stderr
    assert 1.5 <= elapsed < 1.5 + MARGIN_S
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = "127.0.0.1:%d" % s.getsockname()[1]
    one_error(run_psctl("health", "--server", closed, timeout_s=30), 3, f"cannot reach psctl process at {closed}: Connection refused")


def test_an_http_port_is_named_not_psctl():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "psctl", "health", "--server", address], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        listener.settimeout(30)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert err.strip() == f"psctl: error: {address} is not a psctl process (it answered 'HTTP/1.0 400 Bad Request')", err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(role: str, **variables: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSCTL_")}
    env.update(PSCTL_ROLE=role, PYTHONUNBUFFERED="1", **variables)
    return subprocess.Popen([sys.executable, "-m", "psctl", "start"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def with_secret(secret: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PSCTL_SECRET": secret}
    return subprocess.run([sys.executable, "-m", "psctl", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=10)


def test_a_shard_started_first_waits_for_its_coordinator_with_a_secret():
    secret = secrets.token_hex(32)
    port, shard_port = free_port(), free_port()
    coordinator = f"127.0.0.1:{port}"
    shard = start("shard", PSCTL_COORDINATOR=coordinator, PSCTL_PORT=str(shard_port), PSCTL_WAIT_S="40", PSCTL_SECRET=secret)
    procs = [shard]
    try:
        assert shard.stdout is not None
        line = shard.stdout.readline()  # bounded by the test's timeout
        assert line.startswith(f"psctl: waiting up to 40 s for the coordinator at {coordinator} (cannot reach"), line
        procs.append(start("coordinator", PSCTL_PORT=str(port), PSCTL_SECRET=secret))
        assert shard.stdout.readline().strip() == f"psctl: the coordinator at {coordinator} is up (0 shards registered, no job running); starting psctl shard"
        args = ("health", "--server", f"127.0.0.1:{shard_port}", "--role", "shard")
        deadline = time.monotonic() + 30
        while (r := with_secret(secret, *args)).returncode != 0:  # each try is a fresh process: the wait between tries
            assert "has not registered" in r.stderr and time.monotonic() < deadline, r.stderr
        # Without the secret: refused as security (exit 5), never a hang.
        r = run_psctl("health", "--server", coordinator, timeout_s=30)
        assert r.returncode == 5 and r.stderr.count("psctl: error:") == 1, r.stderr
    finally:
        stop(*procs)


def test_wait_s_ends_with_one_sentence_when_no_coordinator_comes():
    coordinator = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = start("worker", PSCTL_SERVER=coordinator, PSCTL_WAIT_S="1")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert err.strip() == (f"psctl: error: the coordinator at {coordinator} did not come up within 1 s: "
                           f"cannot reach psctl coordinator at {coordinator}: Connection refused")  # fmt: skip
    assert time.monotonic() - started < 1 + MARGIN_S
