"""What ``psctl serve`` answers, without HTTP: model sources, request bodies in, response bodies out.

A :class:`ModelSource` is where a served model's weights come from: a model file
(:class:`FileSource`, loaded once at start) or a kept model on a live server
(:class:`psctl.apps.kept.LiveSource`, read again every ``--refresh-s``), whose
:meth:`snapshot` returns the weights it last read and whose :meth:`describe` says
how fresh they are. Everything else here (decoding instances, predicting, recommending,
the OpenAPI description) works on a :class:`Snapshot` and never asks where it
came from.

Predictions go through the functions ``psctl predict`` and ``psctl recommend``
use (:func:`predict.evaluate_rows`, :func:`recommend.rating_outputs` with its
clipping to the training ratings' range, :func:`recommend.recommend_user`), so a
served row gets the numbers the command line gives for the same row.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from psctl.apps import predict, recommend
from psctl.core.sparse import distinct
from psctl.data import csvfile, formats, storage
from psctl.errors import ModelFileError, UsageError
from psctl.models.base import Model, predicted_index

#: A model's name in a URL: letters, digits, '.', '_' and '-' (no '/' or ':').
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_TOP = 10
MAX_TOP = 10_000
#: Largest feature value accepted: far past any real feature, and small enough that a
#: linear model's outputs stay finite.
MAX_ABS_VALUE = 1e100
MAX_ID_CHARS = 1024


class BadRequest(Exception):
    """A request psctl serve refuses: ``status`` (4xx) and one sentence."""

    def __init__(self, sentence: str, status: int = 400):
        super().__init__(sentence)
        self.status = status


# -- where weights come from ------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One consistent set of weights of a served model and what is needed to apply them."""

    predictor: predict.Predictor  # the model, its float64 parameters and meta, as psctl predict applies them
    columns: tuple[str, ...]  # dense: the feature columns in order; mf: (user column, item column)
    label: str | None  # the training label column (accepted and ignored in instances)
    weights_as_of: float  # Unix time the weights were read (a file: when it was loaded)

    @property
    def model(self) -> Model:
        return self.predictor.model

    @property
    def meta(self) -> dict[str, Any]:
        return self.predictor.meta

    @property
    def mf(self) -> recommend.MFModel | None:
        return self.predictor.mf


class ModelSource(Protocol):
    """Where one served model's weights come from (a model file, or a kept model on a live server).

    psctl serve calls :meth:`start` once before it listens (a live source connects and
    reads its first snapshot there, so a bad address is a start-up sentence), then
    :meth:`snapshot` for every request, and :meth:`close` when it stops. A live source
    builds its snapshots with :func:`snapshot_of` from a ``predict.Predictor`` of the tables it
    read, and names its freshness in :meth:`describe` (``{"kind": "server", "address": ...,
    "refresh_s": ..., "weights_age_s": ..., "stale": ...}``).
    """

    name: str
    #: True while the source cannot refresh its weights (``GET /v1/health`` answers 503).
    stale: bool

    async def start(self) -> None:
        """Connect and read the first weights (a file source has them already)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Where the weights come from and how fresh they are, as JSON values (in the model's metadata)."""
        ...

    async def snapshot(self) -> Snapshot:
        """The weights to answer the next request with. A live source returns its last pull
        (refreshed in the background at the freshness it promises) or pulls now."""
        ...

    async def close(self) -> None:
        """Stop refreshing and let go of connections."""
        ...


def snapshot_of(pred: predict.Predictor) -> Snapshot:
    """A :class:`Snapshot` of a loaded model; ModelFileError for a model psctl serve cannot answer for."""
    now = time.time()
    if pred.mf is not None:
        return Snapshot(pred, (pred.mf.user_col, pred.mf.item_col), pred.mf.rating_col, now)
    spec = pred.meta.get("input") or {}
    if spec.get("format", "csv") in formats.SPARSE_FORMATS:
        raise ModelFileError(
            f"'{pred.source}' is a {spec['format']} (sparse) model; psctl serve answers for dense CSV and mf models "
            "(use psctl predict for this one)"
        )
    if pred.meta.get("schema") is None:
        raise ModelFileError(f"'{pred.source}' has no training schema, so psctl serve cannot name its feature columns")
    schema = csvfile.CsvSchema.from_dict(pred.meta["schema"])
    return Snapshot(pred, schema.feature_names, pred.meta.get("label"), now)


