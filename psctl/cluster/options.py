"""The security options of every psctl process, in one table.

The CLI (typer) and the child processes (argparse) both build their flags from
:data:`SECURITY_OPTIONS`, and both turn the parsed values into a
:class:`net.Security` with :func:`build_security`, so a flag is spelt,
defaulted and documented once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psctl import net
from psctl.protocol import handshake


@dataclass(frozen=True)
class Option:
    name: str  # the keyword build_security takes
    flag: str  # on the command line
    kind: type  # str (a path, may be absent), bool (a switch), float or int
    default: Any
    help: str
    serving_only: bool  # matters only to a process that listens

    @property
    def annotation(self) -> Any:
        return str | None if self.kind is str else self.kind


SECURITY_OPTIONS: tuple[Option, ...] = (
    Option("secret_file", "--secret-file", str, None,
           f"File (mode 600) with the cluster's shared secret; default ${handshake.SECRET_ENV}.", False),
    Option("insecure", "--insecure", bool, False,
           "Allow listening beyond loopback without a secret (trusted networks only); "
           "psctl train's own cluster then gets no fresh random secret.", True),
    Option("tls_cert", "--tls-cert", str, None, "TLS certificate this process presents when it serves (PEM).", True),
    Option("tls_key", "--tls-key", str, None, "Private key of --tls-cert (PEM).", True),
    Option("tls_ca", "--tls-ca", str, None,
           "CA certificates trusted when connecting with TLS (PEM); default: the system's.", False),
    Option("handshake_timeout_s", "--handshake-timeout-s", float, net.DEFAULT_HANDSHAKE_TIMEOUT_S,
           "Seconds a new connection has to authenticate (or, without a secret, send a first frame).", False),
    Option("idle_timeout_s", "--idle-timeout-s", float, net.DEFAULT_IDLE_TIMEOUT_S,
           "Seconds a peer may go silent in the middle of a frame before it is dropped.", False),
    Option("role_timeout_s", "--role-timeout-s", float, net.DEFAULT_ROLE_TIMEOUT_S,
           "Without a secret: seconds a new connection has to say what it is (HELLO or REGISTER).", True),
    Option("max_connections", "--max-connections", int, net.DEFAULT_MAX_CONNECTIONS,
           "Established connections a serving process holds at once.", True),
    Option("max_pending_connections", "--max-pending-connections", int, net.DEFAULT_MAX_PENDING_CONNECTIONS,
           "Connections still in their set-up (handshake, or no role yet) a serving process holds at once.", True),
    Option("max_pending_per_source", "--max-pending-per-source", int, net.DEFAULT_MAX_PENDING_PER_SOURCE,
           "Of those, how many one source address may hold.", True),
    Option("max_keys_per_request", "--max-keys-per-request", int, net.DEFAULT_MAX_KEYS_PER_REQUEST,
           "Keys one pull or push may name.", True),
)  # fmt: skip


def build_security(*, secret: bytes | None = None, **values: Any) -> net.Security:
    """A :class:`net.Security` from the options' values (keyword per :attr:`Option.name`).

    ``secret`` given (a child reads it from an inherited pipe) replaces ``secret_file``."""
    unknown = set(values) - {o.name for o in SECURITY_OPTIONS}
    if unknown:
        raise TypeError(f"not security options: {sorted(unknown)}")
    v = {o.name: o.default for o in SECURITY_OPTIONS} | values
    tls = net.TlsConfig(v["tls_cert"], v["tls_key"], v["tls_ca"]) if v["tls_cert"] or v["tls_key"] or v["tls_ca"] else None
    return net.Security(
        secret=secret if secret is not None else net.load_secret(v["secret_file"]),
        tls=tls,
        insecure=v["insecure"],
        handshake_timeout_s=v["handshake_timeout_s"],
        idle_timeout_s=v["idle_timeout_s"],
        max_connections=v["max_connections"],
        max_keys_per_request=v["max_keys_per_request"],
        max_pending_connections=v["max_pending_connections"],
        max_pending_per_source=v["max_pending_per_source"],
        role_timeout_s=v["role_timeout_s"],
    )


def security_args(security: net.Security) -> list[str]:
    """Everything in ``security`` but the secret, as the table's flags (for a child's command line)."""
    tls = security.tls
    values = {
        "insecure": security.insecure,
        "tls_cert": tls.cert if tls else None,
        "tls_key": tls.key if tls else None,
        "tls_ca": tls.ca if tls else None,
        "handshake_timeout_s": security.handshake_timeout_s,
        "idle_timeout_s": security.idle_timeout_s,
        "max_connections": security.max_connections,
        "max_keys_per_request": security.max_keys_per_request,
        "max_pending_connections": security.max_pending_connections,
        "max_pending_per_source": security.max_pending_per_source,
        "role_timeout_s": security.role_timeout_s,
    }
    args: list[str] = []
    for option in SECURITY_OPTIONS:
        value = values.get(option.name)
        if option.kind is bool:
            args += [option.flag] if value else []
        elif value is not None:
            args += [option.flag, repr(value) if option.kind is float else str(value)]
    return args
