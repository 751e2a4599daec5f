"""model.npz: the parameter arrays plus a ``__meta__`` JSON document. Never pickled.

``__meta__`` is the UTF-8 JSON text as a uint8 array, so the archive loads with
``allow_pickle=False``. It always carries ``format`` and ``format_version``.

A path may be a URL (``s3://bucket/model.npz``, any fsspec protocol; the ``s3`` extra):
the archive is built in memory and written with one PUT (atomic on object storage), and
read back through fsspec's file object.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from psctl.data import storage
from psctl.errors import DataError, ModelFileError, UsageError

FORMAT = "psctl-model"
FORMAT_VERSION = 1
META_KEY = "__meta__"
# Local file header (an archive with members) or end of central directory (an empty one).
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# RuntimeError: an encrypted member (NotImplementedError, an unknown compression, is one too).
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, OSError)
MAX_MEMBERS = 4096
MAX_META_BYTES = 64 << 20
#: name -> (shape, dtype) of each member, from its .npy header (no data read).
Headers = dict[str, tuple[tuple[int, ...], np.dtype]]
#: Given the checked meta and the headers, the members to load (raises ModelFileError to refuse).
Select = Callable[[dict[str, Any], Headers], set[str]]
_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def save_model(path: str, params: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``params`` and ``meta`` (plus the format marker) to ``path`` atomically:
    a temporary file in the same folder, fsync, then rename over ``path``.

    Raises ValueError for a parameter name starting with "__" or an object array, and
    ModelFileError when the file cannot be written.
    """
    arrays = {}
    for name, value in params.items():
        array = np.asarray(value)
        if name.startswith("__"):
            raise ValueError(f"parameter names may not start with '__': {name!r}")
        if array.dtype.hasobject:
            raise ValueError(f"parameter {name!r} is an object array; a model file holds numbers only")
        arrays[name] = array
    meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if storage.is_url(path):
        return _save_url(path, arrays)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".psctl-model-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelFileError(f"cannot write model file '{path}': {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _save_url(url: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        fs, inner = storage.filesystem(url)
    except DataError as exc:
        raise ModelFileError(str(exc).replace("cannot read", "cannot write the model file to", 1)) from None
    try:
        fs.pipe_file(inner, buffer.getvalue())
    except Exception as exc:  # the filesystem's client errors (botocore, aiohttp ...)
        detail = " ".join((getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).split())[:300]
        raise ModelFileError(f"cannot write model file '{url}': {detail}") from None


def load_model(
    path: str, expect_kind: str | None = None, select: Select | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The parameter arrays and the meta dict of a psctl model file.

    Every way the file can be wrong (missing, not a regular file, not an archive,
    damaged, a plain numpy archive, object arrays, bad meta, another kind than
    ``expect_kind``) raises ModelFileError with one sentence. ``select``, given the
    meta and every member's declared shape and dtype (read from the .npy headers,
    before any data), names the members to load; the others are never inflated.
    """
    try:
        with _open_regular(path) as fh:
            # np.load would try a non-zip file as a pickle; refuse it here with a clear word.
            if fh.read(4) not in _ZIP_MAGICS:
                raise ModelFileError(f"'{path}' is not a psctl model file (not an .npz archive)")
            fh.seek(0)
            headers = _check_members(fh, path)
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as archive:
                if META_KEY not in headers:
                    raise ModelFileError(f"'{path}' is a numpy archive but not a psctl model (no {META_KEY})")
                meta = _meta(path, headers[META_KEY], archive)
                if expect_kind is not None and meta["kind"] != expect_kind:
                    raise ModelFileError(f"'{path}' is a {meta['kind']} model, not {expect_kind}")
                del headers[META_KEY]
                for name, (_, dtype) in headers.items():
                    if dtype.kind not in "fiu":
                        raise ModelFileError(f"'{path}' has a parameter '{name}' of type {dtype}, not numbers")
                wanted = set(headers) if select is None else select(meta, headers)
                return {name: archive[name] for name in headers if name in wanted}, meta
    except (ModelFileError, UsageError):
        raise
    except FileNotFoundError:
        raise ModelFileError(f"model file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ModelFileError(f"'{path}' is a folder, not a model file") from None
    except PermissionError as exc:
        raise ModelFileError(f"cannot read model file '{path}': {exc.strerror}") from None
    except ValueError as exc:
        # numpy refuses object (pickled) arrays with a plain ValueError naming allow_pickle.
        if "allow_pickle" in str(exc):
            raise ModelFileError(f"'{path}' holds object arrays, which psctl never loads") from None
        raise ModelFileError(f"'{path}' is a damaged .npz archive ({exc})") from None
    except _DAMAGED as exc:
        raise ModelFileError(f"'{path}' is a damaged or truncated .npz archive ({type(exc).__name__})") from None
    except MemoryError:
        raise ModelFileError(f"'{path}' holds more than this machine can load") from None
    except Exception as exc:
        if not storage.is_url(path):
            raise
        detail = " ".join((str(exc) or type(exc).__name__).split())[:300]
        raise ModelFileError(f"cannot read model file '{path}': {detail}") from None


def _open_regular(path: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (O_NONBLOCK: a FIFO must not
    block the open); ModelFileError otherwise. A URL: fsspec's file object for it."""
    if storage.is_url(path):
        try:
            fs, inner = storage.filesystem(path)
        except DataError as exc:
            raise ModelFileError(str(exc)) from None
        if fs.isdir(inner):
            raise IsADirectoryError(path)
        return fs.open(inner, "rb")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise ModelFileError(f"'{path}' is not a regular file, so not a model file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _meta(path: str, header: tuple[tuple[int, ...], np.dtype], archive: Any) -> dict[str, Any]:
    shape, dtype = header
    if dtype != np.uint8 or len(shape) != 1:
        raise ModelFileError(f"'{path}' has a {META_KEY} block that is not JSON text")
    if shape[0] > MAX_META_BYTES:
        raise ModelFileError(f"'{path}' has a {META_KEY} block of {shape[0]} bytes; psctl reads at most {MAX_META_BYTES}")
    try:
        meta = json.loads(archive[META_KEY].tobytes().decode())
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelFileError(f"'{path}' has a {META_KEY} block that is not JSON text") from None
    except RecursionError:
        raise ModelFileError(f"'{path}' has a {META_KEY} block nested too deeply to be a psctl model's") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not a psctl model (wrong {META_KEY} format marker)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"'{path}' is a psctl model of format version {meta.get('format_version')}; this psctl reads {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("kind"), str):
        raise ModelFileError(f"'{path}' does not say what kind of model it holds")
    return meta


def _check_members(fh: IO[bytes], path: str) -> Headers:
    """Before numpy allocates anything: every member is an .npy whose header's shape
    fits the bytes the member really holds (numpy would allocate the declared shape
    first), with no objects, and the whole fits in memory.

    The archive's own sizes are trustworthy here: zipfile never inflates a member
    past its declared size and checks its CRC.
    """
    headers: Headers = {}
    with zipfile.ZipFile(fh) as archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise ModelFileError(f"'{path}' has {len(members)} members; a psctl model has at most {MAX_MEMBERS}")
        total = sum(m.file_size for m in members)
        if total > _memory_bytes() // 2:
            raise ModelFileError(f"'{path}' would take {total / 2**30:.1f} GiB to load, more than half this machine's memory")
        for member in members:
            with archive.open(member) as npy:
                try:
                    version = npy_format.read_magic(npy)
                    read_header = _NPY_HEADERS.get(version)
                    if read_header is None:
                        raise ValueError(f"unsupported .npy version {version}")
                    shape, _, dtype = read_header(npy)
                except ValueError as exc:
                    raise ModelFileError(f"'{path}' has a member '{member.filename}' that is not a numpy array ({exc})") from None
                if dtype.hasobject:
                    raise ModelFileError(f"'{path}' holds object arrays, which psctl never loads")
                declared = math.prod(shape) * dtype.itemsize
                if npy.tell() + declared != member.file_size:
                    raise ModelFileError(
                        f"'{path}' is damaged or forged: member '{member.filename}' declares {declared} bytes "
                        f"of data but holds {member.file_size - npy.tell()}"
                    )
                headers[member.filename.removesuffix(".npy")] = (tuple(shape), dtype)
    return headers


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: do not guess low
        return 1 << 62
