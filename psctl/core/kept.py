"""Kept models: a trained job's tables left on the shards under a name (pure).

A kept model is named, read-only and versioned: its version is the id of the job that
trained it, so ``--keep NAME --replace`` puts the new tables next to the old ones and the
coordinator's registry switches the name to the new version in one step (then the old
version is freed). Nothing pushes to a kept model; it is read with ``MODEL_PULL``.

Its life, as the coordinator's registry sees it (``KeptState``, one transition table):

- ``KEPT``: every shard slot holds its part; prediction may read it.
- ``RESTORING``: a shard holding a part was lost and the model has a checkpoint folder:
  the next shard that registers loads that part from its file.
- ``LOST``: a part is gone for good (no checkpoint folder, or its file could not be
  loaded); the model stays listed, with the reason, until it is dropped.
"""

from __future__ import annotations

import enum
import re

#: A model's name: what a file stem or a URL path segment can carry unquoted.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeptState(enum.StrEnum):
    KEPT = "kept"
    RESTORING = "restoring"
    LOST = "lost"


KEPT_TRANSITIONS: dict[KeptState, frozenset[KeptState]] = {
    KeptState.KEPT: frozenset({KeptState.RESTORING, KeptState.LOST}),
    KeptState.RESTORING: frozenset({KeptState.KEPT, KeptState.LOST}),
    KeptState.LOST: frozenset(),
}


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a kept model (one sentence), or None."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return (
            f"a kept model's name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {name!r:.80}"
        )
    return None
