"""Why a shard refuses a request: one class per reason, each with its wire ``code``.

Pure code (tables, :class:`~psctl.core.shard_state.ShardState`) raises these;
the shard service lets them travel as ERROR frames (a :class:`~psctl.errors.RequestError`
carries its code), and a worker or a test can tell them apart by class or by code.
"""

from __future__ import annotations

from psctl.errors import RequestError


class ShardError(RequestError):
    """A request this shard's state refuses; the connection stays open."""

    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message, type(self).code)


class BadKeys(ShardError):
    """Keys that are not a sorted, unique 1-d integer array inside the table's range, keys another
    shard owns, or no keys for a table that is only read and written by key (sparse)."""

    code = "bad_keys"


class BadGradient(ShardError):
    """A gradient whose shape does not match its keys (or the shard's range)."""

    code = "bad_gradient"


class NonFiniteGradient(BadGradient):
    """A gradient holding NaN or Inf: applying it would poison the table, so nothing of the push is."""

    code = "non_finite_gradient"


class UnknownTable(ShardError):
    """A table name this job does not have (or a malformed list of names)."""

    code = "unknown_table"


class NotLive(ShardError):
    """A push from a worker that is not in the live set (it left, or was declared lost)."""

    code = "not_live"


class MixedPush(ShardError):
    """In sync mode, a push of per-key sums into a clock that holds batch means, or the other
    way round: the two cannot be combined into one update."""

    code = "mixed_push"


class BadClock(ShardError):
    """A push tagged with another clock than the one the shard expects from that worker."""

    code = "bad_clock"


class TableFull(ShardError):
    """A sparse table that would outgrow what one shard may hold."""

    code = "table_full"
