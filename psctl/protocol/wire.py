"""The psctl wire format: a sans-IO frame codec.

Nothing here does I/O or imports asyncio. :func:`encode` turns a
:class:`Message` into a list of buffers meant for ``writelines`` (array data
is referenced, never copied); :class:`FrameParser` turns received bytes back
into messages. The parser can hand out the buffer the next bytes should land
in (:meth:`FrameParser.get_buffer`), so a ``BufferedProtocol`` receives large
arrays straight into the memory numpy will use. See docs/PROTOCOL.md.

Frame::

    header   24 bytes, little-endian
             magic    4s   b"PSCT"
             version  u8   PROTOCOL_VERSION
             type     u8   MsgType
             flags    u16  Flag bits
             req_id   u64  request id (0 for frames that are not requests/replies)
             length   u64  payload bytes that follow
    payload  body_len u32, n_arrays u32, body (UTF-8 JSON object), pad to 8,
             then per array: dtype u8, ndim u8, 6 zero bytes, ndim x u64 dims,
             raw C-order data, pad to 8.
"""

from __future__ import annotations

import enum
import json
import math
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"PSCT"
PROTOCOL_VERSION = 1

HEADER = struct.Struct("<4sBBHQQ")
PAYLOAD_PREFIX = struct.Struct("<II")
ARRAY_PREFIX = struct.Struct("<BB6x")
ALIGN = 8

DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_ARRAYS = 64
MAX_NDIM = 4
_MAX_EXTENT_BYTES = 1 << 48  # far past any real array, far below numpy's index range

# Received bytes are staged here; payloads larger than this get their own
# buffer so the transport writes into it directly.
STAGING_BYTES = 256 * 1024
_MIN_FREE_BYTES = 64 * 1024
_ZERO_PAD = bytes(ALIGN)


class MsgType(enum.IntEnum):
    """Every message psctl speaks. Replies reuse the request's type with Flag.REPLY."""

    ERROR = 0
    HELLO = 1
    # connection set-up: the shared-secret handshake (psctl.protocol.handshake), before anything else
    AUTH_HELLO = 2
    AUTH_PROOF = 3
    # control plane: coordinator
    REGISTER_SHARD = 10
    REGISTER_WORKER = 11
    SUBMIT = 12
    STATS = 13
    EPOCH_REPORT = 14
    PROGRESS = 15
    TRAINED = 16
    FINAL_REPORT = 17
    EVENT = 18
    JOB_END = 19
    STATUS = 20
    FAILED = 21
    TABLES = 22
    STOP = 23
    HEARTBEAT = 24
    CHECKPOINTED = 25
    # a checkpoint at one clock: the coordinator pauses the workers and tells them where to go on to
    PAUSE = 26
    RESUME = 27
    HALT = 28
    # early stopping: the driver has read an epoch's report (and kept its weights); the workers held at its end go on
    EPOCH_SEEN = 29
    WORKER_JOINED = 33
    # control plane: coordinator -> shard
    JOB_SETUP = 30
    WORKER_LEFT = 31
    JOB_CLEAR = 32
    CHECKPOINT = 34
    # data plane: worker/driver -> shard
    PULL = 40
    PUSH = 41
    LEAVE = 42
    # kept models (core/kept.py): read by anyone from a shard
    MODEL_PULL = 43
    PING = 50
    # kept models: client/driver -> coordinator
    MODELS = 60
    MODEL_DROP = 61
    MODEL_KEEP = 62
    # kept models: coordinator -> shard
    KEEP_TABLES = 63
    KEEP_LOAD = 64
    KEEP_DROP = 65


class Flag(enum.IntFlag):
    NONE = 0
    REPLY = 1  # this frame answers req_id
    ONEWAY = 2  # no reply expected
    # A request answered only if it fails: the receiver handles it before it reads the next
    # frame, so any later reply on the connection says it succeeded (docs/PROTOCOL.md).
    QUIET = 4


_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("<u8"),
    6: np.dtype("<u1"),
    7: np.dtype("<f2"),
    8: np.dtype("<u4"),
}
_DTYPE_CODES: dict[np.dtype, int] = {dt: code for code, dt in _DTYPES.items()}


