"""The codec, fed whole, one byte at a time and with trailing bytes (h11-style)."""

import contextlib
import gc
import json
import os
import struct
import sys
import tracemalloc
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psctl.protocol.wire import (
    _DTYPES,
    HEADER,
    NEED_DATA,
    PAYLOAD_PREFIX,
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


# -- properties over structured messages and hostile bytes ----------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(sorted(_DTYPES.values(), key=str)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    if np.prod(shape) > 64:  # keep frames small: they are also fed one byte at a time
        shape = shape[:2]
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


messages = st.builds(
    Message,
    type=st.sampled_from(list(MsgType)),
    body=st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    arrays=st.lists(arrays(), max_size=3),
    req_id=st.integers(0, 2**64 - 1),
    flags=st.sampled_from([Flag.NONE, Flag.REPLY, Flag.ONEWAY]),
)


def assert_same_bits(a: Message, b: Message):
    """Like assert_same, but arrays compare by their bytes (NaN payloads included)."""
    assert (a.type, a.body, a.req_id, a.flags) == (b.type, b.body, b.req_id, b.flags)
    assert [(x.dtype, x.shape, x.tobytes()) for x in a.arrays] == [(y.dtype, y.shape, y.tobytes()) for y in b.arrays]


@settings(max_examples=250, deadline=None)
@given(st.lists(messages, min_size=1, max_size=3), st.integers(1, 64))
def test_messages_round_trip_bit_for_bit_in_any_chunking(msgs, chunk):
    data = b"".join(encode_bytes(m) for m in msgs)
    parser = FrameParser()
    got = []
    for i in range(0, len(data), chunk):
        parser.receive_data(data[i : i + chunk])
        got += drain(parser)
    assert len(got) == len(msgs)
    for sent, received in zip(msgs, got):
        assert_same_bits(sent, received)
    assert b"".join(encode_bytes(m) for m in got) == data  # decoded messages re-encode identically


def body_is_canonical(frame_bytes: bytes) -> bool:
    """Whether the JSON text of a frame is what encode writes (the only freedom the codec allows)."""
    body_len, _ = PAYLOAD_PREFIX.unpack_from(frame_bytes, HEADER.size)
    start = HEADER.size + PAYLOAD_PREFIX.size
    raw = frame_bytes[start : start + body_len]
    return raw == (json.dumps(json.loads(raw), separators=(",", ":")).encode() if body_len else b"")


def check_decodes_or_refuses(data: bytes, max_frame_bytes: int = 4096):
    """Feed ``data`` whole and byte by byte: the same messages, or the codec's own error, and
    every message re-encodes to the very bytes it came from (modulo JSON spelling)."""
    outcomes = []
    for step in (len(data) or 1, 1):
        parser = FrameParser(max_frame_bytes=max_frame_bytes)
        got, error = [], None
        try:
            for i in range(0, len(data), step):
                parser.receive_data(data[i : i + step])
                while (event := parser.next_event()) is not NEED_DATA:
                    got.append(event)
        except ProtocolError as exc:  # anything else fails the test
            error = type(exc)
        outcomes.append((got, error))
    (whole, whole_error), (bytewise, bytewise_error) = outcomes
    assert whole_error == bytewise_error and len(whole) == len(bytewise)
    pos = 0
    for a, b in zip(whole, bytewise):
        assert_same_bits(a, b)
        frame_bytes = encode_bytes(a)
        length = HEADER.unpack_from(data, pos)[5]
        original = data[pos : pos + HEADER.size + length]
        if body_is_canonical(original):
            assert frame_bytes == original
        again = FrameParser()
        again.receive_data(frame_bytes)
        assert_same_bits(drain(again)[0], a)
        pos += len(original)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_decode_or_refuse(data):
    check_decodes_or_refuses(data)


@st.composite
def mutated_frames(draw):
    """Valid frames, then bit flips, overwritten bytes, cut or spliced tails, or a rewritten length."""
    data = bytearray(b"".join(encode_bytes(m) for m in draw(st.lists(messages, min_size=1, max_size=2))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "cut", "splice", "length", "u32"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "splice":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif kind == "length" and len(data) >= HEADER.size:
            struct.pack_into("<Q", data, 16, draw(st.sampled_from([0, 7, 8, 2**31, 2**63, 2**64 - 1, len(data) + 8])))
        elif kind == "u32" and len(data) >= pos + 4:
            struct.pack_into("<I", data, pos, draw(st.sampled_from([0, 1, 64, 65, 2**31, 2**32 - 1])))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated_frames())
def test_mutated_frames_decode_or_refuse(data):
    check_decodes_or_refuses(data, max_frame_bytes=1 << 20)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (struct.pack("<II", 8, 0) + b'{"a":NaN', "not valid JSON"),
        (struct.pack("<II", 8, 0) + b'{"a":1e9', "not valid JSON"),
        (struct.pack("<II", 11, 0) + b'{"a":1e999}' + b"\0" * 5, "not valid JSON"),
        (struct.pack("<II", 5006, 0) + b'{"a":' + b"1" * 5000 + b"}" + b"\0" * 2, "not valid JSON"),
        (struct.pack("<II", 2, 0) + b"{}" + b"\1" + b"\0" * 5, "padding must be zero"),
        (struct.pack("<II", 0, 1) + struct.pack("<BBBxxxxx", 1, 0, 7) + b"\0" * 8, "reserved bytes must be zero"),
        (struct.pack("<II", 0, 1) + struct.pack("<BB6x", 1, 0) + b"\0" * 4 + b"\0\0\0\1", "padding must be zero"),
        (struct.pack("<II", 0, 1) + struct.pack("<BB6xQQ", 1, 2, 0, 2**63), "out of range"),
        (struct.pack("<II", 0, 1) + struct.pack("<BB6xQQQQ", 2, 4, 2**20, 2**20, 2**20, 0), "out of range"),
    ],
    ids=["nan", "exponent-cut", "inf", "5000-digit-int", "body-pad", "reserved", "array-pad", "dim-2**63", "empty-2**60"],
)
def test_values_numpy_or_json_would_refuse_are_protocol_errors(payload, match):
    parser = FrameParser()
    parser.receive_data(frame(msg_type=int(MsgType.PUSH), payload=payload))
    with pytest.raises(RemoteProtocolError, match=match):
        parser.next_event()


