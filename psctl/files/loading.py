"""Loading a model file into a model object: the registry's class, checked against the file.

A model of a user's own class is only imported when the caller names that
class: a model file alone never makes psctl import code.
"""

from __future__ import annotations

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


def load(model_path: str, model_class_path: str | None = None) -> tuple[Model, dict[str, np.ndarray], dict[str, Any]]:
    """The model object, its parameters and meta from a model file.

    A model of a user's own class is only imported when the caller names that
    class: a model file alone never makes psctl import code.
    """
    params, meta = modelfile.load_model(model_path)
    kind = meta["kind"]
    if ":" in kind and kind != model_class_path:
        raise ModelFileError(f"'{model_path}' holds a model of class '{kind}'; pass --model-class {kind} to load it")
    try:
        cls = model_class(kind)
        n_features = meta.get("n_features", len(meta["feature_names"]))
        model = cls(n_features, meta.get("classes") or [], **meta.get("model_params", {}))
        tables = model.tables()
        # A sparse table is stored as the keys training touched and their rows.
        expected = {t.name: t.shape(len(params[f"{t.name}.keys"]) if t.sparse else t.rows) for t in tables}
    except (KeyError, TypeError, PsctlError) as exc:
        raise ModelFileError(f"'{model_path}' is a psctl model without the parts a {kind} model needs ({exc})") from None
    for t in tables:
        keys = params[f"{t.name}.keys"] if t.sparse else None
        if keys is not None and (keys.ndim != 1 or (len(keys) > 1 and not (np.diff(keys) > 0).all())):
            raise ModelFileError(f"'{model_path}' has keys for table '{t.name}' that are not sorted and unique")
    for name, shape in expected.items():
        if name not in params or params[name].shape != shape:
            got = params[name].shape if name in params else "none"
            raise ModelFileError(f"'{model_path}' has table '{name}' of shape {got}; a {kind} model needs {shape}")
    return model, params, meta



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
    tables = {k: params[k].astype(np.float64) for k in ("user_factors", "item_factors", "user_bias", "item_bias")}
    return MFModel(model, tables, meta, users, items, schema)