class ProtocolError(Exception):
    """Base of codec errors. The message is safe to send back to the peer."""

    def detached(self) -> ProtocolError:
        """The same error as a new object with no traceback or context, to keep: a kept traceback
        keeps its frames alive, and with them whoever raised or caught it."""
        return type(self)(*self.args)


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid psctl frame."""


class FrameTooLarge(RemoteProtocolError):
    """A declared size exceeds the configured maximum; nothing was allocated."""


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the format cannot carry."""


@dataclass(slots=True)
class Message:
    type: MsgType
    body: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)
    req_id: int = 0
    flags: Flag = Flag.NONE

    # Set lookups, not ``flags & Flag.X``: an IntFlag's ``&`` runs enum code in Python, a few
    # times a frame (6% of a shard's CPU in issue 17's profile); a set hashes the int.
    @property
    def is_reply(self) -> bool:
        return self.flags in _REPLY

    @property
    def is_oneway(self) -> bool:
        return self.flags in _ONEWAY

    @property
    def is_quiet(self) -> bool:
        return self.flags in _QUIET


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def _pad(n: int) -> int:
    return -n % ALIGN


def encode(msg: Message) -> list[bytes | memoryview]:
    """Return the frame for ``msg`` as buffers for ``writelines``.

    Array data is passed by reference (a memoryview of a C-contiguous array);
    the caller must not mutate the arrays until the buffers are written.
    """
    try:
        body = _ENCODER.encode(msg.body).encode()
    except (TypeError, ValueError) as exc:  # not JSON, a NaN, a circular reference
        raise LocalProtocolError(f"the control body cannot travel as JSON: {exc}") from None
    if len(msg.arrays) > MAX_ARRAYS:
        raise LocalProtocolError(f"a message carries at most {MAX_ARRAYS} arrays")
    prefix = PAYLOAD_PREFIX.pack(len(body), len(msg.arrays)) + body + _ZERO_PAD[: _pad(len(body))]
    parts: list[bytes | memoryview] = [b"", prefix]
    length = len(prefix)
    for arr in msg.arrays:
        arr = np.asarray(arr)
        code = _DTYPE_CODES.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if code is None:
            raise LocalProtocolError(f"dtype {arr.dtype} cannot travel on the wire")
        if arr.ndim > MAX_NDIM:
            raise LocalProtocolError(f"arrays have at most {MAX_NDIM} dimensions")
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            arr = np.ascontiguousarray(arr, dtype=_DTYPES[code])
        head = _ARRAY_HEADS[arr.ndim].pack(code, arr.ndim, *arr.shape)
        parts.append(head)
        length += len(head)
        if arr.nbytes:
            parts.append(memoryview(arr).cast("B"))
            length += arr.nbytes
        pad = _pad(arr.nbytes)
        if pad:
            parts.append(_ZERO_PAD[:pad])
            length += pad
    parts[0] = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg.type), int(msg.flags), msg.req_id, length)
    return parts


def encode_bytes(msg: Message) -> bytes:
    """The frame as one bytes object (tests and tools; the hot path uses encode)."""
    return b"".join(encode(msg))


def error_message(text: str, req_id: int = 0, code: str = "error") -> Message:
    flags = Flag.REPLY if req_id else Flag.ONEWAY
    return Message(MsgType.ERROR, {"code": code, "message": text}, req_id=req_id, flags=flags)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError("number out of range")
    return value


# Built once: json.dumps and json.loads with options build a new coder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _json_object(raw: bytes) -> dict[str, Any]:
    """Strict JSON: finite numbers only, so whatever decodes also encodes again."""
    try:
        body = _DECODER.decode(raw.decode())
    except (ValueError, RecursionError):  # also UnicodeDecodeError, and ints past the digit limit
        raise RemoteProtocolError("control body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("control body is not a JSON object")
    return body


def _zeros(payload: memoryview, start: int, end: int, what: str) -> None:
    """Refuse non-zero bytes in ``payload[start:end]`` (padding: fewer than 8)."""
    if end > start and payload[start:end] != _ZERO_PAD[: end - start]:
        raise RemoteProtocolError(f"{what} must be zero bytes")


# Per number of dimensions, built once: an array's header with its shape, and the shape alone.
_ARRAY_HEADS = [struct.Struct(f"{ARRAY_PREFIX.format}{n}Q") for n in range(MAX_NDIM + 1)]
_SHAPES = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]


