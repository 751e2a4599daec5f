"""Checkpoints on disk: one file per shard per clock, and a manifest naming the
clock every shard has saved (a checkpoint is one clock for all of them).

A checkpoint folder is self-contained and relocatable: the manifest names the shard
files by clock and index only, never by path, so a copied or moved folder resumes
from where it is now. Besides ``checkpoint.json`` (the newest checkpoint) the folder
keeps the manifest of the checkpoint before it (``checkpoint-clock-C.json``), and the
shards keep that checkpoint's files, so a damaged newest checkpoint leaves an older
one to resume.

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


class CheckpointError(PsctlError):
    exit_code = 2


def shard_file(folder: str | Path, shard_index: int, clock: int) -> Path:
    return Path(folder) / f"shard-{shard_index}-clock-{clock}.npz"


def manifest_file(folder: str | Path, clock: int) -> Path:
    """The manifest of the checkpoint at ``clock`` (kept while it is the newest or the one before)."""
    return Path(folder) / f"checkpoint-clock-{clock}.json"


def save_shard(folder: str | Path, shard_index: int, clock: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    path = shard_file(folder, shard_index, clock)
    path.parent.mkdir(parents=True, exist_ok=True)
    modelfile.save_model(str(path), arrays, {**meta, "kind": KIND, "clock": clock, "shard_index": shard_index})
    return path


def load_shard(
    folder: str | Path, shard_index: int, clock: int, job_id: str | None = None, *, meta_only: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One shard's file of the checkpoint at ``clock``; refused unless its meta says it is
    that shard's file of that clock (and of job ``job_id``, when given).
    ``meta_only`` reads no arrays (a check before a resume)."""
    path = shard_file(folder, shard_index, clock)
    try:
        arrays, meta = modelfile.load_model(str(path), expect_kind=KIND, select=(lambda m, h: set()) if meta_only else None)
    except PsctlError as exc:
        raise CheckpointError(f"cannot restore shard {shard_index} from clock {clock}: {exc}") from None
    found = (meta.get("shard_index"), meta.get("clock"), meta.get("job_id"))
    if found[:2] != (shard_index, clock) or job_id is not None and found[2] != job_id:
        raise CheckpointError(
            f"cannot restore shard {shard_index} from clock {clock}: '{path}' is shard {found[0]!r}'s file of clock"
            f" {found[1]!r} of job {found[2]!r}, not this checkpoint's" + (f" (job {job_id!r})" if job_id is not None else "")
        )
    return arrays, meta


def file_clocks(folder: str | Path, shard_index: int) -> list[int]:
    """The clocks of this shard's files in ``folder``, oldest first."""
    stems = (p.stem.rsplit("-", 1)[1] for p in Path(folder).glob(f"shard-{shard_index}-clock-*.npz"))
    return sorted(int(s) for s in stems if s.isdigit())


def prune(folder: str | Path, shard_index: int, committed: int, previous: int | None) -> list[int]:
    """Remove this shard's files that no manifest names and no future manifest can name:
    those older than the committed clock ``committed``, except the checkpoint before it
    (``previous``). Files newer than ``committed`` stay: a manifest may still name them.
    Returns the clocks removed."""
    removed = [c for c in file_clocks(folder, shard_index) if c < committed and c != previous]
    for clock in removed:
        shard_file(folder, shard_index, clock).unlink(missing_ok=True)
    return removed


