"""Where an input's bytes come from: a local file, or a URL through fsspec (``s3://``,
``gs://``, ``memory://``, ``file://`` ...), read as stored or through gzip, bz2 or zstd.

The readers above this module see one thing: a binary stream of the input's text that
reads forward and seeks forward. A plain file (local or remote) seeks anywhere, so a
worker reads only its byte range (a remote object by one ranged GET). A compressed file
cannot be entered in the middle: its stream decompresses from the start and a forward
seek decompresses and discards up to there, so partitions are byte ranges of the
*decompressed* text, the same ranges a plain copy of the file would get, and worker k
decompresses the file up to the end of its range and keeps only its own lines.

Compression is told by the name's suffix (``.gz``, ``.bz2``, ``.zst``); a file named so
that is not compressed that way is refused in one sentence when it is read.

Every failure is a :class:`~psctl.errors.DataError` (one sentence), and an optional
library that is missing is a :class:`~psctl.errors.UsageError` naming the pip install.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import zlib
from typing import Any, BinaryIO

from psctl.errors import DataError, UsageError

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DISCARD_BYTES = 1 << 20  # a forward seek of a compressed stream decompresses this much at a time
# The extra naming each optional library, as pyproject.toml declares them.
EXTRAS = {"fsspec": "s3", "s3fs": "s3", "pyarrow": "parquet", "zstandard": "zstd", "gcsfs": "gcs"}
_PROTOCOL_LIBRARIES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def require(module: str, what: str) -> Any:
    """Import an optional library, or UsageError naming the pip install that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module)
        how = f"pip install 'psctl[{extra}]'" if extra else f"pip install {module}"
        raise UsageError(f"{what} needs {module}, which is not installed; run: {how}") from None


def is_url(path: str | os.PathLike[str]) -> bool:
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike[str]) -> str:
    """How the job spec names the input: a URL as given, a local path made absolute."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def compression(path: str | os.PathLike[str]) -> str | None:
    """'gzip', 'bz2', 'zstd' (by the name's suffix) or None."""
    name = os.fspath(path).rstrip("/")
    return COMPRESSIONS.get(os.path.splitext(name)[1].lower())


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; UsageError when fsspec or the
    protocol's library is missing."""
    fsspec = require("fsspec", f"reading '{url}'")
    protocol = url.split("://", 1)[0].lower()
    if protocol in _PROTOCOL_LIBRARIES:
        require(_PROTOCOL_LIBRARIES[protocol], f"reading '{url}'")
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise UsageError(f"reading '{url}' needs a library fsspec does not find ({exc})") from None
    except ValueError as exc:
        raise DataError(f"cannot read '{url}': {exc}") from None


def storage_error(path: str, exc: BaseException, what: str = "data file") -> DataError:
    """One sentence for an exception of a filesystem (local, or fsspec's for a URL)."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{what} '{path}' does not exist")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{what} '{path}' is a directory, not a file")
    if isinstance(exc, PermissionError):
        return DataError(f"cannot read {what} '{path}': permission denied")
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = " ".join(text.split())[:300]
    return DataError(f"cannot read {what} '{path}': {text}")


def open_stored(path: str | os.PathLike[str], what: str = "data file") -> BinaryIO:
    """The file's bytes as stored (compressed or not), seekable."""
    path = os.fspath(path)
    try:
        if not is_url(path):
            return open(path, "rb")
        fs, inner = filesystem(path)
        if fs.isdir(inner):
            raise IsADirectoryError(path)
        return fs.open(inner, "rb")
    except (UsageError, DataError):
        raise
    except Exception as exc:  # fsspec's filesystems raise their clients' errors (botocore, aiohttp ...)
        raise storage_error(path, exc, what) from None


def stored_size(path: str | os.PathLike[str], what: str = "data file") -> int:
    """The file's size in bytes as stored (the job spec checks it on every worker host)."""
    path = os.fspath(path)
    try:
        if not is_url(path):
            return os.path.getsize(path)
        fs, inner = filesystem(path)
        return int(fs.size(inner))
    except (UsageError, DataError):
        raise
    except Exception as exc:
        raise storage_error(path, exc, what) from None


def exists(path: str | os.PathLike[str]) -> bool:
    path = os.fspath(path)
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    try:
        return bool(fs.exists(inner))
    except Exception as exc:
        raise storage_error(path, exc) from None


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """The input's text as a binary stream: seekable for a plain file, forward only
    (decompressing) for a compressed one. Errors while reading are DataErrors."""
    raw = open_stored(path)
    kind = compression(path)
    if kind is None:
        return raw if not is_url(path) else _Checked(raw, raw, os.fspath(path), None)
    try:
        return _Checked(_decompressor(kind, raw), raw, os.fspath(path), kind)
    except BaseException:
        raw.close()
        raise


def _decompressor(kind: str, raw: BinaryIO) -> Any:
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "bz2":
        import bz2

        return bz2.BZ2File(raw, "rb")
    zstandard = require("zstandard", "reading zstd-compressed input")
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)