# Table lookups: calling an enum class costs more than the rest of a small frame's checks.
_MSG_TYPES = {int(t): t for t in MsgType}
_FLAGS = {int(f): f for f in (Flag.NONE, Flag.REPLY, Flag.ONEWAY, Flag.REPLY | Flag.ONEWAY, Flag.QUIET)}
_REPLY, _ONEWAY, _QUIET = (frozenset(f for f in _FLAGS.values() if f & bit) for bit in (Flag.REPLY, Flag.ONEWAY, Flag.QUIET))


def decode_payload(msg_type: int, flags: int, req_id: int, payload: memoryview, max_body_bytes: int) -> Message:
    """Parse one payload. Arrays are zero-copy views into ``payload``."""
    kind = _MSG_TYPES.get(msg_type)
    if kind is None:
        raise RemoteProtocolError(f"unknown message type {msg_type}")
    if flags not in _FLAGS:
        raise RemoteProtocolError(f"unknown flag bits 0x{flags:x}")
    size = len(payload)
    if size < PAYLOAD_PREFIX.size:
        raise RemoteProtocolError("payload shorter than its prefix")
    body_len, n_arrays = PAYLOAD_PREFIX.unpack_from(payload, 0)
    if body_len > max_body_bytes:
        raise FrameTooLarge(f"control body of {body_len} bytes exceeds the limit of {max_body_bytes}")
    if n_arrays > MAX_ARRAYS:
        raise RemoteProtocolError(f"{n_arrays} arrays exceed the limit of {MAX_ARRAYS}")
    pos = PAYLOAD_PREFIX.size
    end = pos + body_len
    if end > size:
        raise RemoteProtocolError("control body runs past the end of the frame")
    body = _json_object(bytes(payload[pos:end])) if body_len else {}
    pos = end + _pad(body_len)
    if pos > size:
        raise RemoteProtocolError("body padding runs past the end of the frame")
    _zeros(payload, end, pos, "body padding")
    arrays: list[np.ndarray] = []
    for _ in range(n_arrays):
        if pos + ARRAY_PREFIX.size > size:
            raise RemoteProtocolError("array header runs past the end of the frame")
        code, ndim = ARRAY_PREFIX.unpack_from(payload, pos)
        _zeros(payload, pos + 2, pos + ARRAY_PREFIX.size, "the array header's reserved bytes")
        pos += ARRAY_PREFIX.size
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise RemoteProtocolError(f"unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise RemoteProtocolError(f"array with {ndim} dimensions exceeds the limit of {MAX_NDIM}")
        if pos + 8 * ndim > size:
            raise RemoteProtocolError("array shape runs past the end of the frame")
        shape = _SHAPES[ndim].unpack_from(payload, pos)
        pos += 8 * ndim
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if pos + nbytes > size:
            raise RemoteProtocolError("array data runs past the end of the frame")
        # An empty array's other dimensions are not bounded by its data; numpy still
        # refuses shapes whose non-zero dimensions multiply past its index range.
        if not count and math.prod(max(dim, 1) for dim in shape) * dtype.itemsize > _MAX_EXTENT_BYTES:
            raise RemoteProtocolError("array dimensions are out of range")
        arrays.append(np.frombuffer(payload, dtype=dtype, count=count, offset=pos).reshape(shape))
        pos += nbytes
        pad = _pad(nbytes)
        if pos + pad > size:
            raise RemoteProtocolError("array padding runs past the end of the frame")
        _zeros(payload, pos, pos + pad, "array padding")
        pos += pad
    if pos != size:
        raise RemoteProtocolError(f"{size - pos} unexpected bytes at the end of the payload")
    return Message(kind, body, arrays, req_id, _FLAGS[flags])


def _staging_buffer(n: int) -> bytearray | mmap.mmap:
    """A connection's staging buffer: its own anonymous mapping when large, which goes back to
    the system when the connection does. ``net.run`` has the allocator keep freed blocks up to
    32 MiB on its heap for the next frame; there, 256 KiB buffers that come and go with
    connections, between longer-lived blocks, fragment it: a shard's RSS climbed 60 MiB over
    230,000 hostile frames before it levelled off, and 20 MiB with mappings (BENCHMARKS.md 7)."""
    return mmap.mmap(-1, n) if n >= _OWN_MAPPING_BYTES else bytearray(n)


_OWN_MAPPING_BYTES = 64 * 1024


class FrameParser:
    """Incremental frame decoder, h11-style.

    Feed bytes with :meth:`receive_data` (or :meth:`get_buffer` plus
    :meth:`buffer_updated`), then call :meth:`next_event` until it returns
    :data:`NEED_DATA`. Any :class:`RemoteProtocolError` is final: the parser
    refuses further input, and the connection should be closed.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        staging_bytes: int = STAGING_BYTES,
    ):
        self.max_frame_bytes = max_frame_bytes
        self.max_body_bytes = max_body_bytes
        self._staging = _staging_buffer(staging_bytes)
        self._min_free = min(_MIN_FREE_BYTES, staging_bytes // 4)
        self._start = 0  # first unparsed byte in staging
        self._end = 0  # one past the last received byte in staging
        self._header: tuple[int, int, int, int] | None = None  # type, flags, req_id, length
        # A payload too large for staging, filled in place. Uninitialized memory: the
        # pages are committed as bytes arrive, so a declared size costs nothing until sent.
        self._big: np.ndarray | None = None
        self._big_filled = 0
        self._broken: ProtocolError | None = None
        self._pending = bytearray()  # bytes given to receive_data, not yet staged

    @property
    def partial(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return self._header is not None or self._end > self._start or bool(self._pending)

    def take_unparsed(self) -> bytes:
        """Hand over the bytes received past the last frame (to a parser with other limits).

        Only between frames, right after :meth:`next_event` returned a message.
        """
        if self._header is not None:
            raise LocalProtocolError("take_unparsed in the middle of a frame")
        rest = bytes(self._staging[self._start : self._end]) + bytes(self._pending)
        self._start = self._end = 0
        self._pending.clear()
        return rest

    # -- receiving -----------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should be written (never empty)."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._start and len(self._staging) - self._end < self._min_free:
            self._compact()
        return memoryview(self._staging)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last :meth:`get_buffer`."""
        if self._big is not None:
            self._big_filled += nbytes
        else:
            self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (for tests and stream transports); :meth:`next_event` consumes it."""
        self._pending += data

    def next_event(self) -> Message | _NeedData:
        """The next complete message, or NEED_DATA."""
        while True:
            event = self._parse_one()
            if event is not NEED_DATA or not self._pending:
                return event
            buf = self.get_buffer()
            n = min(len(buf), len(self._pending))
            buf[:n] = self._pending[:n]
            self.buffer_updated(n)
            del self._pending[:n]

    def _parse_one(self) -> Message | _NeedData:
        if self._broken is not None:
            raise self._broken.detached()
        try:
            return self._parse()
        except ProtocolError as exc:
            # Keep a copy without a traceback: the raised error's frames hold this parser, and a
            # parser holding them would live, staging buffer and all, until the cycle collector ran.
            self._broken = exc.detached()
            raise

    def _parse(self) -> Message | _NeedData:
        if self._header is None:
            if self._end - self._start < HEADER.size:
                return NEED_DATA
            magic, version, msg_type, flags, req_id, length = HEADER.unpack_from(self._staging, self._start)
            if magic != MAGIC:
                raise RemoteProtocolError("bad magic: this is not a psctl frame")
            if version != PROTOCOL_VERSION:
                raise RemoteProtocolError(f"protocol version {version} is not supported (this is {PROTOCOL_VERSION})")
            if length > self.max_frame_bytes:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}")
            self._start += HEADER.size
            self._header = (msg_type, flags, req_id, length)
            if length > len(self._staging) // 2:
                # Large payload: give it its own buffer and move what we have.
                have = min(self._end - self._start, length)
                self._big = np.empty(length, np.uint8)
                memoryview(self._big)[:have] = self._staging[self._start : self._start + have]
                self._big_filled = have
                self._start += have
        msg_type, flags, req_id, length = self._header
        if self._big is not None:
            if self._big_filled < length:
                return NEED_DATA
            payload = memoryview(self._big)
            self._big = None
        else:
            if self._end - self._start < length:
                return NEED_DATA
            # Small payloads are copied out of staging so staging can be reused.
            payload = memoryview(bytes(self._staging[self._start : self._start + length]))
            self._start += length
        self._header = None
        if self._start == self._end:
            self._start = self._end = 0
        return decode_payload(msg_type, flags, req_id, payload, self.max_body_bytes)

    def _compact(self) -> None:
        unparsed = self._end - self._start
        self._staging[:unparsed] = self._staging[self._start : self._end]
        self._start, self._end = 0, unparsed
