"""Kept models (``psctl train --keep NAME``): listing and dropping them, and predicting with
the parameters that live on the shards.

:class:`KeptModel` is a parameter source: it asks the coordinator where a model's parts are
(``MODELS``) and reads them from the shards with ``MODEL_PULL``. A dense model is read once,
whole; a sparse (hashed, LIBSVM) or mf model is read per batch, only the keys its rows touch,
so a 2^32-key model is never copied. What it read is counted (``keys_pulled``, ``bytes_pulled``)
here and on the shards (``psctl models``). The evaluation itself is apps/predict.py's, on the
same arrays a model file would give, so the numbers equal those of the model file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from psctl import net
from psctl.apps import predict as predicting
from psctl.apps import serving
from psctl.core.keyplan import KeyPlan, Routing
from psctl.core.sparse import distinct
from psctl.data import csvfile, ratings
from psctl.data.vocab import Vocab, VocabError
from psctl.errors import ModelFileError, PsctlError, UsageError
from psctl.files import loading
from psctl.models.mf import MF
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES, MsgType

log = logging.getLogger("psctl.serve")

MODELS_TIMEOUT_S = 10.0  # the coordinator asks every shard for its figures (2 s at most) before it answers
DROP_TIMEOUT_S = 60.0  # the shards free the parts and remove their files first
PULL_TIMEOUT_S = 60.0  # one MODEL_PULL of at most MAX_PULL_KEYS keys per table
MAX_PULL_KEYS = 1 << 20  # keys per table and request (a shard refuses more than --max-keys-per-request)


class KeptModelError(PsctlError):
    exit_code = 2


async def _coordinator(server: str, kind: MsgType, body: dict[str, Any], timeout_s: float, security: net.Security) -> dict[str, Any]:
    """One request to the coordinator at ``server``; a refusal or a process that is not one is one sentence."""
    peer = await net.connect(server, what="psctl server", security=security)
    try:
        reply = await peer.request(kind, body, timeout_s=timeout_s)
    except net.RemoteError as exc:
        if exc.code == "unexpected":  # a shard, or a psctl from before kept models
            raise KeptModelError(f"{server} is a psctl process but not a coordinator that keeps models: {exc}") from None
        raise KeptModelError(str(exc)) from None
    finally:
        peer.close()
    return reply.body


async def list_models(server: str, name: str | None = None, security: net.Security = net.LOCAL) -> list[dict[str, Any]]:
    """The kept models of ``server`` (``name``: that one; KeptModelError if it is not kept there)."""
    body = await _coordinator(server, MsgType.MODELS, {} if name is None else {"name": name}, MODELS_TIMEOUT_S, security)
    models = body.get("models")
    if not isinstance(models, list):
        raise KeptModelError(f"{server} answered MODELS without a list of models")
    return models


async def drop_model(server: str, name: str, security: net.Security = net.LOCAL) -> dict[str, Any]:
    """Forget the kept model ``name`` and free its memory on the shards."""
    return await _coordinator(server, MsgType.MODEL_DROP, {"name": name}, DROP_TIMEOUT_S, security)


class KeptModel:
    """A kept model read from its shards: its meta and model object, and its parameters on demand."""

    def __init__(self, server: str, entry: dict[str, Any], model: Any, peers: list[net.Peer]):
        self.server, self.entry, self.model, self.peers = server, entry, model, peers
        self.name, self.version, self.meta = entry["name"], entry["version"], entry["meta"]
        self.tables = {t["name"]: t for t in entry["tables"]}
        self.routing = Routing.of(entry["ranges"], [n for n, t in self.tables.items() if t.get("sparse")])
        self.addresses = [s["address"] for s in entry["shards"]]
        self.keys_pulled = 0
        self.bytes_pulled = 0  # value bytes received

    @classmethod
    async def open(
        cls, server: str, name: str, *, model_class_path: str | None = None, security: net.Security = net.LOCAL,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> KeptModel:
        (entry,) = await list_models(server, name, security)
        if entry["state"] != "kept":
            raise KeptModelError(f"model {name!r} on {server} cannot be read now ({entry['state']}): {entry.get('reason')}")
        what = f"kept model {name}"
        try:
            model, tables = loading.model_from_meta(what, model_class_path, entry["meta"])
        except ModelFileError as exc:
            raise KeptModelError(str(exc)) from None
        expected = {t.name: (t.rows, t.dim, t.sparse) for t in tables}
        kept = {t["name"]: (t["rows"], t["dim"], bool(t.get("sparse"))) for t in entry["tables"]}
        if expected != kept:
            raise KeptModelError(f"{what} holds tables {kept}, but its meta describes {expected}")
        peers = await asyncio.gather(
            *(net.connect(s["address"], max_frame_bytes=max_frame_bytes, what=f"psctl shard {i}", security=security)
              for i, s in enumerate(entry["shards"]))  # fmt: skip
        )
        return cls(server, entry, model, list(peers))

    def close(self) -> None:
        for peer in self.peers:
            peer.close()

    async def __aenter__(self) -> KeptModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- reading the parts ------------------------------------------------------------
    async def _pull(self, shard: int, body: dict[str, Any], arrays: list[np.ndarray]) -> list[np.ndarray]:
        try:
            reply = await self.peers[shard].request(
                MsgType.MODEL_PULL, {"model": self.name, "version": self.version, **body}, arrays, timeout_s=PULL_TIMEOUT_S
            )
        except net.RemoteError as exc:
            raise KeptModelError(f"reading model {self.name!r} from shard {shard} at {self.addresses[shard]} failed: {exc}") from None
        self.bytes_pulled += sum(a.nbytes for a in reply.arrays)
        return reply.arrays

    async def dense(self) -> dict[str, np.ndarray]:
        """Every table whole, as the model file holds it (dense models only)."""
        names = list(self.tables)
        if any(self.tables[n].get("sparse") for n in names):
            raise KeptModelError(f"model {self.name!r} has sparse tables: read them by key")
        plan = KeyPlan(self.routing, dict.fromkeys(names))
        parts = await asyncio.gather(*(self._pull(i, {"tables": names}, []) for i in plan.pull_shards))
        self.keys_pulled += sum(plan.sizes.values())
        return plan.scatter(dict(zip(plan.pull_shards, parts)))

    async def rows(self, keys: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per table, the values of ``keys`` (sorted, unique) and which of them are stored
        (a sparse table stores only the keys training touched)."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, k in keys.items():
            values, found = [], []
            for lo in range(0, max(len(k), 1), MAX_PULL_KEYS):
                chunk = k[lo : lo + MAX_PULL_KEYS]
                plan = KeyPlan(self.routing, {name: chunk})
                parts = await asyncio.gather(*(self._pull(i, {"tables": [name], "keyed": True}, plan.pull_arrays(i)) for i in plan.pull_shards))
                self.keys_pulled += len(chunk)
                got = dict(zip(plan.pull_shards, parts))
                values.append(plan.scatter({i: a[0::2] for i, a in got.items()})[name])
                found.append(plan.scatter({i: a[1::2] for i, a in got.items()})[name].astype(bool))
            out[name] = (np.concatenate(values), np.concatenate(found))
        return out

    async def extras(self) -> dict[str, np.ndarray]:
        """The model's other arrays (the id vocabularies of an mf model), from part 0."""
        return dict(zip(*await self._extras()))

    async def _extras(self) -> tuple[list[str], list[np.ndarray]]:
        reply = await self.peers[0].request(
            MsgType.MODEL_PULL, {"model": self.name, "version": self.version, "extras": True}, timeout_s=PULL_TIMEOUT_S
        )
        return list(reply.body["extras"]), list(reply.arrays)

    # -- the arrays a model file would hold, for the rows at hand -------------------------
    async def params_for(self, X: Any) -> dict[str, np.ndarray]:
        """A sparse model's stored rows for the keys ``X`` touches, as ``name`` and ``name.keys``:
        the part of the model file's arrays predict.aligned_weights reads for these rows."""
        wanted = {name: np.asarray(k, np.int64) for name, k in self.model.keys(X).items() if k is not None}
        params = {}
        for name, (values, found) in (await self.rows(wanted)).items():
            params[name], params[f"{name}.keys"] = values[found], wanted[name][found]
        return params

    async def mf_vocabs(self) -> loading.MFModel:
        """The mf model's id vocabularies and schema, without its tables (read by :meth:`mf_for`)."""
        meta = self.meta
        extras = await self.extras()
        try:
            kinds = meta["vocab"]
            users = Vocab.from_array(extras[f"vocab_{ratings.USER}"], kinds[ratings.USER])
            items = Vocab.from_array(extras[f"vocab_{ratings.ITEM}"], kinds[ratings.ITEM])
            schema = csvfile.CsvSchema.from_dict(meta["schema"])
        except (KeyError, TypeError, ValueError, VocabError) as exc:
            raise KeptModelError(f"kept model {self.name!r} is an mf model without its id vocabularies ({exc})") from None
        return loading.MFModel(self.model, {}, meta, users, items, schema)

    async def mf_for(self, full: loading.MFModel, ids: np.ndarray) -> loading.MFModel:
        """The mf model restricted to the (user, item) id rows ``ids``: its vocabularies hold
        only those ids (in the full vocabularies' order) and its tables only their rows."""
        rows = ratings.encode_rows(ids, {ratings.USER: full.users, ratings.ITEM: full.items})
        u = distinct(rows[:, 0][rows[:, 0] >= 0])
        i = distinct(rows[:, 1][rows[:, 1] >= 0])
        got = await self.rows({"user_factors": u, "user_bias": u, "item_factors": i, "item_bias": i})
        params = {name: values.astype(np.float64, copy=False) for name, (values, _) in got.items()}
        return loading.MFModel(self.model, params, self.meta, Vocab(full.users.ids[u]), Vocab(full.items.ids[i]), full.schema)

    def counters(self) -> dict[str, int]:
        return {"keys_pulled": self.keys_pulled, "bytes_pulled": self.bytes_pulled}


