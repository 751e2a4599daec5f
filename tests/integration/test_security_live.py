"""Authentication, TLS, limits and deadlines against real psctl processes.

The module's server runs with a secret and short deadlines; test code plays the
driver, a legitimate worker, and peers without the secret, with a wrong one,
replaying a capture, or trickling bytes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient
from psctl.errors import SecurityError
from psctl.protocol import handshake
from psctl.protocol.wire import NEED_DATA, FrameParser, Message, MsgType, encode_bytes

from ..certs import self_signed_cert
from ..conftest import EXAMPLES, run_psctl
from .cluster import (
    Hangups,
    cluster_children,
    descendants,
    RawClient,
    ServerProcess,
    bare_spec,
    driver_session,
    equals,
    status,
    wait_until,
    worker_session,
    write_secret,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEADLINE_S = 2.0  # the server's handshake and idle timeouts
ROWS = 8


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    path, secret = write_secret(tmp_path_factory.mktemp("secret"))
    proc = ServerProcess(
        2, "--secret-file", str(path), "--handshake-timeout-s", str(DEADLINE_S), "--idle-timeout-s", str(DEADLINE_S),
        "--max-keys-per-request", str(2 * ROWS),
    )  # fmt: skip
    yield proc, net.Security(secret=secret)
    code, _, err = proc.stop()
    assert code == 0 and "Traceback" not in err, err


class Job:
    """A submitted one-worker async job with its worker registered, on a secured server."""

    def __init__(self, address: str, security: net.Security):
        self.address, self.security = address, security

    async def __aenter__(self) -> Job:
        self.driver = await driver_session(self.address, self.security)
        spec = bare_spec(1, "async", rows=ROWS)
        self.submitted = await self.driver.submit(spec, timeout_s=30)
        self.submitted.update((await self.driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=30)).body)
        self.job_id = self.submitted["job_id"]
        self.control, reg = await worker_session(self.address, self.security)
        self.session = reg["session"]
        self.worker = await ShardClient.connect(
            self.submitted["shards"], self.submitted["ranges"], self.job_id, {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
            max_frame_bytes=1 << 20, security=self.security,
        )  # fmt: skip
        return self

    async def values(self) -> np.ndarray:
        """The whole table as a driver reads it (no clock gate)."""
        reader = await ShardClient.connect(
            self.submitted["shards"], self.submitted["ranges"], self.job_id, {"role": "driver"},
            max_frame_bytes=1 << 20, security=self.security,
        )  # fmt: skip
        try:
            return (await reader.pull(["w"]))["w"]
        finally:
            reader.close()

    async def pushes(self) -> list[int]:
        return [(await status(s, self.security))["pushes"] for s in self.submitted["shards"]]

    async def __aexit__(self, *exc: object) -> None:
        self.worker.close()
        self.control.close()
        self.driver.notify(MsgType.JOB_END, {"job_id": self.job_id})
        self.driver.close()
        await wait_until(lambda: _no_job(self.address, self.security), what="the job to end")


async def _no_job(address: str, security: net.Security) -> bool:
    return (await status(address, security))["job"] is None


GRAD = {"w": np.ones(ROWS, dtype=np.float32)}


async def test_without_the_secret_a_peer_can_neither_read_nor_change_nor_join(secured):
    server, security = secured
    async with Job(server.address, security) as job:
        await job.worker.push(GRAD, 0, 1)
        before = await job.values()
        np.testing.assert_allclose(before, -0.1)
        shard = job.submitted["shards"][0]
        attempts = [
            (server.address, MsgType.STATUS, {}),
            (server.address, MsgType.REGISTER_WORKER, {"pid": 1, "host": "intruder"}),
            (server.address, MsgType.SUBMIT, {"spec": bare_spec(1, "async")}),
            (shard, MsgType.HELLO, {"job_id": job.job_id, "role": "worker", "worker_id": 0}),
            (shard, MsgType.PULL, {"job_id": job.job_id, "tables": ["w"], "clock": 0}),
            (shard, MsgType.STATUS, {}),
        ]
        for address, kind, body in attempts:
            # net.connect without the secret stops at its first exchange; a raw peer sends the request itself.
            with pytest.raises(SecurityError, match="refused this process: this psctl process requires authentication"):
                await net.connect(address)
            intruder = await RawClient.open(address)
            intruder.send(Message(kind, body, req_id=1))
            (refusal,) = await intruder.until_closed()  # and the server hung up
            assert refusal.type is MsgType.ERROR and refusal.req_id == 1, refusal
            assert refusal.body["code"] == "auth_required" and "requires authentication" in refusal.body["message"]
        # A raw peer that skips the handshake and goes straight for a PUSH:
        raw = await RawClient.open(shard)
        raw.send(
            Message(MsgType.HELLO, {"job_id": job.job_id, "role": "worker", "worker_id": 0}, req_id=1),
            Message(MsgType.PUSH, {"job_id": job.job_id, "tables": ["w"], "clock": 1, "count": 1},
                    [np.full(ROWS // 2, 1e6, np.float32)], req_id=2),
        )  # fmt: skip
        (refusal,) = await raw.until_closed()
        assert refusal.body["code"] == "auth_required" and refusal.req_id == 1
        np.testing.assert_array_equal(await job.values(), before)
        assert await job.pushes() == [1, 1]
        workers = (await status(server.address, security))["job"]["workers"]
        assert [(w["worker_id"], w["state"], w["host"]) for w in workers] == [(0, "running", "test")]


async def test_a_wrong_secret_is_refused_by_both_sides(secured):
    server, security = secured
    wrong = net.Security(secret=b"not-the-secret-but-long-enough")
    async with Job(server.address, security) as job:
        await job.worker.push(GRAD, 0, 1)
        before = await job.values()
        for address in [server.address, *job.submitted["shards"]]:
            # The client notices first: the server's proof does not match.
            with pytest.raises(SecurityError, match="its proof does not match this process's secret"):
                await net.connect(address, security=wrong)
            # A client that ignores that and sends a proof made with its own secret:
            raw = await RawClient.open(address)
            hs = handshake.ClientHandshake(wrong.secret)
            raw.send(Message(MsgType.AUTH_HELLO, hs.hello(), req_id=1))
            challenge = await raw.frame()
            nonce = bytes.fromhex(hs.hello()["nonce"])
            forged = handshake.proof(wrong.secret, "client", nonce, bytes.fromhex(challenge.body["nonce"]))
            raw.send(
                Message(MsgType.AUTH_PROOF, {"proof": forged.hex()}, req_id=2),
                Message(MsgType.STATUS, {}, req_id=3),
            )
            (refusal,) = await raw.until_closed()
            assert refusal.req_id == 2 and refusal.body["code"] == "auth_failed"
        np.testing.assert_array_equal(await job.values(), before)
        assert await job.pushes() == [1, 1]


async def test_a_replayed_capture_of_a_worker_session_changes_nothing(secured):
    server, security = secured
    async with Job(server.address, security) as job:
        shard = job.submitted["shards"][0]
        rows = job.submitted["ranges"]["w"][0]
        # A legitimate session, captured byte for byte: handshake, HELLO, a push.
        honest = await RawClient.open(shard)
        await honest.authenticate(security.secret)
        honest.send(
            Message(MsgType.HELLO, {"job_id": job.job_id, "role": "worker", "worker_id": 0, "session": job.session}, req_id=3),
            Message(MsgType.PUSH, {"job_id": job.job_id, "tables": ["w"], "clock": 0, "count": 1},
                    [np.ones(rows[1] - rows[0], np.float32)], req_id=4),
        )  # fmt: skip
        assert [(await honest.frame()).type for _ in range(2)] == [MsgType.HELLO, MsgType.PUSH]
        honest.close()
        await wait_until(lambda: equals(job.pushes(), [1, 0]), what="the honest push")
        before = await job.values()
        # Replayed whole, and the captured proof (and what follows) behind a fresh hello.
        capture = FrameParser()
        capture.receive_data(bytes(honest.sent))
        _captured_hello, *rest = iter(capture.next_event, NEED_DATA)
        fresh = Message(MsgType.AUTH_HELLO, handshake.ClientHandshake(security.secret).hello(), req_id=1)
        for replay in (bytes(honest.sent), b"".join(encode_bytes(m) for m in [fresh, *rest])):
            raw = await RawClient.open(shard)
            raw.send(replay)
            frames = await raw.until_closed()
            assert [f.type for f in frames] == [MsgType.AUTH_HELLO, MsgType.ERROR]
            assert frames[-1].body["code"] == "auth_failed"
        np.testing.assert_array_equal(await job.values(), before)
        assert await job.pushes() == [1, 0]


async def test_slow_loris_peers_are_dropped_after_the_deadline_while_others_are_served(secured):
    server, security = secured
    async with Job(server.address, security) as job:
        hangups = Hangups()
        try:
            for address in [server.address, job.submitted["shards"][0]]:
                hangups.watch(await RawClient.open(address), timeout_s=DEADLINE_S + 20)  # silent
                half_header = await RawClient.open(address)
                half_header.send(encode_bytes(Message(MsgType.STATUS, {}, req_id=1))[:11])
                hangups.watch(half_header, timeout_s=DEADLINE_S + 20)
                stalled = await RawClient.open(address)  # knows the secret, then trickles half a frame
                await stalled.authenticate(security.secret)
                stalled.send(encode_bytes(Message(MsgType.PING, {}, [np.zeros(4096)], req_id=3))[:20_000])
                hangups.watch(stalled, timeout_s=DEADLINE_S + 20)
            served = 0
            while not hangups.done:  # everyone else is served meanwhile: the legitimate worker steps
                await asyncio.wait_for(job.worker.pull(["w"], served), 10)
                await job.worker.push(GRAD, served, 1)
                served += 1
        finally:
            hangups.cancel()
        assert len(hangups.frames) == 6, hangups.after_s
        for frames in hangups.frames.values():
            assert frames and frames[-1].type is MsgType.ERROR, frames
            assert f"{DEADLINE_S:g} s" in frames[-1].body["message"]
        # Not before the deadline (less the moments between its start and ours), and not long after.
        assert all(DEADLINE_S * 0.8 <= after <= DEADLINE_S + 15 for after in hangups.after_s.values()), hangups.after_s
        assert served >= 2
        np.testing.assert_allclose(await job.values(), -0.1 * served, rtol=1e-3)


async def test_keys_per_request_are_limited(secured):
    server, security = secured
    async with Job(server.address, security) as job:
        peer = job.worker.peers[0]
        with pytest.raises(net.RemoteError, match="at most 16 keys; this one names 24") as info:
            await peer.request(MsgType.PULL, {"job_id": job.job_id, "tables": ["w"] * 6, "clock": 0}, timeout_s=5)
        assert info.value.code == "too_many_keys"
        await job.worker.pull(["w"], 0)  # the connection stays usable


def test_listening_beyond_loopback_needs_a_secret_or_insecure(tmp_path):
    refused = run_psctl("server", "--shards", "1", "--host", "0.0.0.0", timeout_s=60)
    assert refused.returncode == 5 and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert message.startswith("psctl: error: refusing to listen on '0.0.0.0' without a shared secret, because anyone")
    for extra in (["--insecure"], ["--secret-file", str(write_secret(tmp_path)[0])]):
        server = ServerProcess(1, "--host", "0.0.0.0", *extra)
        code, _, err = server.stop()
        assert code == 0, err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the children's command lines from /proc")
def test_the_embedded_cluster_keeps_the_secret_off_command_lines_and_environments(tmp_path):
    path, secret = write_secret(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != handshake.SECRET_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "train", "logreg", str(EXAMPLES / "breast_cancer" / "train.csv"),
         "--workers", "2", "--shards", "2", "--epochs", "100000", "--secret-file", str(path),
         "--out", str(tmp_path / "m.npz")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test's timeout
            if line.startswith("epoch 1/"):
                break
        children = cluster_children(proc.pid)
        assert len(children) == 4  # 2 shards, 2 workers: all trained with the secret
        for child in descendants(proc.pid):  # the fork server they came from included
            assert secret not in (child / "cmdline").read_bytes()
            assert secret not in (child / "environ").read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    made = self_signed_cert(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("needs the openssl command or the cryptography package to make a test certificate")
    return made


def test_tls_round_trip_through_every_role(tmp_path, tls_files):
    cert, key = tls_files
    path, _ = write_secret(tmp_path)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert)]
    server = ServerProcess(2, "--secret-file", str(path), *tls)
    try:
        trained = run_psctl(
            "train", "logreg", str(EXAMPLES / "breast_cancer" / "train.csv"), "--server", server.address,
            "--workers", "2", "--epochs", "3", "--lr", "0.5", "--out", str(tmp_path / "m.npz"),
            "--secret-file", str(path), "--tls-ca", str(cert),
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert "train accuracy 0.9" in trained.stdout
        shown = run_psctl("status", "--server", server.address, "--json", "--secret-file", str(path), "--tls-ca", str(cert))
        assert shown.returncode == 0 and '"shard_id": 1' in shown.stdout, shown.stderr
        plain = run_psctl("status", "--server", server.address, "--secret-file", str(path))
        assert plain.returncode == 5 and "does it use TLS" in " ".join(plain.stderr.split()), plain.stderr
        untrusted = run_psctl("status", "--server", server.address, "--secret-file", str(path), "--tls-ca", "/dev/null")
        assert untrusted.returncode != 0 and "Traceback" not in untrusted.stderr
    finally:
        code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err, err


def test_bad_security_settings_are_one_sentence(tmp_path):
    open_secret = tmp_path / "open.secret"
    open_secret.write_text("0123456789abcdef0123\n")
    open_secret.chmod(0o644)
    cases = [
        (["status", "--server", "127.0.0.1:1", "--idle-timeout-s", "0"], "--idle-timeout-s must be positive"),
        (["server", "--max-connections", "0"], "--max-connections must be at least 1"),
        (["worker", "--server", "127.0.0.1:1", "--secret-file", str(open_secret)], "is open to other users (mode 0644)"),
        (["server", "--tls-cert", str(tmp_path / "c.pem")], "serving with TLS needs both --tls-cert and --tls-key"),
    ]
    for args, fragment in cases:
        result = run_psctl(*args, timeout_s=60)
        assert result.returncode == 5, (args, result.stderr)
        message = " ".join(result.stderr.split())
        assert message.startswith("psctl: error:") and fragment in message and "Traceback" not in message, message
