"""The handshake, the secret and the bind rule, without sockets."""

import os

import pytest

from psctl import net
from psctl.errors import SecurityError
from psctl.protocol import handshake
from psctl.protocol.wire import Flag, Message, MsgType

SECRET = b"correct horse battery staple"


def request(kind: MsgType, body: dict, req_id: int = 1, flags: Flag = Flag.NONE, arrays=()) -> Message:
    return Message(kind, body, list(arrays), req_id=req_id, flags=flags)


def run_handshake(client: handshake.ClientHandshake, server: handshake.ServerHandshake) -> None:
    challenge = server.receive(request(MsgType.AUTH_HELLO, client.hello()))
    answer = client.on_challenge(challenge)
    assert server.receive(request(MsgType.AUTH_PROOF, answer, req_id=2)) == {}


def test_both_sides_prove_the_secret():
    server = handshake.ServerHandshake(SECRET)
    run_handshake(handshake.ClientHandshake(SECRET), server)
    assert server.done


def test_the_secret_never_travels():
    client, server = handshake.ClientHandshake(SECRET), handshake.ServerHandshake(SECRET)
    hello = client.hello()
    challenge = server.receive(request(MsgType.AUTH_HELLO, hello))
    answer = client.on_challenge(challenge)
    wire = repr([hello, challenge, answer]).encode()
    assert SECRET not in wire and SECRET.hex().encode() not in wire


def test_a_server_with_another_secret_is_refused_before_the_client_proves_anything():
    client, impostor = handshake.ClientHandshake(SECRET), handshake.ServerHandshake(b"another secret, as long")
    challenge = impostor.receive(request(MsgType.AUTH_HELLO, client.hello()))
    with pytest.raises(handshake.HandshakeError, match="proof does not match"):
        client.on_challenge(challenge)


def test_a_client_with_another_secret_is_refused():
    client, server = handshake.ClientHandshake(b"another secret, as long"), handshake.ServerHandshake(SECRET)
    challenge = server.receive(request(MsgType.AUTH_HELLO, client.hello()))
    forged = {"proof": handshake.proof(b"another secret, as long", "client", bytes.fromhex(client.hello()["nonce"]),
                                  bytes.fromhex(challenge["nonce"])).hex()}  # fmt: skip
    with pytest.raises(handshake.HandshakeError, match="does not know the shared secret") as info:
        server.receive(request(MsgType.AUTH_PROOF, forged, req_id=2))
    assert info.value.code == "auth_failed" and not server.done


def test_a_recorded_handshake_cannot_be_replayed():
    client, first = handshake.ClientHandshake(SECRET), handshake.ServerHandshake(SECRET)
    hello = client.hello()
    answer = client.on_challenge(first.receive(request(MsgType.AUTH_HELLO, hello)))
    first.receive(request(MsgType.AUTH_PROOF, answer, req_id=2))
    replayed = handshake.ServerHandshake(SECRET)  # a fresh connection: a fresh server nonce
    replayed.receive(request(MsgType.AUTH_HELLO, hello))
    with pytest.raises(handshake.HandshakeError, match="does not know the shared secret"):
        replayed.receive(request(MsgType.AUTH_PROOF, answer, req_id=2))


def test_a_server_proof_reflected_back_is_not_a_client_proof():
    attacker_nonce = os.urandom(handshake.NONCE_BYTES).hex()
    server = handshake.ServerHandshake(SECRET)
    challenge = server.receive(request(MsgType.AUTH_HELLO, {"nonce": attacker_nonce}))
    with pytest.raises(handshake.HandshakeError):
        server.receive(request(MsgType.AUTH_PROOF, {"proof": challenge["proof"]}, req_id=2))
    # Nor does a second server, handed the first one's nonce, produce a usable proof:
    # everything a server signs is labelled "server".
    assert handshake.proof(SECRET, "server", b"a" * 32, b"b" * 32) != handshake.proof(SECRET, "client", b"a" * 32, b"b" * 32)


def test_the_client_side_refuses_a_replayed_server_reply():
    client, server = handshake.ClientHandshake(SECRET), handshake.ServerHandshake(SECRET)
    recorded = server.receive(request(MsgType.AUTH_HELLO, client.hello()))
    with pytest.raises(handshake.HandshakeError):
        handshake.ClientHandshake(SECRET).on_challenge(recorded)  # another client nonce


