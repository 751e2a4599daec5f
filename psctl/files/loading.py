"""Loading a model file into a model object: the registry's class, checked against the file.

A model of a user's own class is only imported when the caller names that
class: a model file alone never makes psctl import code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl.data import csvfile, ratings
from psctl.data.vocab import Vocab, VocabError
from psctl.errors import ModelFileError, PsctlError
from psctl.files import modelfile
from psctl.models.base import Model
from psctl.models.mf import MF
from psctl.models.registry import model_class


# -- the one schema of a model file's meta ------------------------------------------
#: Largest count (features, users, items, rank, classes) a model file may declare.
MAX_COUNT = 1 << 40
INPUT_FORMATS = ("csv", "ratings", "libsvm", "hashed_csv")


def _count(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= MAX_COUNT


def _list_of(kind: type | tuple[type, ...], ok: Callable[[Any], bool] = lambda v: True) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) <= MAX_COUNT and all(
        isinstance(x, kind) and not isinstance(x, bool) and ok(x) for x in v
    )


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _csv_schema(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and _list_of(str)(v.get("columns"))
        and (v.get("label_index") is None or _count(0)(v.get("label_index")))
        and _list_of(int, _count(0))(v.get("feature_indices"))
        and isinstance(v.get("has_header"), bool)
        and isinstance(v.get("delimiter", ","), str) and len(v.get("delimiter", ",")) == 1
        and all(i < len(v["columns"]) for i in [*v["feature_indices"], *([v["label_index"]] if v["label_index"] is not None else [])])
    )


def _standardize(v: Any) -> bool:
    return isinstance(v, dict) and _list_of((int, float), _finite)(v.get("mean")) and _list_of((int, float), _finite)(v.get("std"))


def _input(v: Any) -> bool:
    if not isinstance(v, dict) or v.get("format") not in INPUT_FORMATS:
        return False
    if v["format"] == "libsvm":
        return v.get("index_base") in (0, 1) and not isinstance(v.get("index_base"), bool)
    if v["format"] == "hashed_csv":
        return _count(1)(v.get("hash_bits")) and v["hash_bits"] <= 62 and _list_of(str)(v.get("categorical"))
    return True


#: field -> (what it must be, in words; the check). Absent and null fields are allowed
#: where the check accepts None; every other field of the meta is not read by loading.
META_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "kind": ("a model name", lambda v: isinstance(v, str) and 0 < len(v) <= 200),
    "task": ("one of binary, classes, regression", lambda v: v is None or v in ("binary", "classes", "regression")),
    "data_format": ("csv or ratings", lambda v: v is None or v in ("csv", "ratings")),
    "n_features": (f"a whole number from 0 to {MAX_COUNT}", lambda v: v is None or _count(0)(v)),
    "feature_names": ("a list of column names", lambda v: v is None or _list_of(str)(v)),
    "classes": ("a list of class labels", lambda v: v is None or _list_of(str)(v)),
    "label": ("a column name", lambda v: v is None or isinstance(v, str)),
    "model_params": ("an object of model options", lambda v: v is None or isinstance(v, dict)),
    "schema": ("a CSV schema (columns, label_index, feature_indices, has_header)", lambda v: v is None or _csv_schema(v)),
    "standardize": ("lists of finite means and standard deviations", lambda v: v is None or _standardize(v)),
    "input": ("an input spec (format csv, ratings, hashed_csv with hash_bits, or libsvm with index_base 0 or 1)", lambda v: v is None or _input(v)),
    "vocab": ("an object of id kinds", lambda v: v is None or isinstance(v, dict)),
}
#: model_params the built-in models read -> their check (the model's own __init__ checks the rest).
MODEL_PARAMS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rank": (f"a whole number from 1 to {MAX_COUNT}", _count(1)),
    "users": (f"a whole number from 0 to {MAX_COUNT}", _count(0)),
    "items": (f"a whole number from 0 to {MAX_COUNT}", _count(0)),
    "mean": ("a finite number", _finite),
    "init_scale": ("a positive number", lambda v: _finite(v) and v > 0),
    "rating_min": ("a finite number", lambda v: v is None or _finite(v)),
    "rating_max": ("a finite number", lambda v: v is None or _finite(v)),
}


def check_meta(model_path: str, meta: dict[str, Any]) -> None:
    """ModelFileError (one sentence) unless every field of ``meta`` in META_FIELDS is as it must be."""
    for name, (words, ok) in META_FIELDS.items():
        if not ok(meta.get(name)):
            raise ModelFileError(f"'{model_path}' has a meta field '{name}' that is not {words}")
    for name, (words, ok) in MODEL_PARAMS.items():
        params = meta.get("model_params") or {}
        if name in params and not ok(params[name]):
            raise ModelFileError(f"'{model_path}' has a model option '{name}' that is not {words}")
    spec = meta.get("input") or {}
    if spec.get("format") in ("libsvm", "hashed_csv") and meta.get("n_features") is None:
        raise ModelFileError(f"'{model_path}' reads {spec['format']} input but does not say its number of features")
    std = meta.get("standardize")
    if std is not None:
        n = meta.get("n_features", len(meta.get("feature_names") or []))
        if len(std["mean"]) != n or len(std["std"]) != n:
            raise ModelFileError(f"'{model_path}' standardizes {len(std['mean'])} means and {len(std['std'])} deviations; it has {n} features")
        if not all(s > 0 for s in std["std"]):
            raise ModelFileError(f"'{model_path}' has a standard deviation of zero or less, which cannot scale a feature")


def load(model_path: str, model_class_path: str | None = None) -> tuple[Model, dict[str, np.ndarray], dict[str, Any]]:
    """The model object, its parameters and meta from a model file.

    A model of a user's own class is only imported when the caller names that
    class: a model file alone never makes psctl import code. The meta is checked
    against META_FIELDS and every member's declared shape against the model before
    any table is inflated; members the model does not use are refused.
    """
    found: dict[str, Any] = {}

    def select(meta: dict[str, Any], headers: modelfile.Headers) -> set[str]:
        found["model"], found["tables"] = _model_for(model_path, model_class_path, meta, headers)
        # Optimizer state (--save-optimizer-state) is kept in the file but never inflated here.
        return {name for name in headers if not _is_optimizer_state(name, found["tables"])}

    params, meta = modelfile.load_model(model_path, select=select)
    model, tables = found["model"], found["tables"]
    for t in tables:
        keys = params[f"{t.name}.keys"] if t.sparse else None
        if keys is not None and (keys.ndim != 1 or (len(keys) > 1 and not (np.diff(keys) > 0).all())):
            raise ModelFileError(f"'{model_path}' has keys for table '{t.name}' that are not sorted and unique")
        if not np.isfinite(params[t.name]).all():
            raise ModelFileError(f"'{model_path}' has table '{t.name}' with NaN or infinite weights")
    return model, params, meta


def _is_optimizer_state(name: str, tables: list[Any]) -> bool:
    """``table.opt.<state>``, as train writes with --save-optimizer-state."""
    table, sep, state = name.partition(".opt.")
    return bool(sep) and state.isidentifier() and any(t.name == table for t in tables)


def model_from_meta(model_path: str, model_class_path: str | None, meta: dict[str, Any]) -> tuple[Model, list[Any]]:
    """The model ``meta`` describes (checked against META_FIELDS and the model's class) and its tables;
    ``model_path`` names where the meta came from in the sentences (a file, or a kept model)."""
    check_meta(model_path, meta)
    kind = meta["kind"]
    if ":" in kind and kind != model_class_path:
        raise ModelFileError(f"'{model_path}' holds a model of class '{kind}'; pass --model-class {kind} to load it")
    try:
        cls = model_class(kind)
    except PsctlError as exc:
        raise ModelFileError(f"'{model_path}': {exc}") from None
    for field in ("task", "data_format"):
        if meta.get(field) is not None and meta[field] != getattr(cls, field):
            raise ModelFileError(f"'{model_path}' says {field} {meta[field]!r}, but a {kind} model has {getattr(cls, field)!r}")
    try:
        n_features = meta["n_features"] if meta.get("n_features") is not None else len(meta["feature_names"])
        model = cls(n_features, meta.get("classes") or [], **(meta.get("model_params") or {}))
        tables = model.tables()
    except (KeyError, TypeError, ValueError, PsctlError) as exc:
        raise ModelFileError(f"'{model_path}' is a psctl model without the parts a {kind} model needs ({exc})") from None
    return model, tables


def _model_for(model_path: str, model_class_path: str | None, meta: dict[str, Any], headers: modelfile.Headers) -> tuple[Model, list[Any]]:
    """The model ``meta`` describes, after checking the meta and every member's declared shape."""
    model, tables = model_from_meta(model_path, model_class_path, meta)
    cls, kind = type(model), meta["kind"]
    used = {t.name for t in tables} | {f"{t.name}.keys" for t in tables if t.sparse}
    if cls.data_format == "ratings":
        used |= {f"vocab_{ratings.USER}", f"vocab_{ratings.ITEM}"}
    unused = sorted(name for name in set(headers) - used if not _is_optimizer_state(name, tables))
    if unused:
        raise ModelFileError(f"'{model_path}' has a member '{unused[0]}' that a {kind} model does not use")
    for t in tables:
        if t.sparse:
            keys = headers.get(f"{t.name}.keys")
            if keys is None or len(keys[0]) != 1:
                raise ModelFileError(f"'{model_path}' has no 1-d keys for table '{t.name}'")
            shape = t.shape(keys[0][0])
        else:
            shape = t.shape(t.rows)
        got = headers[t.name][0] if t.name in headers else "none"
        if got != shape:
            raise ModelFileError(f"'{model_path}' has table '{t.name}' of shape {got}; a {kind} model needs {shape}")
    return model, tables


@dataclass
class MFModel:
    """A loaded mf model file: the tables (float64), vocabularies and training schema."""

    model: MF
    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    users: Vocab
    items: Vocab
    schema: csvfile.CsvSchema

    @property
    def user_col(self) -> str:
        return self.schema.columns[self.schema.feature_indices[0]]

    @property
    def item_col(self) -> str:
        return self.schema.columns[self.schema.feature_indices[1]]

    @property
    def rating_col(self) -> str | None:
        return None if self.schema.label_index is None else self.schema.columns[self.schema.label_index]

    def factors(self, name: str) -> np.ndarray:
        table = self.params[name]
        return table.reshape(len(table), self.model.rank)


def load_mf(model_path: str) -> MFModel:
    """An mf model file, checked; ModelFileError for any other kind or missing parts."""
    return from_loaded(model_path, *load(model_path))


def from_loaded(model_path: str, model: Any, params: dict[str, np.ndarray], meta: dict[str, Any]) -> MFModel:
    """An :class:`MFModel` from what :func:`load` returned for ``model_path``."""
    if not isinstance(model, MF):
        raise ModelFileError(f"'{model_path}' is a {meta['kind']} model; this needs an mf model")
    try:
        kinds = meta["vocab"]
        users = Vocab.from_array(params[f"vocab_{ratings.USER}"], kinds[ratings.USER])
        items = Vocab.from_array(params[f"vocab_{ratings.ITEM}"], kinds[ratings.ITEM])
        schema = csvfile.CsvSchema.from_dict(meta["schema"])
    except (KeyError, TypeError, ValueError, VocabError) as exc:
        raise ModelFileError(f"'{model_path}' is an mf model without its id vocabularies ({exc})") from None
    if len(users) != model.options["users"] or len(items) != model.options["items"]:
        raise ModelFileError(f"'{model_path}' has vocabularies that do not match its tables")
    tables = {k: params[k].astype(np.float64, copy=False) for k in ("user_factors", "item_factors", "user_bias", "item_bias")}
    return MFModel(model, tables, meta, users, items, schema)