BATCH_BYTES = predicting.BATCH_BYTES  # a kept model is read and predicted this much of the file at a time
plan_batches = predicting.plan_batches


async def base_predictor(kept: KeptModel) -> predicting.Predictor:
    """The kept model as a :class:`predict.Predictor` before any rows: a dense model's
    tables (read once, whole); a sparse model without its rows; an mf model with its id
    vocabularies and no factors (:func:`batch_predictor` reads what a batch needs)."""
    source = f"kept model {kept.name}"
    if isinstance(kept.model, MF):
        return predicting.Predictor(kept.model, {}, kept.meta, await kept.mf_vocabs(), source)
    if any(t.get("sparse") for t in kept.tables.values()):
        return predicting.Predictor(kept.model, {}, kept.meta, None, source)
    dense = await kept.dense()
    return predicting.Predictor(kept.model, {k: v.astype(np.float64, copy=False) for k, v in dense.items()}, kept.meta, None, source)


async def open_predictor(
    server: str, name: str, model_class_path: str | None = None, security: net.Security = net.LOCAL,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> predicting.Predictor:
    """:func:`base_predictor` of the kept model ``name``, its connections closed again
    (the parent of ``psctl predict NAME --server --workers N`` plans and combines with it)."""
    async with await KeptModel.open(server, name, model_class_path=model_class_path, security=security,
                                    max_frame_bytes=max_frame_bytes) as kept:  # fmt: skip
        return await base_predictor(kept)


async def batch_predictor(kept: KeptModel, pred: predicting.Predictor, rows: Any) -> predicting.Predictor:
    """``pred`` with what the rows ``rows`` (from ``read_rows``) touch read from the shards:
    an mf model's factor rows of their users and items, a sparse model's stored rows of their
    keys. A dense model has everything already."""
    if pred.mf is not None:
        return dataclasses.replace(pred, mf=await kept.mf_for(pred.mf, rows.X))
    if not pred.params:
        return dataclasses.replace(pred, params=await kept.params_for(rows.X))
    return pred


def predict_spread(
    server: str, name: str, data_path: str, workers: int, *, model_class_path: str | None = None,
    cold_start: str | None = None, out: str | None = None, failure_timeout_s: float | None = None,
    security: net.Security = net.LOCAL, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, batch_bytes: int = 0,
) -> tuple[Any, dict[str, int]]:
    """``psctl predict NAME DATA --server --workers N``: :func:`predict`'s result and counts,
    from N worker processes (``predict.predict_spread``), each reading its own byte ranges and
    pulling its own rows' keys. Not a coroutine: it runs its own event loops."""
    if out is not None:
        predicting.check_predictions_path(out)
    pred = net.run(lambda: open_predictor(server, name, model_class_path, security, max_frame_bytes))
    if pred.mf is None and cold_start is not None:
        raise UsageError(f"--cold-start is for mf models; {name} is a {pred.meta.get('kind')} model")
    pulled: dict[str, int] = {}
    result = predicting.predict_spread(
        name, data_path, workers, model_class_path, cold_start, out, server=server,
        failure_timeout_s=predicting.DEFAULT_FAILURE_TIMEOUT_S if failure_timeout_s is None else failure_timeout_s,
        predictor=pred, security=security, max_frame_bytes=max_frame_bytes, pulled=pulled, batch_bytes=batch_bytes,
    )  # fmt: skip
    return result, pulled


async def predict(
    server: str, name: str, data_path: str, *, model_class_path: str | None = None, cold_start: str | None = None,
    security: net.Security = net.LOCAL, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, batch_bytes: int = BATCH_BYTES,
) -> tuple[Any, dict[str, int]]:
    """``psctl predict NAME DATA --server``: the prediction (as apps/predict.py gives for the model
    file) and what was read from the shards (``keys_pulled``, ``bytes_pulled``).

    The kept model is a :class:`predict.Predictor` source: the file is planned
    (``plan_input``) and read once, byte range by byte range (``read_rows``); for each batch
    a sparse or mf model's shards give only the keys that batch touches, then the batch is
    evaluated (``evaluate_rows``) and the batches are combined (``combine``: metrics over
    every row, mf ratings clipped to the training range the meta carries)."""
    async with await KeptModel.open(server, name, model_class_path=model_class_path, security=security,
                                    max_frame_bytes=max_frame_bytes) as kept:  # fmt: skip
        pred = await base_predictor(kept)
        if pred.mf is None and cold_start is not None:
            raise UsageError(f"--cold-start is for mf models; {name} is a {kept.meta.get('kind')} model")
        cold = predicting.check_cold_start(pred, cold_start)
        plan = await asyncio.to_thread(predicting.plan_input, pred, data_path)
        batches = await asyncio.to_thread(plan_batches, data_path, plan, 1, batch_bytes)
        parts = []
        for part in batches:
            rows = await asyncio.to_thread(predicting.read_rows, pred, plan, data_path, part)
            batch = await batch_predictor(kept, pred, rows)
            parts.append(await asyncio.to_thread(predicting.evaluate_rows, batch, rows, cold))
        return predicting.combine(pred, parts, plan, cold), kept.counters()


# -- serving a kept model: psctl serve --server ----------------------------------------
#: Bound on one refresh (reconnecting included); a refresh that takes longer fails and the
#: source goes on answering with the weights it has, marked stale.
REFRESH_TIMEOUT_S = 30.0
DEFAULT_REFRESH_S = 1.0
MIN_REFRESH_S = 0.05


class LiveSource:
    """A kept model served by ``psctl serve --server`` (a :class:`serving.ModelSource`).

    It reads the whole model from its shards at :meth:`start` and then every ``refresh_s``
    seconds, measured from the end of one read to the start of the next, and answers every
    request with the last complete read (a :class:`serving.Snapshot` is replaced in one step,
    so a request never mixes two reads). So the weights a request sees are at most
    ``refresh_s`` plus one read's time old while the server answers. A model trained further
    in place (``--resume-from``) changes between reads; when its job ends the name moves to a
    new version and the next read follows it. Dense models and mf are served (their tables
    are read whole: an mf model's size is held in memory); sparse models are refused at start.

    A read that fails (the server unreachable, the model dropped, a shard restarting) leaves
    the last weights in place: requests are still answered, :meth:`describe` names the error
    and the weights' age, ``stale`` is true (``GET /v1/health`` answers 503), and reading goes
    on every ``refresh_s``, reconnecting, until it succeeds again.
    """

    def __init__(
        self, name: str, kept_name: str, server: str, *, refresh_s: float = DEFAULT_REFRESH_S,
        model_class_path: str | None = None, security: net.Security = net.LOCAL,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, notice: Callable[[str], None] = log.warning,
    ):  # fmt: skip
        self.name, self.kept_name, self.server, self.refresh_s = name, kept_name, server, refresh_s
        self.notice = notice  # one line when reading starts failing, and when it works again
        self._open_args = {"model_class_path": model_class_path, "security": security, "max_frame_bytes": max_frame_bytes}
        self._kept: KeptModel | None = None
        self._vocabs: loading.MFModel | None = None  # an mf model's vocabularies, read once per version
        self._snap: Any = None  # serving.Snapshot
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None  # why the last read failed (None: it succeeded)
        self.version: str | None = None  # the kept version the last successful read was of
        self.reads = 0
        self.read_s = 0.0  # how long the last successful read took

    async def start(self) -> None:
        """The first read; any failure is the start-up's one sentence (nothing listens yet)."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_S):
                await self._read()
        except TimeoutError:
            self._drop_connection()
            raise KeptModelError(f"reading kept model {self.kept_name!r} from {self.server} took over {REFRESH_TIMEOUT_S:g} s") from None
        except BaseException:
            self._drop_connection()
            raise
        self._task = asyncio.create_task(self._refresh_forever(), name=f"refresh {self.name}")

    @property
    def stale(self) -> bool:
        return self.error is not None

    def describe(self) -> dict[str, Any]:
        snap = self._snap
        out: dict[str, Any] = {
            "kind": "server", "address": self.server, "model": self.kept_name,
            "version": self.version,  # of the weights answered with (the last read)
            "refresh_s": self.refresh_s, "weights_as_of": serving.iso_time(snap.weights_as_of),
            "weights_age_s": round(max(0.0, time.time() - snap.weights_as_of), 3),
            "read_s": round(self.read_s, 4), "stale": self.stale,
        }  # fmt: skip
        if self.error is not None:
            out["refresh_error"] = self.error
        return out

    async def snapshot(self) -> Any:
        return self._snap

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._drop_connection()

    # -- reading
    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                # cancellation close() sends when a read ends at the same moment, and this
                # loop would then refresh forever with close() waiting on it.
                async with asyncio.timeout(REFRESH_TIMEOUT_S):
                    await self._read()
            except (PsctlError, OSError, TimeoutError) as exc:
                why = str(exc) or f"no answer within {REFRESH_TIMEOUT_S:g} s"
                self._failed(why)
            except Exception as exc:  # a bug, or an answer psctl does not expect: stale, never silently stuck
                log.exception("serving %s: reading kept model %r failed", self.name, self.kept_name)
                self._failed(f"{type(exc).__name__}: {exc}")
            else:
                if self.error is not None:
                    self.notice(f"serving {self.name}: kept model {self.kept_name!r} read again from {self.server}")
                self.error = None

    def _failed(self, why: str) -> None:
        """Keep answering with the last weights, marked stale; say so once per outage."""
        if self.error is None:  # one line per outage; describe() has the latest reason
            self.notice(f"serving {self.name}: reading kept model {self.kept_name!r} from {self.server} failed ({why}); "
                        f"answering with the weights of {self.describe()['weights_as_of']}")  # fmt: skip
        self.error = why
        self._drop_connection()  # reconnect, and find the name's version again, next time

    async def _read(self) -> None:
        began, as_of = time.monotonic(), time.time()
        if self._kept is None:
            self._kept = await KeptModel.open(self.server, self.kept_name, **self._open_args)
            self._vocabs = None
        try:
            pred = await self._predictor(self._kept)
        except KeptModelError:
            # The name may have moved to a new version (a --resume-from or --replace job ended,
            # and the old version was freed): find it and read once more.
            self._drop_connection()
            self._kept = await KeptModel.open(self.server, self.kept_name, **self._open_args)
            pred = await self._predictor(self._kept)
        snap = serving.snapshot_of(pred)  # refuses a sparse model, in one sentence
        self._snap = dataclasses.replace(snap, weights_as_of=as_of)
        self.version = self._kept.version
        self.reads += 1
        self.read_s = time.monotonic() - began

    async def _predictor(self, kept: KeptModel) -> predicting.Predictor:
        source = f"kept model {kept.name}"
        if any(t.get("sparse") for t in kept.tables.values()):
            raise KeptModelError(
                f"kept model {kept.name!r} is a sparse model; psctl serve answers for dense and mf models "
                "(use psctl predict NAME data --server for this one)"
            )
        tables = await kept.dense()
        params = await asyncio.to_thread(lambda: {k: v.astype(np.float64, copy=False) for k, v in tables.items()})
        if isinstance(kept.model, MF):
            if self._vocabs is None:
                self._vocabs = await kept.mf_vocabs()
            mf = dataclasses.replace(self._vocabs, params=params)
            return predicting.Predictor(kept.model, {}, kept.meta, mf, source)
        return predicting.Predictor(kept.model, params, kept.meta, None, source)

    def _drop_connection(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None
        self._vocabs = None