@pytest.mark.parametrize(
    "frames",
    [
        [request(MsgType.PULL, {"tables": ["w"]})],
        [request(MsgType.AUTH_PROOF, {"proof": "00" * 32})],
        [request(MsgType.AUTH_HELLO, {"nonce": "00" * 32}, flags=Flag.ONEWAY)],
        [request(MsgType.AUTH_HELLO, {"nonce": "00" * 32}, flags=Flag.REPLY)],
        [request(MsgType.AUTH_HELLO, {"nonce": "00" * 32}, arrays=[b"x"])],
        [request(MsgType.AUTH_HELLO, {"nonce": "00" * 32}), request(MsgType.AUTH_HELLO, {"nonce": "00" * 32})],
    ],
    ids=["pull-first", "proof-first", "oneway", "reply", "arrays", "hello-twice"],
)
def test_anything_but_the_handshake_in_order_is_refused(frames):
    server = handshake.ServerHandshake(SECRET)
    *before, last = frames
    for frame in before:
        server.receive(frame)
    with pytest.raises(handshake.HandshakeError) as info:
        server.receive(last)
    assert info.value.code == "auth_required" and not server.done


@pytest.mark.parametrize("nonce", [None, 7, "00" * 31, "zz" * 32, "00" * 33, ""])
def test_malformed_handshake_fields(nonce):
    with pytest.raises(handshake.HandshakeError, match="nonce"):
        handshake.ServerHandshake(SECRET).receive(request(MsgType.AUTH_HELLO, {"nonce": nonce}))


def test_secret_from_environment_and_file(tmp_path):
    assert net.load_secret(None, {}) is None
    assert net.load_secret(None, {"PSCTL_SECRET": "  0123456789abcdef\n"}) == b"0123456789abcdef"
    path = tmp_path / "secret"
    path.write_bytes(b"from-the-file-0123456789\n")
    path.chmod(0o600)
    # The flag wins over the environment.
    assert net.load_secret(str(path), {"PSCTL_SECRET": "0123456789abcdef"}) == b"from-the-file-0123456789"


def test_secret_file_open_to_others_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"0123456789abcdef0123")
    path.chmod(0o644)
    with pytest.raises(SecurityError, match=r"open to other users \(mode 0644\); run: chmod 600"):
        net.load_secret(str(path), {})


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"short\n", "is 5 bytes; use at least 16"), (b"", "is 0 bytes"), (b"x" * 5000, "larger than 4096 bytes")],
)
def test_bad_secret_files(tmp_path, content, match):
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SecurityError, match=match):
        net.load_secret(str(path), {})


def test_missing_secret_file_and_short_environment_secret(tmp_path):
    with pytest.raises(SecurityError, match="secret file '.*nope' does not exist"):
        net.load_secret(str(tmp_path / "nope"), {})
    with pytest.raises(SecurityError, match=r"\$PSCTL_SECRET is 3 bytes"):
        net.load_secret(None, {"PSCTL_SECRET": "abc"})


def test_secret_through_an_inherited_pipe():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"0123456789abcdef0123\n")
    os.close(write_fd)
    assert net.read_secret_fd(read_fd) == b"0123456789abcdef0123"
    with pytest.raises(OSError):
        os.fstat(read_fd)  # closed after reading


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_no_secret(host):
    assert net.is_loopback(host)
    net.check_bind(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "192.168.0.1"])
def test_other_binds_need_a_secret_or_insecure(host):
    assert not net.is_loopback(host)
    with pytest.raises(SecurityError) as info:
        net.check_bind(host, None, False)
    text = str(info.value)
    assert text.startswith("refusing to listen on") and "because anyone who can reach the port" in text
    assert text.count(". ") == 0  # one sentence
    net.check_bind(host, SECRET, False)
    net.check_bind(host, None, True)


def test_tls_config_errors_are_one_sentence(tmp_path):
    with pytest.raises(SecurityError, match="needs both --tls-cert and --tls-key"):
        _ = net.TlsConfig(cert=str(tmp_path / "c.pem")).server_context
    with pytest.raises(SecurityError, match="does not exist"):
        _ = net.TlsConfig(cert=str(tmp_path / "c.pem"), key=str(tmp_path / "k.pem")).server_context
    with pytest.raises(SecurityError, match="TLS CA file '.*ca.pem' does not exist"):
        _ = net.TlsConfig(ca=str(tmp_path / "ca.pem")).client_context
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(SecurityError, match="cannot load TLS certificate"):
        _ = net.TlsConfig(cert=str(tmp_path / "junk.pem"), key=str(tmp_path / "junk.pem")).server_context
