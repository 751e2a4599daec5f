"""Checkpoints on disk: one file per shard per clock, and a manifest naming the
clock every shard has saved (a checkpoint is one clock for all of them).

Files are written atomically (temporary file, fsync, rename) through
modelfile, so they load with allow_pickle=False like any model file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from psctl.errors import PsctlError
from psctl.files import modelfile

KIND = "shard-checkpoint"
MANIFEST = "checkpoint.json"
KEEP = 2  # checkpoints kept per shard; older files are removed


class CheckpointError(PsctlError):
    exit_code = 2


def shard_file(folder: str | Path, shard_index: int, clock: int) -> Path:
    return Path(folder) / f"shard-{shard_index}-clock-{clock}.npz"


def save_shard(folder: str | Path, shard_index: int, clock: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    path = shard_file(folder, shard_index, clock)
    path.parent.mkdir(parents=True, exist_ok=True)
    modelfile.save_model(str(path), arrays, {**meta, "kind": KIND, "clock": clock, "shard_index": shard_index})
    return path


def load_shard(folder: str | Path, shard_index: int, clock: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = shard_file(folder, shard_index, clock)
    try:
        return modelfile.load_model(str(path), expect_kind=KIND)
    except PsctlError as exc:
        raise CheckpointError(f"cannot restore shard {shard_index} from clock {clock}: {exc}") from None


def prune(folder: str | Path, shard_index: int, keep_clock: int) -> None:
    """Remove this shard's files older than the last KEEP checkpoints up to ``keep_clock``."""
    clocks = sorted(
        int(p.stem.rsplit("-", 1)[1]) for p in Path(folder).glob(f"shard-{shard_index}-clock-*.npz") if p.stem.rsplit("-", 1)[1].isdigit()
    )
    older = [c for c in clocks if c <= keep_clock][:-KEEP]
    for clock in older:
        shard_file(folder, shard_index, clock).unlink(missing_ok=True)


def write_manifest(folder: str | Path, body: dict[str, Any]) -> None:
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / MANIFEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"'{folder}' holds no psctl checkpoint ({MANIFEST} is missing)")
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a readable checkpoint manifest: {exc}") from None
    if not isinstance(body, dict) or not {"clock", "spec", "tables", "n_shards"} <= body.keys():
        raise CheckpointError(f"'{path}' is not a psctl checkpoint manifest")
    return body
