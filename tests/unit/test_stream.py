"""Partitions read slice by slice (psctl/data/stream.py): the statistics pass, memory mode's compact
arrays and streaming mode's shuffle windows, against one read of the whole partition."""

from unittest import mock

import numpy as np
import pytest

from psctl.cluster import worker
from psctl.core.batching import batch_indices, batch_sizes, stream_windows
from psctl.core.sparse import SparseRows
from psctl.data import csvfile, stream
from psctl.models.base import classes_for
from psctl.models.registry import model_class

from . import test_worker_slices as slices

LogisticRegression, Softmax, MF = model_class("logreg"), model_class("softmax"), model_class("mf")

ROWS = 400


def dense(tmp_path):
    return (*slices.dense(tmp_path, ROWS), LogisticRegression)


def multiclass(tmp_path):
    rng = np.random.default_rng(2)
    lines = ["label,a,b"] + [f"{['x', 'y', 'rare'][0 if i % 2 else (1 if i % 37 else 2)]},{rng.normal():.5f},{i % 7}" for i in range(ROWS)]
    p = slices.write(tmp_path, "\n".join(lines) + "\n", "m.csv")
    return p, {"format": "csv", "schema": csvfile.read_schema(p).to_dict()}, True, Softmax


def hashed(tmp_path):
    return (*slices.hashed(tmp_path, ROWS), LogisticRegression)


def libsvm(tmp_path):
    return (*slices.libsvm(tmp_path, ROWS), LogisticRegression)


def rated(tmp_path):
    return (*slices.rated(tmp_path, ROWS), MF)


FORMATS = [dense, multiclass, hashed, libsvm, rated]


def whole_stats(spec, raw_X, labels, model_cls, held_labels=None):
    body, arrays = worker.stats_request(raw_X, labels, spec, model_cls)
    if held_labels is not None and model_cls.task != "regression":
        body["labels"] = sorted(set(body["labels"]) | set(held_labels.tolist()))
    return body, arrays


def files(tmp_path, make, hold=None):
    path, data, header, model_cls = make(tmp_path)
    spec = {"data": {"path": path, **data}, "standardize": True, "n_features": None}
    parts = csvfile.plan_partitions(path, 2, header)
    return path, spec, parts, model_cls


def reply_of(body, arrays):
    """A coordinator's STATS reply to one worker's body: its statistics as the whole data's."""
    from psctl.data import vocab

    reply = {"stats": [body["stats"]] if body["stats"] is not None else [], "labels": body["labels"]}
    if "vocab" in body:
        reply["vocab"] = body["vocab"]
        return vocab.attach(reply, arrays)
    return reply


def assert_rows_equal(a, b):
    Xa, ya = a
    Xb, yb = b
    np.testing.assert_array_equal(ya, yb)
    if isinstance(Xa, SparseRows):
        np.testing.assert_array_equal(Xa.indptr, Xb.indptr)
        np.testing.assert_array_equal(Xa.indices, Xb.indices)
        np.testing.assert_array_equal(Xa.values, Xb.values)
        assert Xa.indices.dtype == Xb.indices.dtype
    else:
        np.testing.assert_array_equal(Xa, Xb)
        assert Xa.dtype == Xb.dtype


@pytest.mark.parametrize("make", FORMATS)
def test_the_statistics_pass_slice_by_slice_equals_one_read(tmp_path, make):
    path, spec, parts, model_cls = files(tmp_path, make)
    for part in parts:
        raw_X, labels = worker.load_partition(spec, path, part)
        expected, expected_arrays = whole_stats(spec, raw_X, labels, model_cls)
        with mock.patch.object(csvfile, "SLICE_BYTES", 300):
            pf = stream.PartitionFile.of(path, part, lambda piece: worker._load_slice(spec, path, piece))
            assert len(pf.slices) >= 4
            counted = stream.Stats(spec["data"], True, model_cls.task)
            stream.scan(pf, counted)
        body, arrays = counted.request()
        assert body.keys() == expected.keys()
        assert body["labels"] == expected["labels"]
        for name in ("vocab",):
            assert body.get(name) == expected.get(name)
        assert len(arrays) == len(expected_arrays) and all((a == b).all() for a, b in zip(arrays, expected_arrays))
        got, want = body["stats"], expected["stats"]
        assert (got is None) == (want is None)
        if got is not None:
            assert set(got) == set(want)
            for key in got:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12)
        assert pf.n("train") == part.n_rows and pf.n("val") == 0


