"""The "ratings" data format: a CSV with a user id, an item id and a rating per row.

Ids are text (integers or any strings); other columns are ignored. The schema
is a :class:`~psctl.data.CsvSchema` whose two feature columns are the user and
the item and whose label is the rating. Partitions are byte ranges as for
every CSV (csvfile.plan_partitions), so a worker reads only its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from psctl.core.sparse import distinct
from psctl.data import csvfile, storage, vocab
from psctl.data.vocab import Vocab
from psctl.errors import DataError

#: Vocabulary names: the rows of the user tables and of the item tables.
USER, ITEM = "user", "item"


def read_schema(
    path: str | os.PathLike[str],
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str = "rating",
    has_header: bool = True,
    need_rating: bool = True,
    delimiter: str = ",",
) -> csvfile.CsvSchema:
    """Find the user, item and rating columns (names, or 0-based indices as text).

    Without ``need_rating`` a file lacking the rating column is fine (label_index None).
    Raises DataError naming the missing column.
    """
    columns = csvfile.read_columns(path, has_header, delimiter)
    user = csvfile._column_index(columns, user_col, "user", path)
    item = csvfile._column_index(columns, item_col, "item", path)
    if user == item:
        raise DataError(f"the user and item columns of '{path}' must differ; both are '{columns[user]}'")
    rating: int | None = None
    if need_rating or rating_col in columns:
        rating = csvfile._column_index(columns, rating_col, "rating", path)
        if rating in (user, item):
            raise DataError(f"the rating column of '{path}' must differ from the user and item columns")
    return csvfile.CsvSchema(columns, rating, (user, item), has_header, delimiter)


def read_partition(path: str | os.PathLike[str], schema: csvfile.CsvSchema, part: csvfile.Partition) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one partition: ids as an (n, 2) str array (user, item) and the ratings
    (float64; empty when the schema has no rating column).

    Raises DataError naming the file line and column of the first bad cell.
    """
    raw = storage.read_range(path, part.start, part.end)
    fast = _read_arrow(raw, schema, part.n_rows)
    if fast is not None:
        return fast
    lines, rows = csvfile._split_lines(raw)
    try:
        return _fast(rows, schema)
    except ValueError:
        return _exact(csvfile._numbered_rows(lines, part.first_line), schema, path)


def _read_arrow(raw: bytes, schema: csvfile.CsvSchema, n_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The ids and ratings of a partition's bytes parsed by pyarrow (as :func:`csvfile._read_arrow`
    does features: the same values, each distinct id cleaned once, no Python string per row), or
    None: numpy's parser or the exact one then decide, with every error sentence."""
    user, item = schema.feature_indices
    rating = [] if schema.label_index is None else [schema.label_index]
    table = csvfile._arrow_table(raw, schema, n_rows, rating, [user, item])
    if table is None:
        return None
    users, items = csvfile.arrow_text(table, user), csvfile.arrow_text(table, item)
    if users is None or items is None:
        return None
    ids = np.stack([users, items], axis=1) if n_rows else np.empty((0, 2), dtype=str)
    if not rating:
        return ids, np.empty(0)
    values = table.column(f"c{rating[0]}").combine_chunks()
    ratings = np.array(csvfile._values(values, np.float64))
    return (ids, ratings) if np.isfinite(ratings).all() else None


def read_ratings(path: str | os.PathLike[str], schema: csvfile.CsvSchema) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``path``, as :func:`read_partition` reads one partition."""
    [whole] = csvfile.plan_partitions(path, 1, schema.has_header)
    return read_partition(path, schema, whole)


def _usecols(schema: csvfile.CsvSchema) -> tuple[int, ...]:
    return (*schema.feature_indices, *(() if schema.label_index is None else (schema.label_index,)))


def _fast(rows: list[str], schema: csvfile.CsvSchema) -> tuple[np.ndarray, np.ndarray]:
    """numpy's C parser; ValueError on anything it or the checks here dislike."""
    cols = _usecols(schema)
    if not rows:
        return np.empty((0, 2), dtype=str), np.empty(0)
    n_commas = len(schema.columns) - 1
    if any(row.count(schema.delimiter) != n_commas for row in rows):
        raise ValueError("wrong number of cells")
    cells = np.loadtxt(rows, delimiter=schema.delimiter, usecols=cols, dtype=str, comments=None, quotechar='"', ndmin=2)
    ids = np.char.strip(cells[:, :2])
    if (ids == "").any():
        raise ValueError("an empty id")
    if schema.label_index is None:
        return ids, np.empty(0)
    ratings = cells[:, 2].astype(np.float64)  # ValueError for text
    if not np.isfinite(ratings).all():
        raise ValueError("a rating is not finite")
    return ids, ratings


