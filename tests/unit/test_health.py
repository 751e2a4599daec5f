"""psctl health's judgement of a STATUS answer, and psctl start's rules for roles and variables (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from psctl.apps import health, start
from psctl.errors import ConnectError, PsctlError, UsageError

COORDINATOR = {"shards": [{"shard_id": 0}, {"shard_id": 1}], "job": None}
SHARD = {"shard_id": 3, "pid": 1, "kept": [], "job_id": "j1"}


@pytest.mark.parametrize(
    ("body", "role", "found", "summary"),
    [
        (COORDINATOR, "any", "coordinator", "2 shards registered, no job running"),
        (COORDINATOR, "coordinator", "coordinator", "2 shards registered, no job running"),
        ({"shards": [{}], "job": {"job_id": "j7", "state": "running"}}, "any", "coordinator", "1 shard registered, job j7 running"),
        (SHARD, "shard", "shard", "shard 3, job j1"),
        ({"shard_id": 0, "kept": []}, "any", "shard", "shard 0, no job"),
    ],
)
def test_a_healthy_answer_names_its_role(body, role, found, summary):
    result = health._judge("h:1", role, body)
    assert (result.role, result.summary, result.status) == (found, summary, body)


@pytest.mark.parametrize(
    ("body", "role", "sentence", "kind"),
    [
        (SHARD, "coordinator", "h:1 is a psctl shard, not a coordinator", PsctlError),
        (COORDINATOR, "shard", "h:1 is a psctl coordinator, not a shard", PsctlError),
        ({"shard_id": None, "kept": []}, "any", "the psctl shard at h:1 has not registered with its coordinator yet", health.NotReady),
        ({"models": []}, "any", "h:1 is a psctl process but neither a coordinator nor a shard", PsctlError),
    ],
)
def test_an_unhealthy_answer_is_one_sentence(body, role, sentence, kind):
    with pytest.raises(kind) as caught:
        health._judge("h:1", role, body)
    assert str(caught.value) == sentence
    assert caught.value.exit_code == 1


@pytest.mark.parametrize(
    ("call", "sentence"),
    [
        (lambda: health.probe("h:1", role="worker"), "--role must be one of coordinator, shard, any; got 'worker'"),
        (lambda: health.probe("h:1", timeout_s=0), "--timeout-s must be a positive number of seconds; got 0"),
        (lambda: health.probe("h:1", timeout_s=float("nan")), "--timeout-s must be a positive number of seconds; got nan"),
        (lambda: health.wait_until_up("h:1", "coordinator", health.net.LOCAL, -1), "--wait-s must be a positive number of seconds; got -1"),
    ],
)
async def test_bad_arguments_are_refused_before_connecting(call, sentence):
    with pytest.raises(UsageError) as caught:
        await call()
    assert str(caught.value) == sentence


async def test_a_malformed_address_ends_the_wait_at_once():
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectError, match="'nonsense' is not an address of the form HOST:PORT"):
        await health.wait_until_up("nonsense", "coordinator", health.net.LOCAL, wait_s=60)
    assert loop.time() - started < 5


@pytest.mark.parametrize(
    ("environ", "sentence"),
    [
        ({}, "psctl start runs the role $PSCTL_ROLE names, and it is not set; set it to one of coordinator, shard, server, worker, train"),
        ({"PSCTL_ROLE": " "}, "is not set"),
        ({"PSCTL_ROLE": "ps"}, "$PSCTL_ROLE is 'ps', which is not a role; give one of coordinator, shard, server, worker, train"),
    ],
)
def test_a_missing_or_unknown_role_is_one_sentence(environ, sentence):
    with pytest.raises(UsageError) as caught:
        start.role_from_env(environ)
    assert sentence in str(caught.value)


@pytest.mark.parametrize("role", sorted(start.ROLES))
def test_every_role_is_read(role):
    assert start.role_from_env({"PSCTL_ROLE": role}) == role


@pytest.mark.parametrize(
    ("flag", "variable"),
    [("--secret-file", "PSCTL_SECRET_FILE"), ("--server", "PSCTL_SERVER"), ("--max-frame-bytes", "PSCTL_MAX_FRAME_BYTES"), ("data", "PSCTL_DATA")],
)
def test_a_flag_s_variable(flag, variable):
    assert start.flag_envvar(flag) == variable


def test_variables_of_other_roles_or_misspelt_are_refused():
    flags = ["--server", "--data", "--secret-file"]
    start.check_variables("worker", {"PSCTL_ROLE": "worker", "PSCTL_SERVER": "c:1", "PSCTL_SECRET": "x", "PSCTL_LOG": "INFO", "HOME": "/"}, flags)
    with pytest.raises(UsageError) as caught:
        start.check_variables("worker", {"PSCTL_SERVER": "c:1", "PSCTL_SHARDS": "2", "PSCTL_SECRETFILE": "/s"}, flags)
    assert str(caught.value) == (
        "PSCTL_SECRETFILE, PSCTL_SHARDS are not flags of psctl worker ($PSCTL_ROLE=worker); "
        "each flag --a-b of 'psctl worker --help' is PSCTL_A_B there"
    )


def test_the_coordinator_to_wait_for():
    assert start.wait_target("worker", {"server_address": "c:7000"}, 30.0) == "c:7000"
    assert start.wait_target("shard", {"coordinator": "c:7000"}, 30.0) == "c:7000"
    assert start.wait_target("train", {"server": "c:7000"}, 30.0) == "c:7000"
    assert start.wait_target("worker", {"server_address": "c:7000"}, None) is None


@pytest.mark.parametrize(
    ("role", "params", "why"),
    [
        ("coordinator", {}, "the coordinator role is the one the others wait for"),
        ("server", {"coordinator": None}, "psctl server without --coordinator starts its own coordinator"),
        ("train", {"server": None}, "psctl train without --server starts its own cluster"),
    ],
)
def test_wait_s_without_a_coordinator_to_wait_for_is_refused(role, params, why):
    with pytest.raises(UsageError) as caught:
        start.wait_target(role, params, 10.0)
    assert str(caught.value) == f"--wait-s waits for a coordinator to come up, and there is none to wait for: {why}"


def test_min_shards_counts_a_coordinator_s_shards():
    assert health._judge("h:1", "coordinator", COORDINATOR, min_shards=2).role == "coordinator"
    with pytest.raises(health.NotReady) as caught:
        health._judge("h:1", "coordinator", COORDINATOR, min_shards=3)
    assert str(caught.value) == "the psctl coordinator at h:1 has 2 of the 3 shards asked for registered"
    assert health.check_min_shards("any", 2) == "coordinator" and health.check_min_shards("shard", 0) == "shard"
    for role, n, sentence in [("shard", 1, "give --role coordinator"), ("any", -1, "--min-shards must be 0 or more; got -1")]:
        with pytest.raises(UsageError, match=sentence):
            health.check_min_shards(role, n)
    with pytest.raises(UsageError, match="--min-shards is what --wait-s waits for; give --wait-s too"):
        start.wait_target("train", {"server": "c:1"}, None, min_shards=2)


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_a_port_out_of_range_is_one_sentence(port):
    from psctl.apps.server import check_port

    with pytest.raises(UsageError) as caught:
        check_port(port)
    assert str(caught.value) == f"--port must be from 0 to 65535 (0: any free port); got {port}"
    for ok in (0, 1, 7000, 65535):
        check_port(ok)
