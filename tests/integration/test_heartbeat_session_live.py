"""Heartbeats on a second connection: the REGISTER_WORKER reply's session token makes a
HEARTBEAT count for that slot on any connection; a wrong token is refused."""

from __future__ import annotations

import asyncio

import pytest

from psctl import net
from psctl.protocol.wire import MsgType

from .cluster import IgnoreEvents, ServerProcess, bare_spec, keep_beating

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAILURE_TIMEOUT_S = 0.5


async def test_a_heartbeat_with_the_session_token_keeps_the_slot_live_from_another_connection():
    server = ServerProcess(1)
    peers: list[net.Peer] = []
    try:
        driver = await net.connect(server.address, IgnoreEvents())
        peers.append(driver)
        spec = {**bare_spec(2, "async"), "failure_timeout_s": FAILURE_TIMEOUT_S, "heartbeat_interval_s": 0.05}
        job_id = (await driver.request(MsgType.SUBMIT, {"spec": spec})).body["job_id"]
        control = await net.connect(server.address, IgnoreEvents())  # sends nothing after registering
        peers.append(control)
        reg = (await control.request(MsgType.REGISTER_WORKER, {"pid": 0, "host": "test"})).body
        assert isinstance(reg["session"], str) and len(bytes.fromhex(reg["session"])) == 16
        beats = await net.connect(server.address, IgnoreEvents())  # the session's heartbeat connection
        peers.append(beats)
        body = {"job_id": job_id, "worker_id": reg["worker_id"], "session": reg["session"], "samples_s": 2.5}
        with pytest.raises(net.RemoteError, match="wrong session token for worker 0"):
            await beats.request(MsgType.HEARTBEAT, {**body, "session": "00" * 16, "clock": 1})
        keep_beating(beats, body=body)
        # The other slot's worker registers and never beats: it is the control group.
        silent = await net.connect(server.address, IgnoreEvents())
        peers.append(silent)
        await silent.request(MsgType.REGISTER_WORKER, {"pid": 0, "host": "test"})
        await asyncio.wait_for(silent.closed, 20)  # declared lost: the coordinator cut it off
        status = (await driver.request(MsgType.STATUS)).body["job"]
        worker0 = status["workers"][0]
        assert worker0["state"] == "running" and worker0["heartbeats"] >= 3 and worker0["samples_s"] == 2.5
        assert worker0["last_heartbeat_s"] < FAILURE_TIMEOUT_S
        assert status["workers"][1]["state"] == "lost" and control.is_open
    finally:
        for peer in peers:
            peer.close()
        server.stop()
