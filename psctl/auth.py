"""Who may talk to a psctl process: the shared secret and its handshake, TLS, safe binds.

The handshake is sans-IO, like the codec: :class:`ServerHandshake` and
:class:`ClientHandshake` take and return message bodies, and net.py moves them
as ordinary request/reply frames before anything else is dispatched::

    client -> server  AUTH_HELLO        {"nonce": Nc}
    server -> client  AUTH_HELLO reply  {"nonce": Ns, "proof": HMAC(K, "server", Nc, Ns)}
    client            checks the server's proof; stops here if it is wrong
    client -> server  AUTH_PROOF        {"proof": HMAC(K, "client", Nc, Ns)}
    server -> client  AUTH_PROOF reply  {}            (or ERROR, and the server closes)

K is the shared secret, HMAC is HMAC-SHA256, nonces are 32 fresh random bytes
(hex on the wire). The secret never travels. Each side's proof covers the
other side's fresh nonce, so a recorded handshake cannot be replayed, and the
proofs are labelled by direction, so one side's proof is never accepted as the
other's (reflection). The client proves itself only to a server that proved
itself first, so it is never an oracle for a party without the secret.

Without TLS the handshake authenticates the connection's set-up, not the bytes
after it: an attacker on the network path can read and alter traffic. Use TLS
(``--tls-*``) where the path is not trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from psctl.errors import SecurityError
from psctl.wire import Flag, Message, MsgType

SECRET_ENV = "PSCTL_SECRET"
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
_LABEL = b"psctl-auth-v1\0"
_WHITESPACE = b" \t\r\n"


class HandshakeError(Exception):
    """The peer broke the handshake. ``code`` goes into the ERROR frame sent back."""

    def __init__(self, message: str, code: str = "auth_failed"):
        super().__init__(message)
        self.code = code


def proof(secret: bytes, side: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the direction label and both nonces (fixed lengths: no ambiguity)."""
    message = _LABEL + side.encode() + b"\0" + client_nonce + server_nonce
    return hmac.new(secret, message, hashlib.sha256).digest()


def _hex_field(body: dict[str, Any], key: str, nbytes: int) -> bytes:
    value = body.get(key)
    if not isinstance(value, str) or len(value) != 2 * nbytes:
        raise HandshakeError(f"handshake field {key!r} is missing or not {nbytes} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise HandshakeError(f"handshake field {key!r} is not hex") from None


class ServerHandshake:
    """The accepting side. Feed it each frame with :meth:`receive`; it returns the reply
    body, or raises HandshakeError (send it back as an ERROR and close). Any frame but
    AUTH_HELLO then AUTH_PROOF, as plain requests, is refused."""

    REQUIRED = (
        "this psctl process requires authentication: give the client the shared secret "
        f"with {SECRET_ENV} or --secret-file"
    )

    def __init__(self, secret: bytes, nonce: bytes | None = None):
        self._secret = secret
        self._server_nonce = nonce or os.urandom(NONCE_BYTES)
        self._client_nonce: bytes | None = None
        self.done = False

    def receive(self, msg: Message) -> dict[str, Any]:
        if self.done:
            raise HandshakeError("the handshake is already complete", code="auth_unexpected")
        if msg.flags != Flag.NONE or msg.arrays:  # a request that wants a reply, and nothing more
            raise HandshakeError(self.REQUIRED, code="auth_required")
        if msg.type is MsgType.AUTH_HELLO and self._client_nonce is None:
            self._client_nonce = _hex_field(msg.body, "nonce", NONCE_BYTES)
            mine = proof(self._secret, "server", self._client_nonce, self._server_nonce)
            return {"nonce": self._server_nonce.hex(), "proof": mine.hex()}
        if msg.type is MsgType.AUTH_PROOF and self._client_nonce is not None:
            theirs = _hex_field(msg.body, "proof", PROOF_BYTES)
            expected = proof(self._secret, "client", self._client_nonce, self._server_nonce)
            if not hmac.compare_digest(theirs, expected):
                raise HandshakeError("authentication failed: the client does not know the shared secret")
            self.done = True
            return {}
        raise HandshakeError(self.REQUIRED, code="auth_required")


class ClientHandshake:
    """The connecting side: :meth:`hello`, then :meth:`on_challenge` with the server's reply."""

    def __init__(self, secret: bytes, nonce: bytes | None = None):
        self._secret = secret
        self._client_nonce = nonce or os.urandom(NONCE_BYTES)

    def hello(self) -> dict[str, Any]:
        return {"nonce": self._client_nonce.hex()}

    def on_challenge(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check the server's proof; return the AUTH_PROOF body. HandshakeError if it is wrong."""
        server_nonce = _hex_field(body, "nonce", NONCE_BYTES)
        theirs = _hex_field(body, "proof", PROOF_BYTES)
        if not hmac.compare_digest(theirs, proof(self._secret, "server", self._client_nonce, server_nonce)):
            raise HandshakeError("its proof does not match this process's secret")
        return {"proof": proof(self._secret, "client", self._client_nonce, server_nonce).hex()}


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
