"""model.npz: parameter arrays plus a ``__meta__`` JSON string. Never pickled."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

from psctl.errors import ModelFileError

FORMAT = "psctl-model"
FORMAT_VERSION = 1
META_KEY = "__meta__"


def save_model(path: str, params: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, fsync, rename."""
    for name in params:
        if name.startswith("__"):
            raise ValueError(f"parameter names may not start with '__': {name!r}")
    meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION}
    arrays = {**params, META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".psctl-model-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_model(path: str, expect_kind: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parameters and meta of a psctl model; ModelFileError with one sentence otherwise."""
    if not os.path.exists(path):
        raise ModelFileError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise ModelFileError(f"'{path}' is a folder, not a model file")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"'{path}' is not a psctl model file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if META_KEY not in archive.files:
                raise ModelFileError(f"'{path}' is a numpy archive but not a psctl model (no {META_KEY})")
            arrays = {name: archive[name] for name in archive.files}
    except ModelFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise ModelFileError(f"'{path}' holds object arrays, which psctl never loads") from None
        raise ModelFileError(f"'{path}' is damaged: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelFileError(f"'{path}' is damaged or truncated ({type(exc).__name__})") from None
    raw = arrays.pop(META_KEY)
    try:
        if raw.dtype != np.uint8:
            raise ValueError
        meta = json.loads(raw.tobytes().decode())
    except (ValueError, UnicodeDecodeError):
        raise ModelFileError(f"'{path}' has a {META_KEY} block that is not JSON text") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not a psctl model (wrong {META_KEY} format marker)")
    if not isinstance(meta.get("kind"), str):
        raise ModelFileError(f"'{path}' does not say what kind of model it holds")
    if expect_kind is not None and meta["kind"] != expect_kind:
        raise ModelFileError(f"'{path}' is a {meta['kind']} model, not {expect_kind}")
    for name, arr in arrays.items():
        if arr.dtype.kind not in "fiu":
            raise ModelFileError(f"'{path}' has a parameter '{name}' of type {arr.dtype}, not numbers")
    return arrays, meta
