"""The codec, fed whole, one byte at a time and with trailing bytes (h11-style)."""

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psctl.wire import (
    HEADER,
    NEED_DATA,
    STAGING_BYTES,
    Flag,
    FrameParser,
    FrameTooLarge,
    LocalProtocolError,
    Message,
    MsgType,
    ProtocolError,
    RemoteProtocolError,
    encode,
    encode_bytes,
)


def sample_messages():
    return [
        Message(MsgType.PING),
        Message(MsgType.PULL, {"tables": ["w"], "clock": 3, "job_id": "x"}, req_id=7),
        Message(
            MsgType.PUSH,
            {"tables": ["a", "b"], "ünï": "çødé"},
            [np.arange(5, dtype=np.float32), np.arange(12, dtype=np.float64).reshape(3, 4)],
            req_id=2**63,
            flags=Flag.REPLY,
        ),
        Message(MsgType.PUSH, {}, [np.zeros(0, dtype=np.int64), np.array(7, dtype=np.uint8)], flags=Flag.ONEWAY),
        Message(MsgType.PULL, {"big": True}, [np.random.default_rng(0).random(100_000).astype(np.float32)], req_id=9),
    ]


def drain(parser):
    out = []
    while (event := parser.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def assert_same(a: Message, b: Message):
    assert (a.type, a.body, a.req_id, a.flags) == (b.type, b.body, b.req_id, b.flags)
    assert len(a.arrays) == len(b.arrays)
    for x, y in zip(a.arrays, b.arrays):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_whole_frames_round_trip():
    msgs = sample_messages()
    parser = FrameParser()
    parser.receive_data(b"".join(encode_bytes(m) for m in msgs))
    got = drain(parser)
    assert len(got) == len(msgs)
    for a, b in zip(msgs, got):
        assert_same(a, b)


def test_one_byte_at_a_time():
    msgs = sample_messages()[:4]
    data = b"".join(encode_bytes(m) for m in msgs)
    parser = FrameParser()
    got = []
    for i in range(len(data)):
        parser.receive_data(data[i : i + 1])
        got += drain(parser)
    assert len(got) == len(msgs)
    for a, b in zip(msgs, got):
        assert_same(a, b)


def test_trailing_partial_frame_waits():
    first, second = sample_messages()[1:3]
    data = encode_bytes(first) + encode_bytes(second)[:30]
    parser = FrameParser()
    parser.receive_data(data)
    got = drain(parser)
    assert len(got) == 1 and got[0].body == first.body
    parser.receive_data(encode_bytes(second)[30:])
    assert_same(drain(parser)[0], second)


def test_buffered_protocol_path_receives_large_payload_in_place():
    msg = Message(MsgType.PUSH, {}, [np.ones(1_000_000, dtype=np.float32)])
    data = encode_bytes(msg)
    parser = FrameParser()
    pos = 0
    sizes = set()
    got = []
    while pos < len(data):  # as Peer does: parse after every chunk the transport delivers
        buf = parser.get_buffer(-1)
        n = min(len(buf), len(data) - pos, 65536)
        buf[:n] = data[pos : pos + n]
        parser.buffer_updated(n)
        got += drain(parser)
        sizes.add(len(buf))
        pos += n
    (got,) = got
    assert got.arrays[0].sum() == 1_000_000
    assert max(sizes) > STAGING_BYTES  # the transport was handed the payload buffer itself


def test_encode_references_array_memory():
    arr = np.arange(1000, dtype=np.float32)
    parts = encode(Message(MsgType.PUSH, {}, [arr]))
    views = [p for p in parts if isinstance(p, memoryview)]
    assert views and np.shares_memory(np.frombuffer(views[0], dtype=np.float32), arr)


def test_non_contiguous_and_big_endian_arrays_are_normalized():
    a = np.arange(20, dtype=np.float64)[::2]
    b = np.arange(4, dtype=">i4")
    parser = FrameParser()
    parser.receive_data(encode_bytes(Message(MsgType.PUSH, {}, [a, b])))
    (got,) = drain(parser)
    np.testing.assert_array_equal(got.arrays[0], a)
    np.testing.assert_array_equal(got.arrays[1], b)


def test_unsupported_dtype_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        encode(Message(MsgType.PUSH, {}, [np.array(["x"])]))


def frame(msg_type=int(MsgType.PING), flags=0, req_id=0, payload=b"\0" * 8, magic=b"PSCT", version=1, length=None):
    return HEADER.pack(magic, version, msg_type, flags, req_id, len(payload) if length is None else length) + payload


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (frame(magic=b"HTTP"), "bad magic"),
        (frame(version=9), "version 9"),
        (frame(msg_type=250), "unknown message type"),
        (frame(flags=0x80), "unknown flag"),
        (frame(payload=b"\1"), "shorter than its prefix"),
        (frame(payload=struct.pack("<II", 100, 0)), "body runs past"),
        (frame(payload=struct.pack("<II", 2, 0) + b"[]" + b"\0" * 6), "not a JSON object"),
        (frame(payload=struct.pack("<II", 2, 0) + b"{x" + b"\0" * 6), "not valid JSON"),
        (frame(payload=struct.pack("<II", 0, 1) + struct.pack("<BB6x", 99, 0)), "unknown dtype"),
        (frame(payload=struct.pack("<II", 0, 1) + struct.pack("<BB6x", 1, 9)), "dimensions"),
        (frame(payload=struct.pack("<II", 0, 1) + struct.pack("<BB6xQ", 1, 1, 2**62)), "runs past"),
        (frame(payload=struct.pack("<II", 0, 1) + struct.pack("<BB6xQQ", 1, 2, 2**40, 2**40)), "runs past"),
        (frame(payload=struct.pack("<II", 0, 0) + b"\0" * 8), "unexpected bytes"),
        (frame(payload=struct.pack("<II", 0, 1000)), "arrays exceed"),
    ],
)
def test_malformed_frames_raise_typed_errors(data, match):
    parser = FrameParser()
    parser.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        parser.next_event()
    with pytest.raises(RemoteProtocolError):  # the parser stays broken
        parser.next_event()


def test_declared_size_over_limit_is_refused_before_allocation():
    parser = FrameParser(max_frame_bytes=1024)
    parser.receive_data(frame(length=2**60, payload=b""))
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 1024"):
        parser.next_event()


def test_body_over_limit_is_refused():
    parser = FrameParser(max_body_bytes=10)
    parser.receive_data(encode_bytes(Message(MsgType.PING, {"x": "y" * 100})))
    with pytest.raises(FrameTooLarge):
        parser.next_event()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_protocol_error(data):
    parser = FrameParser(max_frame_bytes=4096)
    parser.receive_data(data)
    with contextlib.suppress(ProtocolError):  # any other exception fails the test
        for msg in drain(parser):
            again = FrameParser()
            again.receive_data(encode_bytes(msg))
            assert_same(drain(again)[0], msg)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255), st.data())
def test_mutated_valid_frames_never_escape_the_error_type(pos, byte, data):
    raw = bytearray(encode_bytes(sample_messages()[2]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = byte
    parser = FrameParser()
    parser.receive_data(bytes(raw))
    with contextlib.suppress(ProtocolError):  # any other exception fails the test
        drain(parser)
