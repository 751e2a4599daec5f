"""Who may talk to a psctl process: the shared secret (loading it), safe binds, TLS, and
the limits every connection is held to (:class:`Security`).

The handshake itself is sans-IO and lives in :mod:`psctl.protocol.handshake`.
Without TLS the handshake authenticates the connection's set-up, not the bytes
after it: use TLS (``--tls-*``) where the path is not trusted.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from psctl.errors import SecurityError
from psctl.protocol.handshake import SECRET_ENV

DEFAULT_MAX_CONNECTIONS = 1024
# Connections still in their set-up (before the handshake finishes; without a secret, before
# the service says the peer took a role) have a budget of their own, so they never take the
# slots of established ones, and each source address a share of it.
DEFAULT_MAX_PENDING_CONNECTIONS = 64
DEFAULT_MAX_PENDING_PER_SOURCE = 16
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_ROLE_TIMEOUT_S = 60.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_MAX_KEYS_PER_REQUEST = 1 << 24
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
_WHITESPACE = b" \t\r\n"

# -- the secret ------------------------------------------------------------------
def _checked_secret(raw: bytes, where: str) -> bytes:
    secret = raw.strip(_WHITESPACE)
    if len(secret) < MIN_SECRET_BYTES:
        raise SecurityError(
            f"the secret in {where} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(for example: openssl rand -hex 32)"
        )
    return secret


def load_secret(secret_file: str | None = None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The shared secret from ``secret_file``, else from $PSCTL_SECRET, else None.

    Surrounding whitespace (a trailing newline) is ignored. A file must not be
    readable or writable by group or others, as ssh requires of private keys.
    """
    environ = os.environ if environ is None else environ
    if secret_file is None:
        value = environ.get(SECRET_ENV)
        return None if value is None else _checked_secret(value.encode(), f"${SECRET_ENV}")
    try:
        with open(secret_file, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise SecurityError(f"secret file '{secret_file}' is not a regular file")
            if mode & 0o077:
                raise SecurityError(
                    f"secret file '{secret_file}' is open to other users (mode {stat.S_IMODE(mode):04o}); "
                    f"run: chmod 600 {secret_file}"
                )
            raw = fh.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        raise SecurityError(f"secret file '{secret_file}' does not exist") from None
    except OSError as exc:
        raise SecurityError(f"cannot read secret file '{secret_file}': {exc.strerror or exc}") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise SecurityError(f"secret file '{secret_file}' is larger than {MAX_SECRET_BYTES} bytes; is it the right file?")
    return _checked_secret(raw, f"'{secret_file}'")


def read_secret_fd(fd: int) -> bytes:
    """Read the secret a parent wrote into an inherited pipe (how children get it: never argv)."""
    chunks = []
    with os.fdopen(fd, "rb") as pipe:
        while chunk := pipe.read(MAX_SECRET_BYTES + 1):
            chunks.append(chunk)
    return _checked_secret(b"".join(chunks)[: MAX_SECRET_BYTES + 1], "the inherited pipe")


# -- where it is safe to listen ------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address ('' and 0.0.0.0 are not)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, secret: bytes | None, insecure: bool) -> None:
    """Refuse to listen beyond this host without a secret, unless told ``insecure``."""
    if secret is None and not insecure and not is_loopback(host):
        raise SecurityError(
            f"refusing to listen on '{host or '*'}' without a shared secret, because anyone who can reach "
            f"the port could read and change every parameter; set {SECRET_ENV} or --secret-file, "
            "or pass --insecure on a network you trust"
        )


# -- TLS ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsConfig:
    """TLS on the same framing. ``cert``/``key``: what this process presents when it
    serves; ``ca``: what it trusts when it connects (the system's CAs when None).

    Clients are not asked for certificates: the shared secret authenticates them.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @cached_property
    def server_context(self) -> ssl.SSLContext:
        if not self.cert or not self.key:
            raise SecurityError("serving with TLS needs both --tls-cert and --tls-key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except FileNotFoundError as exc:
            raise SecurityError(f"TLS certificate or key '{exc.filename or self.cert}' does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(f"cannot load TLS certificate '{self.cert}' with key '{self.key}': {exc}") from None
        return ctx

    @cached_property
    def client_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        except FileNotFoundError:
            raise SecurityError(f"TLS CA file '{self.ca}' does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(f"cannot load TLS CA file '{self.ca}': {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


@dataclass(frozen=True)
class Security:
    """How one process authenticates, encrypts and bounds its connections (every role).

    The default is the insecure-local mode: no secret, no TLS, and servers may
    bind only loopback addresses.
    """

    secret: bytes | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    insecure: bool = False  # allow a non-loopback bind without a secret
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S  # accept -> authenticated (or first frame)
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S  # silence allowed in the middle of a frame
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # established ones, per listening process
    max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST
    max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS  # still in their set-up, per listening process
    max_pending_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE  # of those, from one source address
    role_timeout_s: float = DEFAULT_ROLE_TIMEOUT_S  # without a secret: accept -> the peer took a role

    def __post_init__(self) -> None:
        for name in ("handshake_timeout_s", "idle_timeout_s", "role_timeout_s"):
            if not getattr(self, name) > 0:
                raise SecurityError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_connections", "max_keys_per_request", "max_pending_connections", "max_pending_per_source"):
            if getattr(self, name) < 1:
                raise SecurityError(f"--{name.replace('_', '-')} must be at least 1")


LOCAL = Security()