def _exact(rows: list[tuple[int, str]], schema: csvfile.CsvSchema, path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cell by cell: slow, but names the line and column of the first bad cell."""
    names = schema.columns
    reference = "the header" if schema.has_header else "the first line"
    user, item = schema.feature_indices
    ids = np.empty((len(rows), 2), dtype=object)
    ratings = np.empty(len(rows) if schema.label_index is not None else 0)
    for r, (line_no, line) in enumerate(rows):
        cells = line.split(schema.delimiter)
        if len(cells) != len(names):
            raise DataError(f"'{path}' line {line_no} has {len(cells)} cells; {reference} has {len(names)}")
        for c, j in enumerate((user, item)):
            ids[r, c] = csvfile._cell(cells[j])
            if not ids[r, c]:
                raise DataError(f"'{path}' line {line_no}, column '{names[j]}': the id cell is empty")
        if schema.label_index is not None:
            where = f"'{path}' line {line_no}, column '{names[schema.label_index]}'"
            text = csvfile._cell(cells[schema.label_index])
            try:
                ratings[r] = float(text)
            except ValueError:
                raise DataError(f"{where}: rating '{text[:40]}' is not a number") from None
            if not math.isfinite(ratings[r]):
                raise DataError(f"{where}: rating '{text[:40]}' is not finite")
    return (ids.astype(str) if len(rows) else np.empty((0, 2), dtype=str)), ratings


# -- the statistics pass and the rows a model trains on ------------------------------
def stats_request(ids: np.ndarray, ratings: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A worker's STATS contribution: count/mean/m2 of its ratings and its distinct ids."""
    seen = {USER: distinct(ids[:, 0]), ITEM: distinct(ids[:, 1])}
    for name, values in seen.items():
        vocab.check_size(name, len(values))
    names, arrays = vocab.to_message({k: v.tolist() for k, v in seen.items()})
    stats = csvfile.partial_stats(ratings[:, None]) if len(ratings) else None
    if stats is not None:  # the range predictions are clipped to
        stats.update(min=float(ratings.min()), max=float(ratings.max()))
    body = {"stats": None if stats is None else {k: _plain(v) for k, v in stats.items()}, "labels": [], "vocab": names}
    return body, arrays


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def global_mean(stats: list[dict[str, Any]]) -> float:
    """The mean rating of the whole data from the workers' partial statistics."""
    mean, _ = csvfile.merge_stats(stats)
    return float(mean[0])


def rating_range(stats: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(lowest, highest) rating of the whole data from the workers' partial statistics;
    (None, None) when a partition's statistics lack the range (a worker of an older psctl)."""
    parts = [s for s in stats if s is not None and int(s.get("count", 0))]
    if not parts or any("min" not in s or "max" not in s for s in parts):
        return None, None
    return min(float(s["min"]) for s in parts), max(float(s["max"]) for s in parts)


def encode_rows(ids: np.ndarray, vocabs: Mapping[str, Vocab]) -> np.ndarray:
    """(n, 2) int64 table rows (user, item) of text ids; -1 for an id not in its vocabulary."""
    return np.stack([vocabs[USER].rows(ids[:, 0]), vocabs[ITEM].rows(ids[:, 1])], axis=1) if len(ids) else np.empty((0, 2), np.int64)


def random_split(n_rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices: a uniformly random ``test_fraction`` of the rows
    (rounded) is the test set, drawn by ``np.random.default_rng(seed)``."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(n_rows)
    n_test = round(n_rows * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def id_text(values: np.ndarray) -> np.ndarray:
    """In-memory ids as text, as a CSV would hold them: an integer-valued float is that integer."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all():
        values = values.astype(np.int64)
    if values.dtype.kind == "O":
        values = np.array([str(v) for v in values.tolist()])
    return values.astype(str)
