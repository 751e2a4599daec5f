"""The shared-secret handshake, sans-IO like the codec.

:class:`ServerHandshake` and :class:`ClientHandshake` take and return message
bodies, and the transport (psctl.net) moves them
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
import os
from typing import Any

from psctl.protocol.wire import Flag, Message, MsgType

SECRET_ENV = "PSCTL_SECRET"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
_LABEL = b"psctl-auth-v1\0"


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


