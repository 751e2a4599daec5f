"""The Python API: your own training loop on a psctl server, in the spirit of ps-lite's KVWorker.

A :class:`Job` (the driver side) declares the tables and the consistency mode;
each :class:`KVWorker` joins it and runs its own loop::

    async with await Job.submit(address, [TableSpec("w", 100)], workers=2, mode="ssp", staleness=1) as job:
        ...                                  # workers run elsewhere (or as tasks here)
        params = await job.wait()            # every worker closed: the final tables

    async with await KVWorker.join(address) as kv:
        for step in range(100):
            w = await kv.pull("w")           # waits at the clock gate of the job's mode
            kv.push("w", gradient(w))        # buffered for this clock
            await kv.clock()                 # one push per shard, tagged with the clock; clock + 1

Models for ``psctl train`` are classes (see :class:`psctl.models.Model`); this
API is for loops that do not fit that shape.

A model kept on a server (``psctl train --keep NAME``) is predicted from with
:class:`ServerModel`, reading the live parameters from the shards::

    async with await ServerModel.load(address, "bc") as model:
        p = await model.predict(X)           # X: rows in the model's column order, or a pandas DataFrame
        labels = await model.predict_labels(X)
"""

from __future__ import annotations

import asyncio
import os
import socket
from types import TracebackType
from typing import Any

import numpy as np

from psctl import net
from psctl.cluster.client import Acks, ShardClient
from psctl.cluster.launch import LocalCluster
from psctl.cluster.session import Session
from psctl.core.consistency import staleness_for
from psctl.core.job import DEFAULT_FAILURE_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S, JobSpec
from psctl.core.tables import TableSpec
from psctl.errors import JobError, PsctlError
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES, MsgType

__all__ = ["Job", "KVWorker", "LocalServer", "ServerModel", "TableSpec"]

SUBMIT_TIMEOUT_S = 60.0


