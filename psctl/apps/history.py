"""A training job's history, kept in the model file (``meta["history"]``), and its picture.

:func:`from_events` turns the events the driver relayed (``apps/train.py``'s ``_follow``) into
plain JSON values: one entry per epoch (training loss and metric, held-out loss and metric
when there is a held-out set, rows, seconds since the job was submitted, samples/s over that
epoch, and the staleness the shards' clock gate answered that epoch's pulls with, as
``{clocks behind: steps}``), and the events that changed the job's course (a worker or
shard lost, a replacement, a rollback to a checkpoint, a resume, early stopping), each with
the last epoch finished when it happened.

:func:`figure` draws it with matplotlib's object API (a ``Figure``, no pyplot state and no
display): loss and metric per epoch for training and held-out rows, samples/s, and the
staleness histogram, with the events marked. matplotlib is the optional ``plot`` extra.
"""

from __future__ import annotations

from typing import Any

from psctl.errors import UsageError

PLOT_EXTRA = "pip install 'psctl[plot]'"
#: Events that change a job's course, as the plot names them.
MARKED = {
    "worker_lost": "worker lost",
    "worker_restarted": "new worker process",
    "replacement_joined": "lost partition resumed",
    "take_over": "lost partition taken over",
    "shard_lost": "shard lost, rolled back",
    "shard_recovered": "shard recovered",
    "rewind": "rolled back",
    "resuming": "resumed",
    "early_stop": "early stop",
    "converged": "converged",
}
#: The one figure per task the metric panel shows (summarize's names).
MAIN_METRIC = {"regression": "rmse", "binary": "accuracy", "classes": "accuracy"}


def from_events(events: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """The history of a job from its driver's events (each with ``since_submit_s``)."""
    epochs: dict[int, dict[str, Any]] = {}
    marks: list[dict[str, Any]] = []
    last_epoch, last_at = 0, 0.0  # epochs finished so far (1-based numbering), and when
    for event in events:
        kind = event.get("kind")
        at = float(event.get("since_submit_s", 0.0))
        if kind == "epoch":
            n = int(event["epoch"]) + 1
            entry: dict[str, Any] = {"epoch": n, "loss": event["loss"], "metrics": dict(event.get("metrics", {})),
                                     "samples": event["samples"], "seconds": round(at, 4)}  # fmt: skip
            span = at - last_at
            entry["samples_per_s"] = event["samples"] / span if span > 0 else None
            if "val" in event:
                entry["val_loss"] = event["val"]["loss"]
                entry["val_metrics"] = dict(event["val"].get("metrics", {}))
            if "staleness" in event:
                entry["staleness"] = dict(event["staleness"])
            epochs[n] = entry  # an epoch reported again (after a rollback) replaces the first report
            last_epoch, last_at = max(last_epoch, n), at
        elif kind in MARKED or (kind == "worker_joined" and event.get("replacing")):
            if kind == "worker_joined":  # a replacement registered: a new process, or a survivor's second partition
                kind = "take_over" if event.get("takeover") else "replacement_joined"
            mark = {"kind": kind, "after_epoch": last_epoch, "seconds": round(at, 4)}
            for key in ("worker_id", "partition", "index", "clock", "epoch", "reason"):
                if key in event:
                    mark[key] = event[key]
            marks.append(mark)
    return {"task": task, "metric": MAIN_METRIC.get(task, "accuracy"), "epochs": [epochs[n] for n in sorted(epochs)],
            "events": marks}  # fmt: skip


def staleness_totals(history: dict[str, Any]) -> dict[int, int]:
    """Steps per clocks behind, over every epoch."""
    total: dict[int, int] = {}
    for entry in history.get("epochs", []):
        for behind, steps in (entry.get("staleness") or {}).items():
            total[int(behind)] = total.get(int(behind), 0) + int(steps)
    return dict(sorted(total.items()))


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"plotting needs matplotlib, which is not installed; run: {PLOT_EXTRA}") from None
    matplotlib.use("Agg", force=False)  # files only: never a window
    from matplotlib.figure import Figure

    return Figure


def check_available() -> None:
    """UsageError naming the pip install when matplotlib is missing."""
    _matplotlib()


def model_meta(path: str) -> dict[str, Any]:
    """A model file's meta (its ``history`` included); ModelFileError for anything else."""
    from psctl.files import modelfile

    return modelfile.load_model(path)[1]


def figure(history: dict[str, Any], title: str = "") -> Any:
    """A matplotlib Figure of ``history``: four panels (loss, metric, samples/s, staleness)."""
    if not history or not history.get("epochs"):
        raise UsageError("the model has no training history to plot (models trained before psctl kept one have none)")
    Figure = _matplotlib()
    fig = Figure(figsize=(10, 7), layout="constrained")
    if title:
        fig.suptitle(title)
    loss_ax, metric_ax, rate_ax, stale_ax = fig.subplots(2, 2).flat
    rows = history["epochs"]
    x = [e["epoch"] for e in rows]
    metric = history.get("metric", "accuracy")

    loss_ax.plot(x, [e["loss"] for e in rows], marker="o", label="training")
    metric_ax.plot(x, [e["metrics"].get(metric) for e in rows], marker="o", label="training")
    if any("val_loss" in e for e in rows):
        held = [e for e in rows if "val_loss" in e]
        loss_ax.plot([e["epoch"] for e in held], [e["val_loss"] for e in held], marker="s", label="held-out")
        metric_ax.plot([e["epoch"] for e in held], [e["val_metrics"].get(metric) for e in held], marker="s", label="held-out")
    loss_ax.set(title="loss per epoch", xlabel="epoch", ylabel="loss")
    metric_ax.set(title=f"{metric} per epoch", xlabel="epoch", ylabel=metric)
    rated = [e for e in rows if e.get("samples_per_s")]
    rate_ax.plot([e["epoch"] for e in rated], [e["samples_per_s"] for e in rated], marker="o", label="samples/s")
    rate_ax.set(title="samples/s per epoch", xlabel="epoch", ylabel="samples/s")
    rate_ax.set_ylim(bottom=0)

    totals = staleness_totals(history)
    stale_ax.bar([str(k) for k in totals], list(totals.values()), label="steps")
    stale_ax.set(title="staleness at the clock gate", xlabel="clocks the slowest worker was behind", ylabel="steps")

    seen: set[str] = set()
    for mark in history.get("events", []):
        label = MARKED.get(mark["kind"], mark["kind"])
        at = mark["after_epoch"] + 0.5  # between the epoch it followed and the next
        for ax in (loss_ax, metric_ax, rate_ax):
            ax.axvline(at, color="tab:red", linestyle="--", linewidth=1, label=None if label in seen else label)
        seen.add(label)
    for ax in (loss_ax, metric_ax, rate_ax):
        ax.legend(loc="best", fontsize="small")
    return fig


def save(history: dict[str, Any], path: str, title: str = "") -> None:
    """Write :func:`figure` of ``history`` to ``path`` (the format from its suffix: .png, .svg, .pdf)."""
    fig = figure(history, title)
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot write the plot to '{path}': {exc}") from None