def _write_json(path: Path, body: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_manifest(folder: str | Path, body: dict[str, Any]) -> None:
    """Make ``body`` the folder's checkpoint: its own per-clock manifest first, then
    ``checkpoint.json``; per-clock manifests other than this one and ``previous_clock``'s go."""
    folder = Path(folder)
    clock, previous = body.get("clock"), body.get("previous_clock")
    if isinstance(clock, int):
        _write_json(manifest_file(folder, clock), body)
    _write_json(folder / MANIFEST, body)
    for path in folder.glob("checkpoint-clock-*.json"):
        stem = path.stem.rsplit("-", 1)[1]
        if stem.isdigit() and int(stem) not in (clock, previous):
            path.unlink(missing_ok=True)


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of ``folder`` (a checkpoint folder, or one of its per-clock manifests), checked."""
    given = Path(folder)
    path = given if given.suffix == ".json" and not given.is_dir() else given / MANIFEST
    if not path.exists():
        raise CheckpointError(f"'{folder}' holds no psctl checkpoint ({path.name} is missing)")
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"'{path}' is not a readable checkpoint manifest: {exc}") from None
    if not isinstance(body, dict) or not {"clock", "spec", "tables", "n_shards"} <= body.keys():
        raise CheckpointError(f"'{path}' is not a psctl checkpoint manifest")
    bad = [
        name for name, ok in (
            ("clock", _is_count(body["clock"])),
            ("n_shards", _is_count(body["n_shards"], 1)),
            ("spec", isinstance(body["spec"], dict)),
            ("tables", isinstance(body["tables"], list) and all(isinstance(t, dict) for t in body["tables"])),
            ("job_id", isinstance(body.get("job_id", ""), str)),
            ("previous_clock", body.get("previous_clock") is None or _is_count(body["previous_clock"])),
        ) if not ok
    ]  # fmt: skip
    if bad:
        raise CheckpointError(f"'{path}' is a damaged checkpoint manifest: bad {', '.join(repr(b) for b in bad)}")
    return body


def folder_of(resume: str | Path) -> Path:
    """The checkpoint folder ``--resume`` names (a folder, or a manifest file in one)."""
    given = Path(resume)
    return given.parent if given.suffix == ".json" and not given.is_dir() else given


def check_files(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Every shard file the manifest names is there and readable; else CheckpointError naming
    the first bad one and, when its files are still complete, the checkpoint before it."""
    clock, n_shards = int(manifest["clock"]), int(manifest["n_shards"])
    try:
        for index in range(n_shards):
            load_shard(folder, index, clock, manifest.get("job_id"), meta_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{_older_offer(folder, manifest)}") from None


def _older_offer(folder: str | Path, manifest: dict[str, Any]) -> str:
    previous = manifest.get("previous_clock")
    path = manifest_file(folder, previous) if isinstance(previous, int) else None
    if path is None or not path.is_file():
        return ""
    try:
        older = read_manifest(path)
        for index in range(int(older["n_shards"])):
            load_shard(folder, index, int(older["clock"]), older.get("job_id"), meta_only=True)
    except (CheckpointError, ValueError, TypeError):
        return ""
    return f"; the checkpoint before it, at clock {previous}, is complete: --resume {path} continues from it"


# -- kept models (psctl train --keep with a checkpoint folder) -------------------------
KEPT_KIND = "kept-model-part"


def kept_file(folder: str | Path, name: str, version: str, shard_index: int) -> Path:
    """One shard's part of a kept model: ``kept/NAME-VERSION-shard-I.npz`` in the job's checkpoint folder."""
    return Path(folder) / "kept" / f"{name}-{version}-shard-{shard_index}.npz"


def save_kept(folder: str | Path, name: str, version: str, shard_index: int, arrays: dict[str, np.ndarray]) -> Path:
    path = kept_file(folder, name, version, shard_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    modelfile.save_model(str(path), arrays, {"kind": KEPT_KIND, "name": name, "version": version, "shard_index": shard_index})
    return path


def load_kept(folder: str | Path, name: str, version: str, shard_index: int) -> dict[str, np.ndarray]:
    """The arrays :func:`save_kept` wrote; refused unless the file says it is that part."""
    path = kept_file(folder, name, version, shard_index)
    try:
        arrays, meta = modelfile.load_model(str(path), expect_kind=KEPT_KIND)
    except PsctlError as exc:
        raise CheckpointError(f"cannot load shard {shard_index}'s part of kept model {name!r}: {exc}") from None
    if (meta.get("name"), meta.get("version"), meta.get("shard_index")) != (name, version, shard_index):
        raise CheckpointError(f"'{path}' is not shard {shard_index}'s part of kept model {name!r} (version {version})")
    return arrays


def remove_kept(folder: str | Path, name: str, version: str, shard_index: int) -> None:
    kept_file(folder, name, version, shard_index).unlink(missing_ok=True)