def _decode_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, ValueError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class _Checked:
    """A stream whose read errors are one sentence, with ``readline(limit)`` (which fsspec's
    files lack). Over a decompressor it seeks forward by decompressing and discarding."""

    def __init__(self, inner: Any, raw: BinaryIO, path: str, kind: str | None):
        self._inner, self._raw, self._path, self._kind = inner, raw, path, kind
        self._buf = b""
        self._pos = 0  # position in the text of the next byte returned

    def _fail(self, exc: BaseException) -> DataError:
        if self._kind is None:
            return storage_error(self._path, exc)
        detail = " ".join((str(exc) or type(exc).__name__).split())[:200]
        return DataError(f"'{self._path}' is damaged or not {self._kind}-compressed ({detail})")

    def _more(self, n: int) -> bytes:
        try:
            return self._inner.read(n)
        except (UsageError, DataError):
            raise
        except Exception as exc:  # a damaged stream, or the filesystem's client failing
            if self._kind is not None and isinstance(exc, _decode_errors()):
                raise self._fail(exc) from None
            raise storage_error(self._path, exc) from None

    def read(self, n: int = -1) -> bytes:
        parts, have = [self._buf], len(self._buf)
        while n < 0 or have < n:
            chunk = self._more(DISCARD_BYTES if n < 0 else max(n - have, 1 << 16))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        out, self._buf = (data, b"") if n < 0 else (data[:n], data[n:])
        self._pos += len(out)
        return out

    def readline(self, limit: int = -1) -> bytes:
        while b"\n" not in self._buf and (limit < 0 or len(self._buf) < limit):
            chunk = self._more(1 << 16)
            if not chunk:
                break
            self._buf += chunk
        end = self._buf.find(b"\n") + 1 or len(self._buf)
        if limit >= 0:
            end = min(end, limit)
        out, self._buf = self._buf[:end], self._buf[end:]
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("psctl input streams seek from the start only")
        if self._kind is None:  # a plain remote file seeks anywhere
            try:
                self._inner.seek(pos)
            except Exception as exc:
                raise self._fail(exc) from None
            self._buf, self._pos = b"", pos
            return pos
        if pos < self._pos:  # back: decompress again from the start
            self.close()
            self._raw = open_stored(self._path)
            self._inner = _decompressor(self._kind, self._raw)
            self._buf, self._pos = b"", 0
        while self._pos < pos:
            if not self.read(min(pos - self._pos, DISCARD_BYTES)):
                break
        return self._pos

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._raw.close()  # gzip and bz2 leave the file they were given open

    def __enter__(self) -> _Checked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def text_size(path: str | os.PathLike[str], fh: BinaryIO | None = None) -> int:
    """The length of the input's text: the stored size of a plain file; a compressed one
    is decompressed once to count it (the planner then splits it as a plain copy)."""
    if compression(path) is None:
        if fh is not None and hasattr(fh, "fileno") and not is_url(path):
            return os.fstat(fh.fileno()).st_size
        return stored_size(path)
    with open_input(path) as stream:
        total = 0
        while chunk := stream.read(DISCARD_BYTES * 4):
            total += len(chunk)
    return total


# The last compressed stream read_range used, left open at its position: ranges read in
# order (a partition parsed slice by slice) decompress the file once, not once a range.
_last_stream: dict[str, _Checked] = {}
_last_stream_lock = threading.Lock()


def _read_compressed(path: str, start: int, end: int) -> bytes:
    with _last_stream_lock:
        stream = _last_stream.pop(path, None)
        for other in _last_stream.values():
            other.close()
        _last_stream.clear()
    if stream is None or stream.tell() > start:
        if stream is not None:
            stream.close()
        stream = open_input(path)  # type: ignore[assignment]
    assert isinstance(stream, _Checked)
    try:
        stream.seek(start)
        raw = stream.read(end - start)
    except BaseException:
        stream.close()
        raise
    with _last_stream_lock:
        _last_stream[path] = stream
    return raw


def read_range(path: str | os.PathLike[str], start: int, end: int) -> bytes:
    """Bytes [start, end) of the input's text: a local seek, one ranged request for a URL,
    or the decompressed stream up to ``end``. DataError when the file is shorter."""
    path = os.fspath(path)
    if is_url(path) and compression(path) is None:
        fs, inner = filesystem(path)
        try:
            raw = fs.cat_file(inner, start=start, end=end) if end > start else b""
        except Exception as exc:
            raise storage_error(path, exc) from None
    elif compression(path) is not None:
        raw = _read_compressed(path, start, end)
    else:
        with open_input(path) as fh:
            fh.seek(start)
            raw = fh.read(end - start)
    if len(raw) != end - start:
        raise DataError(f"data file '{path}' is shorter than when it was partitioned")
    return raw
