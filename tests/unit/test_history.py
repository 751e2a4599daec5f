"""The training history kept in model files, and its picture (checked on the Figure, not pixels)."""

from __future__ import annotations

import pytest

from psctl.apps import history
from psctl.core.reports import count_dicts, merge_reports, pool
from psctl.errors import UsageError

pytestmark = pytest.mark.timeout(60)


def epoch(n: int, at: float, loss: float, acc: float, stale: dict[str, int], val: float | None = None) -> dict:
    event = {"kind": "epoch", "epoch": n, "loss": loss, "metrics": {"accuracy": acc}, "samples": 100,
             "staleness": stale, "since_submit_s": at}  # fmt: skip
    if val is not None:
        event["val"] = {"loss": val, "metrics": {"accuracy": acc - 0.1}, "samples": 20}
    return event


EVENTS = [
    {"kind": "submitted", "job_id": "1-1", "since_submit_s": 0.0},
    epoch(0, 2.0, 0.9, 0.6, {"0": 3, "2": 1}, val=1.0),
    {"kind": "worker_lost", "worker_id": 3, "reason": "no heartbeat", "at_s": 9.9, "since_submit_s": 2.5},
    {"kind": "worker_restarted", "replacing": 3, "restarts": 1, "since_submit_s": 2.6},
    {"kind": "worker_joined", "replacing": 3, "takeover": False, "partition": 1, "since_submit_s": 3.0},
    epoch(1, 3.0, 0.5, 0.8, {"0": 2, "1": 2}, val=0.7),
    {"kind": "checkpoint", "clock": 8, "since_submit_s": 3.1},
    epoch(1, 4.0, 0.45, 0.82, {"0": 4}, val=0.65),  # epoch 2 reported again after a rollback
    epoch(2, 4.5, 0.3, 0.9, {"0": 4}, val=0.6),
]


def test_from_events_keeps_every_epoch_once_and_the_events_that_changed_the_course():
    h = history.from_events(EVENTS, "binary")
    assert h["metric"] == "accuracy" and [e["epoch"] for e in h["epochs"]] == [1, 2, 3]
    first, second, third = h["epochs"]
    assert (first["loss"], first["val_loss"], first["metrics"], first["staleness"]) == (0.9, 1.0, {"accuracy": 0.6}, {"0": 3, "2": 1})
    assert first["samples_per_s"] == pytest.approx(100 / 2.0) and first["seconds"] == 2.0
    assert second["loss"] == 0.45  # the later report of epoch 2 replaces the first
    assert third["samples_per_s"] == pytest.approx(100 / 0.5)
    assert [(m["kind"], m["after_epoch"]) for m in h["events"]] == [
        ("worker_lost", 1), ("worker_restarted", 1), ("replacement_joined", 1)]
    assert h["events"][0]["worker_id"] == 3 and h["events"][0]["seconds"] == 2.5  # not the coordinator's at_s
    assert history.staleness_totals(h) == {0: 11, 2: 1}  # the replaced report of epoch 2 is not counted
    assert history.from_events([], "regression") == {"task": "regression", "metric": "rmse", "epochs": [], "events": []}


def test_the_figure_has_the_series_and_the_marks():
    fig = history.figure(history.from_events(EVENTS, "binary"), "logreg model m.npz")
    loss_ax, metric_ax, rate_ax, stale_ax = fig.axes
    assert fig.get_suptitle() == "logreg model m.npz"
    assert [ax.get_title() for ax in fig.axes] == [
        "loss per epoch", "accuracy per epoch", "samples/s per epoch", "staleness at the clock gate"]
    train, held = loss_ax.get_lines()[:2]
    assert list(train.get_xdata()) == [1, 2, 3] and list(train.get_ydata()) == [0.9, 0.45, 0.3]
    assert list(held.get_ydata()) == [1.0, 0.65, 0.6]
    assert list(metric_ax.get_lines()[0].get_ydata()) == [0.6, 0.82, 0.9]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "training", "held-out", "worker lost", "new worker process", "lost partition resumed"]
    marks = [line for line in rate_ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in marks] == [1.5, 1.5, 1.5]  # after epoch 1
    bars = stale_ax.patches
    assert [b.get_height() for b in bars] == [11, 1]
    assert [t.get_text() for t in stale_ax.get_xticklabels()] == ["0", "2"]


def test_saving_writes_an_image_and_a_model_without_history_is_one_sentence(tmp_path):
    h = history.from_events(EVENTS, "binary")
    history.save(h, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history.save(h, str(tmp_path / "c.svg"))
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]
    with pytest.raises(UsageError, match="the model has no training history to plot"):
        history.figure({})
    with pytest.raises(UsageError, match="cannot write the plot to"):
        history.save(h, str(tmp_path / "no" / "such" / "c.png"))


def test_staleness_counts_pool_exactly_and_bad_ones_are_refused():
    a = {"loss_sum": 1.0, "n": 2, "sums": {"correct": 1}, "staleness": {"0": 3, "10": 1}}
    b = {"loss_sum": 3.0, "n": 2, "sums": {"correct": 2}, "staleness": {"2": 2, "0": 1}}
    assert pool([a, b])["staleness"] == {"0": 4, "2": 2, "10": 1}  # numeric order
    assert merge_reports(a, b)["staleness"] == {"0": 4, "2": 2, "10": 1}
    assert "staleness" not in pool([{"loss_sum": 1.0, "n": 1}])  # workers from before it was reported
    for bad in ({"x": 1}, {"0": -1}, {"0": 1.5}, {"0": True}, {"-1": 2}, [1, 2]):
        with pytest.raises(ValueError):
            count_dicts([bad])