class Job:
    """The driver of a job whose workers run their own loops."""

    def __init__(self, session: Session, job_id: str, tables: list[TableSpec], max_frame_bytes: int, security: net.Security):
        self._security = security
        self._session, self.job_id = session, job_id
        self.tables = tables
        self._max_frame_bytes = max_frame_bytes
        self._placed: dict[str, Any] | None = None
        self._placing = asyncio.ensure_future(self._place())

    @classmethod
    async def submit(
        cls,
        address: str,
        tables: list[TableSpec],
        workers: int,
        *,
        mode: str = "async",
        staleness: int = 0,
        lr: float = 0.1,
        lr_decay: float = 0.0,
        seed: int = 0,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        failure_timeout_s: float = DEFAULT_FAILURE_TIMEOUT_S,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        security: net.Security = net.LOCAL,
    ) -> Job:
        """Open a job for ``workers`` KVWorkers on the server at ``address``. A worker whose
        heartbeats (every ``heartbeat_interval_s``) stop for ``failure_timeout_s`` is lost."""
        try:
            staleness_for(mode, staleness)
        except ValueError as exc:
            raise PsctlError(str(exc)) from None
        session = await Session.open(address, max_frame_bytes=max_frame_bytes, security=security, what="psctl server")
        spec = {
            "model": "api",
            "n_workers": workers,
            "mode": mode,
            "staleness": staleness,
            "seed": seed,
            "heartbeat_interval_s": heartbeat_interval_s,
            "failure_timeout_s": failure_timeout_s,
            "optimizer": {"name": "sgd", "params": {"lr": lr, "lr_decay": lr_decay}},
            "partitions": [{} for _ in range(workers)],
        }
        try:
            reply = await session.submit(spec, timeout_s=SUBMIT_TIMEOUT_S)
        except BaseException:
            session.close()
            raise
        return cls(session, reply["job_id"], tables, max_frame_bytes, security)

    async def _until(self, kind: str) -> dict[str, Any]:
        """The next event of ``kind``; JobError if the job fails or the server goes away first.
        Unbounded here: :meth:`wait` bounds it with the caller's timeout."""
        while True:
            event = await self._session.next_event(timeout_s=None)
            if event["kind"] == "failed":
                raise JobError(f"job failed: {event['reason']}")
            if event["kind"] == kind:
                return event

    async def _place(self) -> None:
        """Once every worker has joined (the statistics barrier), create the tables on the shards."""
        await self._until("stats")
        body = {"tables": [t.to_dict() for t in self.tables]}
        self._placed = (await self._session.request(MsgType.TABLES, body, timeout_s=SUBMIT_TIMEOUT_S)).body

    async def wait(self, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Wait until every worker has closed; return the final tables."""

        async def done() -> None:
            await self._placing
            await self._until("done")

        async with asyncio.timeout(timeout_s):
            await done()
        assert self._placed is not None
        client = await ShardClient.connect(
            self._placed["shards"], self._placed["ranges"], self.job_id, {"role": "driver"},
            max_frame_bytes=self._max_frame_bytes, security=self._security,
        )
        try:
            return await client.pull([t.name for t in self.tables])
        finally:
            client.close()

    async def close(self) -> None:
        """End the job on the server (its tables are dropped) and disconnect."""
        self._placing.cancel()
        if self._session.is_open:
            self._session.notify(MsgType.JOB_END, {"job_id": self.job_id})
        self._session.close()

    async def __aenter__(self) -> Job:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class KVWorker:
    """One worker of a :class:`Job`: pull, push, clock."""

    def __init__(self, session: Session, client: ShardClient, worker_id: int, rows: dict[str, int]):
        self._session, self._client = session, client
        self.worker_id = worker_id
        self._rows = rows
        self._clock = 0
        self._pending: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
        self._acks: Acks | None = None  # the last clock's push, acked or not
        self._closed = False

    @classmethod
    async def join(
        cls, address: str, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, security: net.Security = net.LOCAL
    ) -> KVWorker:
        """Join the next job of the server at ``address`` that has a free worker slot.

        Returns once every worker of the job has joined (the tables are created then).
        From then on it heartbeats from a thread of its own, so however long the caller
        computes between two calls, the coordinator does not take it for lost.
        """
        session = await Session.open(address, max_frame_bytes=max_frame_bytes, security=security, what="psctl server")
        try:
            # No bound on either wait: a worker may join before the job is submitted, and
            # the statistics barrier waits for the last worker to join.
            reg = await session.register_worker({"pid": os.getpid(), "host": socket.gethostname()}, timeout_s=None)
            placed = (await session.request(MsgType.STATS, {"stats": None, "labels": []}, timeout_s=None)).body
            client = await ShardClient.connect(
                placed["shards"], placed["ranges"], reg["job_id"],
                {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
                max_frame_bytes=max_frame_bytes, security=security,
                # A stuck shard is declared lost within the job's failure timeout (then the job
                # recovers or aborts): the same bound as a worker's.
                answer_timeout_s=JobSpec.from_wire(reg["spec"]).failure_timeout_s,
            )
        except BaseException:
            session.close()
            raise
        rows = {name: ranges[-1][1] for name, ranges in placed["ranges"].items()}
        return cls(session, client, int(reg["worker_id"]), rows)

    @property
    def clock_value(self) -> int:
        """Completed clocks (pushes sent)."""
        return self._clock

    async def pull(self, table: str, keys: np.ndarray | None = None) -> np.ndarray:
        """A whole table, or the rows ``keys`` (sorted, unique), as the job's mode allows at this clock."""
        self._check(table)
        # The pull goes out behind this worker's last push on each connection, so it sees it;
        # the push's acks are collected after (its quiet acks come with the pull's replies).
        keys = None if keys is None else np.asarray(keys, dtype=np.int64)
        acks, self._acks = self._acks, None  # a failed push raises once, here
        got = await self._client.pull({table: keys}, self._clock, after=acks)
        if acks is not None:
            await acks
        return got[table]

    def push(self, table: str, values: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Buffer a gradient for this clock: a whole table's, or the rows ``keys`` (sorted, unique)."""
        self._check(table)
        if table in self._pending:
            raise PsctlError(f"table {table!r} was already pushed in clock {self._clock}")
        self._pending[table] = (None if keys is None else np.asarray(keys, dtype=np.int64), np.asarray(values))

    async def clock(self, count: int = 1, sums: bool = False) -> int:
        """Send this clock's pushes and advance the clock.

        ``count``: the samples behind them. The pushes are batch means by default: in sync mode
        the shards apply the ``count``-weighted mean of every worker's. ``sums=True``: they are
        per-key sums over the batch (the gradient of its summed loss), and in sync mode the
        shards add every worker's sums for a key, which is what one process would push for the
        union of the batches. In a sync job all workers of a clock push the same kind."""
        await self._settle()  # clocks without a pull between them: the last push's acks first
        keys = {n: k for n, (k, _) in self._pending.items()}
        grads = {n: g for n, (_, g) in self._pending.items()}
        self._acks = self._client.push(grads, self._clock, count, self._client.plan(keys), sums=sums)
        self._pending = {}
        self._clock += 1
        self._session.clock = self._clock  # for the heartbeat thread
        self._session.samples += count
        return self._clock

    async def close(self) -> None:
        """Leave the job: the gate stops waiting for this worker; the job ends when all have closed."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._settle()
            await self._client.leave()
            # Not waiting for the TRAINED barrier: closing must not depend on the other workers.
            self._session.notify(MsgType.TRAINED, {})
            self._session.notify(MsgType.FINAL_REPORT, {"loss_sum": 0.0, "n": 0, "sums": {}})
        finally:
            self._client.close()
            self._session.close()

    async def _settle(self) -> None:
        """Wait for the last clock's acks (a failed push raises here)."""
        acks, self._acks = self._acks, None
        if acks is not None:
            await acks

    def _check(self, table: str) -> None:
        if self._closed:
            raise PsctlError("this worker has closed")
        if table not in self._rows:
            raise PsctlError(f"unknown table {table!r}; the job has {', '.join(sorted(self._rows))}")

    async def __aenter__(self) -> KVWorker:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class LocalServer:
    """A coordinator (in this process) and shard processes on this host: ``psctl server`` as a context manager."""

    def __init__(
        self, shards: int = 2, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, security: net.Security = net.LOCAL
    ):
        self._cluster = LocalCluster(max_frame_bytes=max_frame_bytes, security=security)
        self._shards = shards
        self.address = ""

    async def __aenter__(self) -> LocalServer:
        self.address = await self._cluster.start_coordinator()
        await self._cluster.start_shards(self._shards, self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cluster.stop()


class ServerModel:
    """A model kept on a psctl server, predicted from with the parameters on its shards.

    A dense model's tables are read once, at :meth:`load` (:meth:`refresh` reads them again);
    an mf model reads, per call, only the rows of the users and items asked for. Rows may be
    a 2-d numpy array in the model's column order (:attr:`columns`) or a pandas DataFrame
    (its columns picked by name); an mf model takes (user, item) id pairs, or a DataFrame with
    its user and item columns. A hashed-CSV model takes the cells as text (a DataFrame, or an
    array of strings; an empty cell or a missing value is absent), hashes them as training did,
    and reads, per call, only the keys those rows touch. A LIBSVM model is predicted from files
    (``psctl predict NAME FILE --server``).
    """

    def __init__(self, kept: Any, params: dict[str, np.ndarray] | None):
        self._kept, self._params = kept, params
        self.name: str = kept.name
        self.meta: dict[str, Any] = kept.meta
        self._vocabs: tuple[Any, Any] | None = None

    @classmethod
    async def load(
        cls, address: str, name: str, *, model_class: str | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        security: net.Security = net.LOCAL,
    ) -> ServerModel:
        from psctl.apps.kept import KeptModel
        from psctl.models.mf import MF

        kept = await KeptModel.open(address, name, model_class_path=model_class, security=security, max_frame_bytes=max_frame_bytes)
        try:
            sparse = any(t.get("sparse") for t in kept.tables.values())
            if sparse and kept.meta.get("input", {}).get("format") != "hashed_csv":
                raise PsctlError(f"model {name!r} reads {kept.meta.get('input', {}).get('format')} input: predict it from a "
                                 f"file with 'psctl predict {name} FILE --server {address}'")  # fmt: skip
            model = cls(kept, None if sparse or isinstance(kept.model, MF) else await kept.dense())
        except BaseException:
            kept.close()
            raise
        return model

    async def refresh(self) -> None:
        """Read a dense model's tables again (a model kept anew under the same name is another version: load it)."""
        if self._params is not None:
            self._params = await self._kept.dense()

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def columns(self) -> list[str]:
        """The columns a row holds, in order: the features, or an mf model's user and item columns."""
        schema = self.meta.get("schema") or {}
        if self.meta.get("data_format") == "ratings":
            return [schema["columns"][i] for i in schema["feature_indices"]]
        return list(self.meta.get("feature_names") or [])

    @property
    def counters(self) -> dict[str, int]:
        """What was read from the shards so far: ``keys_pulled``, ``bytes_pulled``."""
        return self._kept.counters()

    @property
    def hashed(self) -> bool:
        return (self.meta.get("input") or {}).get("format") == "hashed_csv"

    def _rows(self, X: Any) -> np.ndarray:
        columns = self.columns
        if hasattr(X, "columns") and hasattr(X, "to_numpy"):  # a pandas DataFrame (pandas itself is not imported)
            missing = [c for c in columns if c not in set(map(str, X.columns))]
            if missing:
                raise PsctlError(f"the rows lack {len(missing)} column(s) model {self.name!r} needs: {', '.join(map(repr, missing[:5]))}")
            X = X[columns]
            X = X.where(X.notna(), "").astype(str).to_numpy() if self.hashed else X.to_numpy()
        X = np.asarray(X, dtype=str) if self.hashed else np.asarray(X)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != len(columns):
            raise PsctlError(f"model {self.name!r} takes rows of {len(columns)} values ({', '.join(columns[:5])}"
                             f"{' ...' if len(columns) > 5 else ''}); got an array of shape {X.shape}")  # fmt: skip
        return X

    async def predict(self, X: Any) -> np.ndarray:
        """The model's outputs for rows ``X``: P(class 1) (binary), a score per class, values
        (regression), or ratings (mf; NaN for a user or item the model has not seen)."""
        rows = self._rows(X)
        if self.hashed:
            return await self._predict_hashed(rows)
        if self._params is None:
            return await self._predict_mf(rows)
        try:
            values = rows.astype(np.float64)
        except ValueError:
            raise PsctlError(f"model {self.name!r} takes numbers; the rows hold something else") from None
        std = self.meta.get("standardize")
        if std:
            values = (values - np.asarray(std["mean"])) / np.asarray(std["std"])
        return self._kept.model.predict({k: v.astype(np.float64, copy=False) for k, v in self._params.items()}, values)

    async def predict_labels(self, X: Any) -> list[str] | np.ndarray:
        """The predicted class of each row (values for regression and mf)."""
        from psctl.models.base import predicted_index

        outputs = await self.predict(X)
        task = self._kept.model.task
        if task == "regression":
            return outputs
        classes = self._kept.model.classes
        return [classes[i] for i in predicted_index(task, outputs)]

    async def _predict_hashed(self, cells: np.ndarray) -> np.ndarray:
        from psctl.apps.predict import aligned_weights
        from psctl.data import formats

        spec = self.meta["input"]

        def numbers(name: str, column: np.ndarray, rows: np.ndarray) -> np.ndarray:
            try:
                values = column.astype(np.float64)
            except ValueError:
                values = np.full(len(column), np.nan)
            if not np.isfinite(values).all():
                bad = int(np.flatnonzero(~np.isfinite(values))[0])
                raise PsctlError(f"row {int(rows[bad])}, column {name!r}: {column[bad].decode('utf-8', 'replace')[:40]!r} "
                                 "is not a finite number")  # fmt: skip
            return values.astype(np.float32)

        encoded = [(name, np.strings.encode(cells[:, j], "utf-8")) for j, name in enumerate(self.columns)]
        X = formats.hash_cell_columns(len(cells), encoded, spec["categorical"], int(spec["hash_bits"]), numbers)
        params = await self._kept.params_for(X)
        weights, _ = aligned_weights(self._kept.model, params, X)
        return self._kept.model.predict(weights, X)

    async def _predict_mf(self, pairs: np.ndarray) -> np.ndarray:
        from psctl.data import ratings
        from psctl.data.vocab import Vocab

        if self._vocabs is None:
            extras, kinds = await self._kept.extras(), self.meta["vocab"]
            self._vocabs = tuple(Vocab.from_array(extras[f"vocab_{n}"], kinds[n]) for n in (ratings.USER, ratings.ITEM))  # type: ignore[assignment]
        users, items = self._vocabs  # type: ignore[misc]
        rows = ratings.encode_rows(pairs.astype(str), {ratings.USER: users, ratings.ITEM: items})
        known = (rows[:, 0] >= 0) & (rows[:, 1] >= 0)
        out = np.full(len(rows), np.nan)
        if known.any():
            u, u_at = np.unique(rows[known, 0], return_inverse=True)
            i, i_at = np.unique(rows[known, 1], return_inverse=True)
            got = await self._kept.rows({"user_factors": u, "user_bias": u, "item_factors": i, "item_bias": i})
            params = {name: values.astype(np.float64, copy=False) for name, (values, _) in got.items()}
            out[known] = self._kept.model.predict(params, np.stack([u_at.reshape(-1), i_at.reshape(-1)], axis=1))
        return out

    def close(self) -> None:
        self._kept.close()

    async def __aenter__(self) -> ServerModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
