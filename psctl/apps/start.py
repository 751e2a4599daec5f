"""``psctl start``: one entry point for every role, configured by the environment.

A container image (deploy/Dockerfile) runs ``psctl start``; ``PSCTL_ROLE`` says which
role, and each of that role's flags may come from ``PSCTL_<FLAG>`` (``--secret-file`` from
``PSCTL_SECRET_FILE``), so Kubernetes manifests and Slurm scripts set environment
variables, not command lines. This module holds the rules; the CLI applies them to its
commands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from psctl.errors import UsageError

ROLE_ENV = "PSCTL_ROLE"
WAIT_ENV = "PSCTL_WAIT_S"
MIN_SHARDS_ENV = "PSCTL_MIN_SHARDS"

#: role -> (the psctl command it runs, the parameter naming the coordinator to wait for or None).
ROLES: dict[str, tuple[str, str | None]] = {
    "coordinator": ("coordinator", None),
    "shard": ("shard", "coordinator"),
    "server": ("server", "coordinator"),  # a coordinator and shards in one place, or shards joining --coordinator
    "worker": ("worker", "server_address"),
    "train": ("train", "server"),  # the driver: submits the job (with --server, to a running coordinator)
}

#: PSCTL_* variables psctl reads that are no role's flag.
OTHER_VARIABLES = frozenset({ROLE_ENV, WAIT_ENV, MIN_SHARDS_ENV, "PSCTL_SECRET", "PSCTL_LOG", "PSCTL_LOG_DIR", "PSCTL_SERVE_TOKEN"})


def role_from_env(environ: Mapping[str, str]) -> str:
    """The role ``PSCTL_ROLE`` names; one sentence when it is missing or not a role."""
    names = ", ".join(ROLES)
    role = environ.get(ROLE_ENV, "").strip()
    if not role:
        raise UsageError(f"psctl start runs the role ${ROLE_ENV} names, and it is not set; set it to one of {names}")
    if role not in ROLES:
        raise UsageError(f"${ROLE_ENV} is '{role}', which is not a role; give one of {names}")
    return role


def flag_envvar(flag: str) -> str:
    """The variable that sets ``flag``: ``--secret-file`` -> ``PSCTL_SECRET_FILE``."""
    return "PSCTL_" + flag.lstrip("-").replace("-", "_").upper()


def check_variables(role: str, environ: Mapping[str, str], flags: Iterable[str]) -> None:
    """Refuse a ``PSCTL_*`` variable that is none of ``role``'s flags nor one psctl reads
    otherwise: a misspelt or misplaced setting is one sentence, never silently unused."""
    known = {flag_envvar(f) for f in flags} | OTHER_VARIABLES
    unknown = sorted(k for k in environ if k.startswith("PSCTL_") and k not in known)
    if unknown:
        command = ROLES[role][0]
        raise UsageError(
            f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not {'a flag' if len(unknown) == 1 else 'flags'} "
            f"of psctl {command} (${ROLE_ENV}={role}); each flag --a-b of 'psctl {command} --help' is PSCTL_A_B there"
        )


def wait_target(role: str, params: Mapping[str, object], wait_s: float | None, min_shards: int = 0) -> str | None:
    """The coordinator address ``--wait-s`` waits for, or None without ``--wait-s``;
    one sentence when the role has no coordinator to wait for."""
    if wait_s is None:
        if min_shards:
            raise UsageError("--min-shards is what --wait-s waits for; give --wait-s too")
        return None
    name = ROLES[role][1]
    address = params.get(name) if name else None
    if not isinstance(address, str) or not address:
        why = {"coordinator": "the coordinator role is the one the others wait for",
               "server": "psctl server without --coordinator starts its own coordinator",
               "train": "psctl train without --server starts its own cluster"}[role]  # fmt: skip
        raise UsageError(f"--wait-s waits for a coordinator to come up, and there is none to wait for: {why}")
    return address