@pytest.mark.parametrize("make", FORMATS)
def test_memory_mode_holds_the_compact_arrays_of_one_read(tmp_path, make):
    """Gathered slice by slice into arrays allocated once: the arrays ``prepare`` makes of the whole
    partition, in the compact dtypes (float32 features, uint32 keys, int32 ids)."""
    path, spec, parts, model_cls = files(tmp_path, make)
    for part in parts:
        raw_X, labels = worker.load_partition(spec, path, part)
        reply = reply_of(*whole_stats(spec, raw_X, labels, model_cls))
        classes = classes_for(model_cls.task, reply["labels"], model_cls.kind)
        prep = worker.prepare(raw_X, labels, classes, reply, spec, model_cls.task)

        def compact(X, y):
            p = worker.prepare(X, y, classes, reply, spec, model_cls.task)
            return p.X, p.y

        with mock.patch.object(csvfile, "SLICE_BYTES", 300):
            pf = stream.PartitionFile.of(path, part, lambda piece: worker._load_slice(spec, path, piece))
            stream.scan(pf, None)
            got = stream.gather(pf, "train", compact)
        assert_rows_equal(got, (prep.X, prep.y))
        if isinstance(prep.X, SparseRows):
            assert prep.X.indices.dtype == np.uint32
        elif model_cls is MF:
            assert prep.X.dtype == np.int32 and prep.y.dtype == np.float32
        else:
            assert prep.X.dtype == np.float32
        size = stream.estimate_bytes(pf, "train", (prep.X[:0], prep.y[:0]))
        assert size == stream.compact_bytes(*got)


@pytest.mark.parametrize("make", [dense, multiclass, rated])
def test_held_out_rows_of_one_slice_are_the_whole_partition_split(tmp_path, make):
    path, spec, parts, model_cls = files(tmp_path, make)
    stratify = model_cls.task != "regression"
    for part in parts:
        raw_X, labels = worker.load_partition(spec, path, part)
        expected = worker.split_rows(raw_X, labels, 0.25, 7, part.index, stratify)
        hold = stream.HoldOut(0.25, 7 * 1_000_003 + part.index, stratify)
        pf = stream.PartitionFile.of(path, part, lambda piece: worker._load_slice(spec, path, piece), hold)
        assert len(pf.slices) == 1
        stream.scan(pf, None)
        got = pf.rows(0)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [dense, multiclass])
def test_held_out_rows_slice_by_slice_keep_each_class_share(tmp_path, make):
    """Over many slices, each label value holds out round(fraction x its count), as one split of
    the partition does, and the same rows every time the partition is read."""
    path, spec, parts, model_cls = files(tmp_path, make)
    for part in parts:
        _, labels = worker.load_partition(spec, path, part)
        hold = stream.HoldOut(0.3, 11, True)
        with mock.patch.object(csvfile, "SLICE_BYTES", 200):
            pf = stream.PartitionFile.of(path, part, lambda piece: worker._load_slice(spec, path, piece), hold)
            assert len(pf.slices) >= 6
            stream.scan(pf, None)
            held = np.concatenate([pf.rows(j)[3] for j in range(len(pf.slices))])
            again = np.concatenate([pf.rows(j)[3] for j in range(len(pf.slices))])
        np.testing.assert_array_equal(held, again)
        for value in np.unique(labels):
            assert (held == value).sum() == round(0.3 * (labels == value).sum())
        assert pf.n("train") + pf.n("val") == part.n_rows


def test_a_window_holding_the_partition_gives_memory_modes_batches():
    for rows in ([0], [5], [30, 0, 17, 40], [1] * 9):
        expected = list(batch_indices(sum(rows), 8, 3, 1, 2, 200))
        got = [b for w in stream_windows(rows, 8, 3, 1, 2, 200, sum(rows)) for b in w.batches]
        assert len(got) == len(expected) and all((a == b).all() for a, b in zip(got, expected))