@dataclass
class FileSource:
    """A model file, loaded and checked once, when psctl serve starts."""

    name: str
    path: str
    loaded: Snapshot = field(repr=False)
    stale: bool = False  # a file's weights are what it holds

    @classmethod
    def load(cls, name: str, path: str, model_class: str | None = None) -> FileSource:
        if not storage.is_url(path) and not Path(path).is_file():  # a URL's errors: modelfile's sentences
            raise ModelFileError(f"model file '{path}' does not exist" if not Path(path).exists() else f"'{path}' is not a model file")
        return cls(name, path, snapshot_of(predict.load_predictor(path, model_class)))

    async def start(self) -> None:
        pass  # loaded and checked in load(), before anything listens

    def describe(self) -> dict[str, Any]:
        return {"kind": "file", "path": self.path, "loaded_at": iso_time(self.loaded.weights_as_of)}

    async def snapshot(self) -> Snapshot:
        return self.loaded

    async def close(self) -> None:
        pass


def parse_kept_args(args: list[str]) -> list[tuple[str, str]]:
    """``NAME`` or ``ALIAS=NAME`` of models kept on a server -> (served name, kept name)."""
    named: dict[str, str] = {}
    for arg in args:
        alias, sep, kept = arg.partition("=")
        if not sep:
            alias = kept = arg
        for what in (alias, kept):
            if not NAME_RE.fullmatch(what):
                raise UsageError(f"'{what}' cannot be a kept model's name (1 to 128 of letters, digits, . _ -); "
                                 "with --server give kept model names, NAME or ALIAS=NAME")  # fmt: skip
        if alias in named:
            raise UsageError(f"two models are served as '{alias}' ({named[alias]} and {kept}); give one of them as ALIAS=NAME")
        named[alias] = kept
    if not named:
        raise UsageError("give at least one kept model's name to serve")
    return list(named.items())


def parse_model_args(args: list[str]) -> list[tuple[str, str]]:
    """``model.npz`` or ``NAME=path`` -> (name, path); a name is the file's stem unless given."""
    named: dict[str, str] = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep or not NAME_RE.fullmatch(name):
            name, path = Path(arg).stem, arg
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"'{name}' cannot be a model's name in a URL (letters, digits, . _ -); give NAME=path")
        if name in named:
            raise UsageError(f"two models are named '{name}' ({named[name]} and {path}); give one of them as NAME=path")
        named[name] = path
    if not named:
        raise UsageError("give at least one model file to serve")
    return list(named.items())


def iso_time(t: float) -> str:
    """``t`` (Unix time) in UTC, to the millisecond: 2026-12-01T21:50:03.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


# -- metadata -------------------------------------------------------------------------
def metadata(name: str, source: ModelSource, snap: Snapshot) -> dict[str, Any]:
    """``GET /v1/models/NAME``: what the model is and what its instances must hold."""
    meta = snap.meta
    out: dict[str, Any] = {
        "name": name,
        "kind": meta.get("kind"),
        "task": snap.model.task,
        "columns": list(snap.columns),
        "source": source.describe(),
        "trained": {k: meta[k] for k in ("mode", "epochs", "workers", "created") if k in meta},
    }
    if snap.mf is not None:
        out.update(
            users=len(snap.mf.users),
            items=len(snap.mf.items),
            rank=snap.mf.model.rank,
            global_mean=snap.mf.model.mean,
            endpoints=[f"/v1/models/{name}:predict", f"/v1/models/{name}:recommend"],
            output="rating (null for a user or item the model has not seen, unless cold_start is mean)",
        )
        return out
    out["classes"] = snap.model.classes or None
    out["label"] = snap.label
    out["standardized"] = bool(meta.get("standardize"))
    out["endpoints"] = [f"/v1/models/{name}:predict"]
    out["output"] = {
        "binary": f"label and probability of the label '{snap.model.classes[1] if snap.model.classes else 1}'",
        "classes": "label and a score per class",
        "regression": "value",
    }[snap.model.task]
    return out


# -- request bodies --------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"the body holds {name}, which is not a JSON number; send finite numbers")


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; BadRequest with one sentence otherwise."""
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text; send JSON") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise BadRequest("the body nests too deeply to be a request") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the body is a JSON {_json_type(value)}; send an object such as {{\"instances\": [...]}}")
    return value


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(v), "value")


