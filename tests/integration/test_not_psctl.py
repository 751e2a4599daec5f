"""`psctl train --server`, `psctl worker --server`, `psctl models`, `psctl predict NAME --server` and
`psctl serve NAME --server` pointed at a port that is not psctl:
one sentence and a non-zero exit within the handshake timeout, never a hang."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

from ..conftest import EXAMPLES, REPO, run_psctl
from .test_bad_input import assert_clean_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

HANDSHAKE_TIMEOUT_S = 3.0
MARGIN_S = 15.0  # the process's own start-up (imports) on a loaded machine
TRAIN = EXAMPLES / "breast_cancer" / "train.csv"

COMMANDS = {
    "train": ["train", "logreg", str(TRAIN), "--workers", "2", "--epochs", "1", "--server"],
    "worker": ["worker", "--server"],
    "models": ["models", "--server"],
    "predict": ["predict", "bc", str(TRAIN), "--server"],
    "serve": ["serve", "bc", "--port", "0", "--server"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server():
    """`python -m http.server`: it reads a request line psctl never sends, and says nothing."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:  # a connection attempt is the wait between tries
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("http.server did not start") from None
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_silent_non_psctl_port_fails_within_the_handshake_timeout(http_server, command):
    started = time.monotonic()
    result = run_psctl(*COMMANDS[command], http_server, "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), timeout_s=50)
    elapsed = time.monotonic() - started
    assert_clean_error(result, f"{http_server} did not answer as psctl within {HANDSHAKE_TIMEOUT_S:g} s")
    assert HANDSHAKE_TIMEOUT_S <= elapsed < HANDSHAKE_TIMEOUT_S + MARGIN_S, elapsed
    assert "cluster up" not in result.stdout + result.stderr
    assert len(" ".join(result.stderr.split()).split("psctl: error:")) == 2, result.stderr  # one sentence


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_a_port_that_answers_http_is_named_not_psctl(command):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\nServer: test\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    address = "127.0.0.1:%d" % listener.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "psctl", *COMMANDS[command], address, "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 50)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    result = subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())
    assert_clean_error(result, f"{address} is not a psctl process (it answered 'HTTP/1.0 400 Bad Request')")
    assert elapsed < HANDSHAKE_TIMEOUT_S + MARGIN_S, elapsed
    assert "cluster up" not in result.stdout + result.stderr

