"""Vocabularies: the distinct values of an id column mapped to dense rows (pure).

Workers send the distinct ids of their partition in the statistics pass; the
coordinator unions them per name and sends the sorted union back; the driver
and every worker build the same :class:`Vocab` from it, so an id means the
same table row everywhere. Ids travel as UTF-8 text, one per line, in a
uint8 array (ids come from CSV cells, so they hold no newline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl.core.sparse import distinct
from psctl.errors import PsctlError

#: Most distinct values one vocabulary may hold (each is a table row on the shards).
MAX_VOCAB_SIZE = 5_000_000

KINDS = ("int", "str")


class VocabError(PsctlError):
    """A vocabulary is too large or its encoding is damaged."""


def encode_values(values: Iterable[str]) -> np.ndarray:
    """Values as newline-separated UTF-8 text in a uint8 array (empty for no values)."""
    return np.frombuffer("\n".join(values).encode(), dtype=np.uint8)


def decode_values(blob: np.ndarray) -> np.ndarray:
    """The values of :func:`encode_values` as a str array. Raises VocabError."""
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise VocabError("a vocabulary must travel as a 1-d uint8 array")
    if not len(blob):
        return np.array([], dtype=str)
    try:
        text = blob.tobytes().decode()
    except UnicodeDecodeError:
        raise VocabError("a vocabulary is not UTF-8 text") from None
    return np.array(text.split("\n"), dtype=str)


def check_size(name: str, n: int) -> None:
    if n > MAX_VOCAB_SIZE:
        raise VocabError(f"there are more than {MAX_VOCAB_SIZE:,} distinct '{name}' ids; psctl keeps at most that many")


def union(parts: Iterable[np.ndarray], name: str) -> np.ndarray:
    """Sorted distinct values of every part (str arrays). Raises VocabError past the limit."""
    arrays = [p for p in parts if len(p)]
    values = distinct(np.concatenate(arrays)) if arrays else np.array([], dtype=str)
    check_size(name, len(values))
    return values


@dataclass(frozen=True)
class Vocab:
    """Sorted unique ids; an id's row is its position. Integer ids (every value parses
    as a 64-bit integer) sort numerically and match "7" with "007"; others sort as text."""

    ids: np.ndarray  # int64, or a numpy str array

    @classmethod
    def from_strings(cls, values: Iterable[str] | np.ndarray) -> Vocab:
        text = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=str)
        try:
            return cls(distinct(text.astype(np.int64)))
        except (ValueError, OverflowError):
            return cls(distinct(text))

    @property
    def kind(self) -> str:
        return "int" if self.ids.dtype.kind == "i" else "str"

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, cells: np.ndarray) -> np.ndarray:
        """The row of each id (given as text), -1 where the id is unknown."""
        cells = np.asarray(cells, dtype=str)
        if self.kind == "int":
            query, valid = _parse_ints(cells)
        else:
            query, valid = cells, np.ones(len(cells), dtype=bool)
        out = np.full(len(cells), -1, dtype=np.int64)
        if not len(self.ids) or not len(cells):
            return out
        pos = np.searchsorted(self.ids, query)
        inside = pos < len(self.ids)
        hit = valid & inside
        hit[hit] = self.ids[pos[hit]] == query[hit]
        out[hit] = pos[hit]
        return out

    def labels(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows`` as text."""
        return [str(v) for v in self.ids[rows].tolist()]

    # -- in a model file: int64 ids, or the text blob -------------------------
    def to_array(self) -> np.ndarray:
        return self.ids if self.kind == "int" else encode_values(self.ids.tolist())

    @classmethod
    def from_array(cls, array: np.ndarray, kind: str) -> Vocab:
        if kind == "int":
            if array.dtype.kind not in "iu" or array.ndim != 1:
                raise VocabError("an integer vocabulary must be a 1-d integer array")
            return cls(array.astype(np.int64))
        if kind == "str":
            return cls(decode_values(array))
        raise VocabError(f"unknown vocabulary kind {kind!r}")


def _parse_ints(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells as int64 plus which of them are integers at all (others can never match)."""
    try:
        return cells.astype(np.int64), np.ones(len(cells), dtype=bool)
    except (ValueError, OverflowError):
        pass
    out = np.zeros(len(cells), dtype=np.int64)
    valid = np.zeros(len(cells), dtype=bool)
    for k, text in enumerate(cells.tolist()):
        try:
            out[k] = int(text)
            valid[k] = True
        except (ValueError, OverflowError):
            pass
    return out, valid


# -- in messages: body["vocab"] names the arrays, in order ------------------------
def to_message(vocab: Mapping[str, Iterable[str]]) -> tuple[list[str], list[np.ndarray]]:
    """(names, arrays) for a STATS body's ``vocab`` field and the message's arrays."""
    return list(vocab), [encode_values(v) for v in vocab.values()]


def from_message(body: dict[str, Any], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The distinct values per name of a message built by :func:`to_message`. Raises VocabError."""
    names = body.get("vocab", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise VocabError("'vocab' must be a list of distinct names")
    if len(names) != len(arrays):
        raise VocabError(f"'vocab' names {len(names)} vocabularies but the message carries {len(arrays)} arrays")
    return {name: decode_values(a) for name, a in zip(names, arrays)}


def attach(body: dict[str, Any], arrays: list[np.ndarray]) -> dict[str, Any]:
    """A STATS reply or event body with ``vocab`` as {name: Vocab} (unchanged without one)."""
    if "vocab" not in body:
        return body
    return {**body, "vocab": {name: Vocab.from_strings(v) for name, v in from_message(body, arrays).items()}}