def _only_keys(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise BadRequest(f"the body has '{extra[0][:40]}', which this endpoint does not take (it takes {', '.join(allowed)})")


def instances_of(body: dict[str, Any], max_rows: int) -> list[Any]:
    _only_keys(body, ("instances", "cold_start"))
    if "instances" not in body:
        raise BadRequest('the body has no "instances"; send {"instances": [row, ...]}')
    rows = body["instances"]
    if not isinstance(rows, list):
        raise BadRequest(f'"instances" is a JSON {_json_type(rows)}; it must be an array of rows')
    if len(rows) > max_rows:
        raise BadRequest(f"the request has {len(rows)} instances; the limit is {max_rows} (--max-rows)")
    return rows


_NUMBER_TYPES = frozenset((int, float))


def dense_matrix(snap: Snapshot, rows: list[Any]) -> np.ndarray:
    """Instances (objects keyed by column name, or arrays in the model's column order) as an (n, features) matrix."""
    columns = snap.columns
    n = len(columns)
    known = frozenset(columns)
    values: list[list[Any]] = []
    for r, row in enumerate(rows):
        if type(row) is list:
            if len(row) != n:
                raise BadRequest(f"instance {r} has {len(row)} values; the model takes {n} ({_names(columns)})")
            values.append(row)
        elif type(row) is dict:
            try:
                values.append([row[c] for c in columns])
            except KeyError:
                missing = [c for c in columns if c not in row]
                raise BadRequest(f"instance {r} lacks {len(missing)} column(s) the model needs: {_names(missing)}") from None
            if len(row) > n:  # every column is there, so the others are extra: only the label may be
                extra = [k for k in row if k not in known and k != snap.label]
                if extra:
                    raise BadRequest(f"instance {r} has a column '{str(extra[0])[:40]}' the model does not have ({_names(columns)})")
        else:
            raise BadRequest(f"instance {r} is a JSON {_json_type(row)}; send an object keyed by column or an array of {n} numbers")
        if not _NUMBER_TYPES.issuperset(map(type, values[-1])):  # bools, strings, null: one C-level pass per row
            j = next(j for j, v in enumerate(values[-1]) if type(v) not in _NUMBER_TYPES)
            raise BadRequest(f"instance {r} has {_shown(values[-1][j])} for column '{columns[j]}', which is not a number")
    try:
        out = np.array(values, dtype=np.float64).reshape(len(rows), n)
    except OverflowError:  # a whole number past float64's range
        raise BadRequest("an instance has a number too large for a 64-bit float") from None
    inside = np.abs(out) <= MAX_ABS_VALUE  # False for NaN and infinity too (json reads 1e999 as infinity)
    if not inside.all():
        r, j = np.argwhere(~inside)[0]
        raise BadRequest(f"instance {r} has {rows[r][j] if type(rows[r]) is list else rows[r][columns[j]]} for column "
                         f"'{columns[j]}', which is not a finite number from -{MAX_ABS_VALUE:g} to {MAX_ABS_VALUE:g}")  # fmt: skip
    return out


def _names(columns: Any, limit: int = 5) -> str:
    columns = list(columns)
    return ", ".join(f"'{c}'" for c in columns[:limit]) + (f" and {len(columns) - limit} more" if len(columns) > limit else "")


def _shown(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _id(v: Any, r: int, what: str) -> str:
    if type(v) is str and len(v) <= MAX_ID_CHARS:
        return v
    if type(v) is int:
        return str(v)
    raise BadRequest(f"instance {r} has {_shown(v)} as its {what}, which is not an id (a string or a whole number)")


def pair_ids(snap: Snapshot, rows: list[Any]) -> np.ndarray:
    """mf instances ({user column: id, item column: id} or [user, item]) as an (n, 2) array of text ids."""
    user_col, item_col = snap.columns
    ids = np.empty((len(rows), 2), dtype=object)
    for r, row in enumerate(rows):
        if type(row) is list and len(row) == 2:
            user, item = row
        elif type(row) is dict:
            if user_col not in row or item_col not in row:
                raise BadRequest(f"instance {r} needs the columns '{user_col}' and '{item_col}'")
            extra = [k for k in row if k not in (user_col, item_col, snap.label)]
            if extra:
                raise BadRequest(f"instance {r} has a column '{str(extra[0])[:40]}'; an mf model takes '{user_col}' and '{item_col}'")
            user, item = row[user_col], row[item_col]
        else:
            raise BadRequest(f"instance {r} is not a ({user_col}, {item_col}) pair; send [user, item] or an object with both columns")
        ids[r] = _id(user, r, user_col), _id(item, r, item_col)
    return ids.astype(str) if len(rows) else np.empty((0, 2), dtype=str)


# -- answers --------------------------------------------------------------------------
def predictions(snap: Snapshot, body: dict[str, Any], max_rows: int) -> list[Any]:
    """``POST /v1/models/NAME:predict``: one prediction per instance, in order."""
    rows = instances_of(body, max_rows)
    if snap.mf is not None:
        cold_start = body.get("cold_start", "nan")
        if cold_start not in ("nan", "mean"):
            raise BadRequest(f"cold_start is {_shown(cold_start)}; it must be \"nan\" (null ratings) or \"mean\"")
        rated, known_user, known_item = recommend.rating_outputs(snap.mf, pair_ids(snap, rows), cold_start)
        known = known_user & known_item
        return [
            {"rating": None if math.isnan(v) else v, "known": k}
            for v, k in zip(rated.tolist(), known.tolist())
        ]
    if "cold_start" in body:
        raise BadRequest("cold_start is for mf models")
    with np.errstate(over="ignore", invalid="ignore"):
        outputs = predict.evaluate_rows(snap.predictor, predict.Rows(dense_matrix(snap, rows), None)).outputs
    if not np.isfinite(outputs).all():
        r = int(np.argwhere(~np.isfinite(outputs))[0][0])
        raise BadRequest(f"instance {r} gives a prediction that is not a finite number (its values are far from the training data's)")
    task = snap.model.task
    if task == "regression":
        return [{"value": v} for v in outputs.tolist()]
    labels = [snap.model.classes[i] for i in predicted_index(task, outputs).tolist()]
    if task == "binary":
        return [{"label": label, "probability": p} for label, p in zip(labels, outputs.tolist())]
    classes = snap.model.classes
    return [{"label": label, "scores": dict(zip(classes, row))} for label, row in zip(labels, outputs.tolist())]


def recommendations(snap: Snapshot, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/models/NAME:recommend``: a user's top items by predicted rating."""
    if snap.mf is None:
        raise BadRequest(f"recommend is for mf models; this is a {snap.meta.get('kind')} model", 404)
    _only_keys(body, ("user", "top", "exclude"))
    if "user" not in body:
        raise BadRequest('the body has no "user"; send {"user": ID, "top": K}')
    user = _body_id(body["user"], "user")
    top = body.get("top", DEFAULT_TOP)
    if type(top) is not int or not 1 <= top <= MAX_TOP:
        raise BadRequest(f"top is {_shown(top)}; it must be a whole number from 1 to {MAX_TOP}")
    exclude = body.get("exclude", [])
    if not isinstance(exclude, list) or len(exclude) > len(snap.mf.items):
        raise BadRequest("exclude must be an array of item ids, at most one per item of the model")
    mf = snap.mf
    [row] = mf.users.rows(np.array([user]))
    if row < 0:
        raise BadRequest(f"user '{user[:40]}' is not in the model (no ratings in its training data)", 404)
    excluded = None
    if exclude:
        items = mf.items.rows(np.array([_body_id(v, "excluded item") for v in exclude]))
        items = distinct(items[items >= 0])
        excluded = (np.full(len(items), row), items)
    ranked = recommend.recommend_user(mf, user, top, excluded)
    return {
        "user": user,
        "top": top,
        "items": [{"rank": r, "item": item, "predicted_rating": score} for r, (item, score) in enumerate(ranked, 1)],
    }


def _body_id(v: Any, what: str) -> str:
    if type(v) is str and len(v) <= MAX_ID_CHARS:
        return v
    if type(v) is int:
        return str(v)
    raise BadRequest(f"{what} is {_shown(v)}, which is not an id (a string or a whole number)")


# -- the OpenAPI description -------------------------------------------------------------
def openapi(models: dict[str, Snapshot], token: bool, max_rows: int) -> dict[str, Any]:
    """OpenAPI 3.0 for the routes, with each served model's own paths and request schema
    (its columns, in order), so a client or a fuzzer knows exactly what is accepted."""
    error = {"$ref": "#/components/schemas/Error"}
    refusals = (("400", "a malformed request"), ("404", "no such model, user or path"), ("405", "a method the path does not take"),
                ("408", "the body came too slowly"), ("413", "too large a body or too many instances"),
                ("503", "the server holds its connection limit"))  # fmt: skip
    errors = {code: {"description": why, "content": {"application/json": {"schema": error}}} for code, why in refusals}
    if token:
        errors["401"] = {"description": "no or a wrong bearer token", "content": {"application/json": {"schema": error}}}

    def op(summary: str, schema: dict[str, Any], body: dict[str, Any] | None = None, open_: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": summary, "responses": {
            "200": {"description": "done", "content": {"application/json": {"schema": schema}}}, **errors}}  # fmt: skip
        if body is not None:
            out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        if open_:
            out["security"] = []
        return out

    obj = {"type": "object"}
    paths: dict[str, Any] = {
        "/v1/health": {"get": op("Whether the server answers (no token needed)", obj, open_=True)},
        "/v1/models": {"get": op("Every served model's metadata", obj)},
        "/openapi.json": {"get": op("This description", obj)},
    }
    predictions = {"type": "object", "required": ["predictions"], "properties": {"predictions": {"type": "array", "items": obj}}}
    for name, snap in models.items():
        paths[f"/v1/models/{name}"] = {"get": op(f"Metadata of {name}", obj)}
        paths[f"/v1/models/{name}:predict"] = {"post": op(f"Predictions of {name}", predictions, _predict_schema(snap, max_rows))}
        if snap.mf is not None:
            paths[f"/v1/models/{name}:recommend"] = {"post": op(f"Top items of a user by {name}", obj, _recommend_schema(snap))}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "psctl serve", "version": "1", "description": "Predictions in TensorFlow Serving's REST shape."},
        "paths": paths,
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}},
    }
    if token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


