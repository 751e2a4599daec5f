"""``psctl health``: whether the psctl process at an address is up and answering as its role.

A readiness and liveness probe (a Kubernetes ``exec`` probe, a Slurm script's wait): it
speaks psctl's own handshake and asks STATUS, so a port that is open but is not psctl,
or a psctl process that does not answer, is unhealthy. Every step shares one deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psctl import net
from psctl.errors import ConnectError, PsctlError, UsageError
from psctl.protocol.wire import MsgType

ROLES = ("coordinator", "shard", "any")
DEFAULT_TIMEOUT_S = 5.0
RETRY_INTERVAL_S = 0.5  # between tries of wait_until_up: a refused connection returns at once
MIN_TRY_S = 0.2  # wait_until_up's shortest try


class NotReady(PsctlError):
    """Up but not ready yet: a shard not registered with its coordinator, a coordinator with
    fewer shards than asked for. Either may change soon."""


@dataclass(frozen=True)
class Health:
    """What the process at ``address`` answered: its ``role`` and a short ``summary``."""

    address: str
    role: str  # "coordinator" or "shard"
    summary: str
    status: dict[str, Any]  # the STATUS body it sent


def check_role(role: str) -> None:
    if role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}; got '{role}'")


def check_timeout(timeout_s: float, flag: str = "--timeout-s") -> None:
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise UsageError(f"{flag} must be a positive number of seconds; got {timeout_s}")


def check_min_shards(role: str, min_shards: int) -> str:
    """The role to ask for: ``--min-shards`` is a coordinator's figure."""
    if min_shards < 0:
        raise UsageError(f"--min-shards must be 0 or more; got {min_shards}")
    if min_shards and role == "shard":
        raise UsageError("--min-shards counts the shards registered with a coordinator; give --role coordinator")
    return "coordinator" if min_shards else role


async def probe(
    address: str, role: str = "any", security: net.Security = net.LOCAL, timeout_s: float = DEFAULT_TIMEOUT_S,
    min_shards: int = 0,
) -> Health:
    """Connect to ``address`` (TLS and the shared secret as ``security`` says), ask STATUS, and
    check that the answer is from ``role``: a coordinator (with at least ``min_shards`` shards
    registered), or a shard registered with its coordinator. Everything, the TCP connection and
    the handshake included, ends within ``timeout_s``.

    Raises :class:`ConnectError` (unreachable, not psctl, no answer in time),
    :class:`SecurityError` (authentication), :class:`NotReady` or :class:`PsctlError` (another
    role), each with one sentence."""
    check_role(role)
    check_timeout(timeout_s)
    role = check_min_shards(role, min_shards)
    net.parse_address(address)  # a malformed address is its own sentence, not a timeout
    # The handshake's own bound must not outlast the probe's.
    bounded = dataclasses.replace(security, handshake_timeout_s=min(security.handshake_timeout_s, timeout_s))
    what = "psctl process" if role == "any" else f"psctl {role}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            peer = await net.connect(address, what=what, security=bounded, timeout_s=timeout_s)
            try:
                left_s = max(timeout_s - (time.monotonic() - started), 1e-3)
                body = (await peer.request(MsgType.STATUS, timeout_s=left_s)).body
            finally:
                peer.close()
    except TimeoutError:
        raise ConnectError(f"the {what} at {address} did not answer within {timeout_s:g} s") from None
    except net.RemoteError as exc:
        raise PsctlError(f"{address} is a psctl process that does not report its status ({exc}); is it a coordinator or shard?") from None
    except net.ConnectionLost as exc:
        raise ConnectError(f"the {what} at {address} closed the connection before answering: {exc}") from None
    return _judge(address, role, body, min_shards)


def _judge(address: str, role: str, body: dict[str, Any], min_shards: int = 0) -> Health:
    """The answer as a role, or the sentence saying why it is not healthy as ``role``."""
    if isinstance(body.get("shards"), list):
        found = "coordinator"
        job = body.get("job")
        jobs = "no job running" if not isinstance(job, dict) else f"job {job.get('job_id')} {job.get('state')}"
        n = len(body["shards"])
        summary = f"{n} shard{'' if n == 1 else 's'} registered, {jobs}"
        if n < min_shards:
            raise NotReady(f"the psctl coordinator at {address} has {n} of the {min_shards} shards asked for registered")
    elif "shard_id" in body:
        found = "shard"
        if body["shard_id"] is None:
            raise NotReady(f"the psctl shard at {address} has not registered with its coordinator yet")
        summary = f"shard {body['shard_id']}" + (f", job {body['job_id']}" if body.get("job_id") else ", no job")
    else:
        raise PsctlError(f"{address} is a psctl process but neither a coordinator nor a shard")
    if role != "any" and role != found:
        raise PsctlError(f"{address} is a psctl {found}, not a {role}")
    return Health(address, found, summary, body)


async def wait_until_up(
    address: str, role: str, security: net.Security, wait_s: float, probe_timeout_s: float = DEFAULT_TIMEOUT_S,
    on_waiting: Callable[[str], None] = lambda reason: None, min_shards: int = 0,
) -> Health:
    """Probe ``address`` until it answers as ``role`` or ``wait_s`` has passed (then the last
    reason, in one sentence). A failed authentication or another role ends the wait at once:
    waiting does not mend them. ``on_waiting`` gets the first failure's sentence, once."""
    check_timeout(wait_s, "--wait-s")
    check_role(role)
    role = check_min_shards(role, min_shards)
    net.parse_address(address)  # malformed: no wait mends it
    deadline = time.monotonic() + wait_s
    last: PsctlError | None = None
    while True:
        left_s = deadline - time.monotonic()
        if last is not None and left_s < MIN_TRY_S:  # a try this short would only report its own timeout
            raise ConnectError(f"the {role} at {address} did not come up within {wait_s:g} s: {last}")
        try:
            return await probe(address, role, security, timeout_s=max(min(probe_timeout_s, left_s), MIN_TRY_S), min_shards=min_shards)
        except (ConnectError, NotReady) as exc:
            if last is None:
                on_waiting(str(exc))
            last = exc
            await asyncio.sleep(max(min(RETRY_INTERVAL_S, deadline - time.monotonic()), 0))  # retry interval, not synchronisation