@pytest.mark.parametrize("window", [1, 8, 25, 60])
def test_shuffle_windows_take_every_row_once_in_the_steps_of_memory_mode(window):
    rows = [30, 0, 17, 40, 9, 22]
    offsets = np.concatenate([[0], np.cumsum(rows)])

    def epoch(seed, epoch_no):
        order, carry = [], np.empty(0, np.int64)
        for w in stream_windows(rows, 8, seed, 4, epoch_no, 200, window):
            ids = np.concatenate([carry, *(np.arange(offsets[j], offsets[j + 1]) for j in w.slices)])
            assert len(ids) <= max(window, 8) + max(rows) + 8  # bounded: a window, one slice and a batch's rest
            order.append([ids[b] for b in w.batches])
            carry = ids[w.carry]
        assert not len(carry)
        return [b for batches in order for b in batches]

    batches = epoch(5, 1)
    assert [len(b) for b in batches] == batch_sizes(sum(rows), 8, 200)
    assert sorted(np.concatenate(batches).tolist()) == list(range(sum(rows)))
    again = epoch(5, 1)
    assert all((a == b).all() for a, b in zip(batches, again))  # deterministic per (seed, partition, epoch)
    other = epoch(5, 2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other))


def test_streamed_epochs_read_the_partition_in_bounded_windows(tmp_path):
    path, spec, parts, model_cls = files(tmp_path, dense)
    part = parts[0]
    raw_X, labels = worker.load_partition(spec, path, part)
    reply = reply_of(*whole_stats(spec, raw_X, labels, model_cls))
    classes = sorted(set(labels.tolist()))

    def compact(X, y):
        p = worker.prepare(X, y, classes, reply, spec, model_cls.task)
        return p.X, p.y

    whole = worker.prepare(raw_X, labels, classes, reply, spec, model_cls.task)
    with mock.patch.object(csvfile, "SLICE_BYTES", 300):
        pf = stream.PartitionFile.of(path, part, lambda piece: worker._load_slice(spec, path, piece))
        stream.scan(pf, None)
        rows = stream.StreamRows(pf, "train", compact, 30, 0)
        epochs = []
        for _ in range(2):
            ep, got = rows.epoch(0, 16, 1, part.index, part.n_rows), []
            while (batch := ep.next()) is not None:
                got.append(batch)
                assert len(ep.window[1]) <= 30 + max(s.rows for s in pf.train) + 16
            epochs.append(got)
        blocks = list(rows.blocks())
    first, second = epochs
    assert [len(y) for _, y in first] == batch_sizes(part.n_rows, 16, part.n_rows)
    for (Xa, ya), (Xb, yb) in zip(first, second):
        np.testing.assert_array_equal(Xa, Xb)
        np.testing.assert_array_equal(ya, yb)
    # every training row once per epoch: the same multiset of rows as the whole partition
    X = np.concatenate([x for x, _ in first])
    np.testing.assert_array_equal(np.sort(X, axis=0), np.sort(whole.X, axis=0))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in blocks]), whole.X)


def test_choose_mode_by_budget():
    assert stream.choose_mode("auto", 60, 100) == "memory"
    assert stream.choose_mode("auto", 70, 100) == "stream"
    assert stream.choose_mode("memory", 10**9, 1) == "memory"
    assert stream.choose_mode("stream", 1, 10**9) == "stream"


@pytest.mark.parametrize("text,expected", [("64MB", 64 << 20), ("2GiB", 2 << 30), ("1.5g", int(1.5 * (1 << 30))), ("1048576", 1 << 20), ("512 KiB", None)])
def test_sizes(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="at least 1MB"):
            stream.parse_size(text)
    else:
        assert stream.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "64 XB", "-5MB", "1e9"])
def test_a_bad_size_is_one_sentence(text):
    with pytest.raises(ValueError, match="^--worker-memory must be a size such as 64MB"):
        stream.parse_size(text)