_ID = {"oneOf": [{"type": "string", "maxLength": MAX_ID_CHARS}, {"type": "integer"}]}


def _predict_schema(snap: Snapshot, max_rows: int) -> dict[str, Any]:
    columns = list(snap.columns)
    if snap.mf is not None:
        value: dict[str, Any] = _ID
        extra: dict[str, Any] = {"cold_start": {"type": "string", "enum": ["nan", "mean"]}}
    else:
        value = {"type": "number", "minimum": -MAX_ABS_VALUE, "maximum": MAX_ABS_VALUE}
        extra = {}
    by_name = {"type": "object", "required": columns, "additionalProperties": False,
               "properties": {c: value for c in columns} | ({snap.label: {}} if snap.label and snap.label not in columns else {})}
    by_order = {"type": "array", "minItems": len(columns), "maxItems": len(columns), "items": value}
    return {
        "type": "object", "required": ["instances"], "additionalProperties": False,
        "properties": {"instances": {"type": "array", "maxItems": max_rows, "items": {"oneOf": [by_name, by_order]}}, **extra},
    }  # fmt: skip


def _recommend_schema(snap: Snapshot) -> dict[str, Any]:
    assert snap.mf is not None
    return {
        "type": "object", "required": ["user"], "additionalProperties": False,
        "properties": {"user": _ID, "top": {"type": "integer", "minimum": 1, "maximum": MAX_TOP},
                       "exclude": {"type": "array", "maxItems": len(snap.mf.items), "items": _ID}},
    }  # fmt: skip