def test_a_body_that_cannot_be_json_is_a_local_error():
    with pytest.raises(LocalProtocolError, match="cannot travel as JSON"):
        encode(Message(MsgType.PING, {"x": float("nan")}))
    with pytest.raises(LocalProtocolError, match="cannot travel as JSON"):
        encode(Message(MsgType.PING, {"x": object()}))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.just(b"header"), max_size=8), st.integers(0, 2**64 - 1))
def test_allocation_is_bounded_by_the_limits_not_by_declared_sizes(pieces, declared):
    """Whatever a peer declares, the parser holds at most its staging, one frame of the
    configured maximum and the bytes it was given."""
    limit = 64 * 1024
    data = b"".join(HEADER.pack(b"PSCT", 1, int(MsgType.PUSH), 0, 0, declared) if p == b"header" else p for p in pieces)
    parser = FrameParser(max_frame_bytes=limit)
    tracemalloc.start()
    try:
        with contextlib.suppress(ProtocolError):
            parser.receive_data(data)
            drain(parser)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit + 4 * len(data) + 64 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from /proc/self/statm")
def test_a_declared_large_frame_costs_memory_only_as_bytes_arrive():
    def resident_bytes() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    declared = 200 * 1024 * 1024
    parser = FrameParser()
    before = resident_bytes()
    parser.receive_data(HEADER.pack(b"PSCT", 1, int(MsgType.PUSH), 0, 0, declared) + b"\0" * 1024)
    assert parser.next_event() is NEED_DATA and parser.partial
    assert resident_bytes() - before < declared // 4


@pytest.mark.parametrize("data", [b"x" * 30, HEADER.pack(b"PSCT", 1, 250, 0, 0, 8) + bytes(8)], ids=["not-psctl", "unknown-type"])
def test_a_parser_that_refused_a_frame_is_freed_by_reference_counting(data):
    # A refused connection's parser (and its 256 KiB staging buffer) must go when its peer does,
    # not when the cycle collector next runs: a fuzzer's thousands of refused connections
    # otherwise pile up buffers that the allocator then keeps as resident memory.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        parser = FrameParser()
        parser.receive_data(data)
        for _ in range(2):  # refused, and refused again: the parser stays broken
            try:
                parser.next_event()
            except RemoteProtocolError:
                pass
            else:
                raise AssertionError("the frame was not refused")
        gone = weakref.ref(parser)
        del parser
        assert gone() is None, "the refused parser is only reachable through a reference cycle"
    finally:
        if was_enabled:
            gc.enable()
