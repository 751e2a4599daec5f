"""The psctl command line: parse, build a config, call the library, render."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:  # imported where a command draws them: `psctl train` in a pipe never does
    from rich.progress import Progress
    from rich.table import Table

from psctl.apps import runtime
from psctl.errors import Interrupted, PsctlError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="psctl: a parameter server for machine learning.",
)


def _console(stderr: bool = False) -> Console:
    """A console that wraps lines at the terminal's width on a terminal, and never in a pipe or file
    (a log or a program reads whole lines there). No emoji codes: psctl prints none, and rich's
    table of them costs 20-40 ms to load at the first line printed."""
    console = Console(stderr=stderr, emoji=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True, emoji=False)
    return console


PIPE_WIDTH = 1 << 16  # "no wrapping": tables are only as wide as their cells
out = _console()
err = _console(stderr=True)

MaxFrame = typer.Option(runtime.DEFAULT_MAX_FRAME_BYTES, "--max-frame-bytes", help="Largest frame accepted from a peer.")


def _typer_option(option: runtime.Option) -> Any:
    return typer.Option(option.default, option.flag, help=option.help)


def _security_options(serving: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the security flags; it receives them built into ``security: runtime.Security``.

    ``serving`` adds the flags that matter only to a process that listens.
    One table of flags (runtime.SECURITY_OPTIONS, shared with the child processes),
    so every command spells and documents them the same way.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        flags = [o for o in runtime.SECURITY_OPTIONS if serving or not o.serving_only]
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != "security"]
        params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=_typer_option(o), annotation=o.annotation)
                   for o in flags]  # fmt: skip

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {o.name: kwargs.pop(o.name) for o in flags}
            try:
                security = runtime.build_security(**values)
            except PsctlError as exc:
                err.print(f"psctl: error: {exc}", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            return command(*args, security=security, **kwargs)

        del wrapper.__wrapped__  # typer reads the signature below, not the command's
        wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a command's coroutine; one sentence and a non-zero exit for every user-facing error."""
    try:
        return runtime.run(main)
    except Interrupted as exc:
        err.print(f"psctl: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("psctl: interrupted; every process it started has been stopped")
        raise typer.Exit(130) from None


def _steps_or_seconds(text: str, option: str) -> tuple[int, float]:
    """'200' -> 200 steps; '30s' or '5m' -> seconds (one of the two is 0)."""
    value = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(value[-1:]) if value else None
    try:
        if scale is None:
            steps = int(value)
            if steps >= 0:
                return steps, 0.0
        else:
            seconds = float(value[:-1]) * scale
            if seconds > 0:
                return 0, seconds
    except ValueError:
        pass
    err.print(f"psctl: error: {option} takes a number of steps (200) or of seconds (30s, 5m); got '{text}'", markup=False)
    raise typer.Exit(2)


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())


# -- train --------------------------------------------------------------------
@app.command()
@_security_options(serving=True)
def train(
    model: str = typer.Argument(..., help="logreg, softmax, svm, linreg, mf, or a class as package.module:Class."),
    data: str = typer.Argument(..., help="Training data (CSV or LIBSVM; for mf a ratings CSV: user, item, rating)."),
    workers: int = typer.Option(8, "--workers", "-w", help="Number of workers."),
    shards: int | None = typer.Option(None, "--shards", help="Shard processes of the embedded cluster (default 2)."),
    server: str | None = typer.Option(None, "--server", help="HOST:PORT of a running psctl server."),
    local_workers: int | None = typer.Option(
        None, "--local-workers", help="With --server: workers to start here (the rest join with 'psctl worker')."
    ),
    mode: str = typer.Option("sync", "--mode", help="sync, async or ssp."),
    staleness: int = typer.Option(0, "--staleness", help="Bound on clock lag in ssp mode."),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Passes over the data (default: the model's, 20 or 10, ending once the loss stops falling)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per step and worker (default: the model's, 16 or 512)."),
    lr: float | None = typer.Option(
        None, "--lr", help="Learning rate of the shards' optimizer (FTRL's alpha); default 0.1 (svm with no optimizer option: 0.3), adam 0.01, ftrl 0.1."
    ),
    lr_decay: float = typer.Option(0.0, "--lr-decay", help="Step size lr / (1 + lr_decay * t), t = updates applied."),
    loss: str | None = typer.Option(None, "--loss", help="linreg: squared (default) or huber."),
    huber_delta: float | None = typer.Option(None, "--huber-delta", help="linreg with --loss huber: the delta."),
    validate: str | None = typer.Option(None, "--validate", help="Held-out CSV, evaluated every epoch."),
    test_split: float = typer.Option(0.0, "--test-split", help="Hold out this fraction of the rows (stratified for classifiers)."),
    patience: int = typer.Option(0, "--patience", help="Stop after N epochs without a better held-out loss; keep the best weights."),
    partition_mode: str = typer.Option(
        "auto", "--partition-mode",
        help="How a worker holds its rows: memory (whole, compact), stream (read from the file every epoch), or auto by --worker-memory.",
    ),
    worker_memory: str | None = typer.Option(
        None, "--worker-memory", help="Each worker's memory budget for its rows, as in 64MB or 2GiB (default: half this host's memory / local workers)."
    ),
    min_shard_bytes: str | None = typer.Option(
        None, "--min-shard-bytes",
        help="Split the model over one shard per this many bytes of its tables, as in 1MB (0: over every shard; default 256KB).",
    ),
    max_restarts: int = typer.Option(3, "--max-restarts", help="Replace up to N lost local worker processes."),
    checkpoint_dir: str | None = typer.Option(None, "--checkpoint-dir", help="Folder for shard checkpoints (shared by all shards)."),
    checkpoint_every: str = typer.Option(
        "0", "--checkpoint-every", help="Checkpoint every N steps of the slowest worker, or every N seconds as in 30s (or 5m)."
    ),
    resume: str | None = typer.Option(None, "--resume", help="Continue a stopped job from the checkpoint in this folder."),
    keep: str | None = typer.Option(
        None, "--keep", help="With --server: leave the trained model on the server's shards under this name (psctl models)."
    ),
    replace: bool = typer.Option(False, "--replace", help="With --keep: replace a model kept under that name at the job's end."),
    resume_from: str | None = typer.Option(
        None, "--resume-from", help="With --server: train the model kept under this name further, in place, while it is served."
    ),
    heartbeat_interval_s: float = typer.Option(0.5, "--heartbeat-interval-s", help="How often workers report they are alive."),
    failure_timeout_s: float = typer.Option(5.0, "--failure-timeout-s", help="A worker silent this long is declared lost."),
    rank: int | None = typer.Option(None, "--rank", help="mf: factors per user and item (default 10)."),
    user_col: str = typer.Option("userId", "--user-col", help="mf: the user id column (name or index)."),
    item_col: str = typer.Option("movieId", "--item-col", help="mf: the item id column (name or index)."),
    rating_col: str = typer.Option("rating", "--rating-col", help="mf: the rating column (name or index)."),
    l2: float | None = typer.Option(
        None, "--l2", help="L2 regularization strength (with ftrl: FTRL's L2); default: the model's, 0.001 or mf 0.1."
    ),
    optimizer: str | None = typer.Option(
        None, "--optimizer",
        help="The shards' update rule: sgd, adagrad, adam or ftrl. Default: the model's tuned defaults (adagrad); "
        "with --optimizer, --lr or --lr-decay given: sgd, batch 32, 10 epochs, no L2, as in psctl 0.1.",
    ),
    l1: float = typer.Option(0.0, "--l1", help="FTRL's L1 strength: larger gives fewer non-zero weights."),
    save_optimizer_state: bool = typer.Option(
        False, "--save-optimizer-state", help="Also store the optimizer's per-key state in the model file."
    ),
    data_format: str = typer.Option(
        "auto", "--format", help="csv, libsvm or parquet; detected from the file by default (.parquet or a folder of them: parquet)."
    ),
    delimiter: str | None = typer.Option(None, "--delimiter", help="CSV: the cell separator, one character or 'tab' (default ',')."),
    index_base: int | None = typer.Option(None, "--index-base", help="LIBSVM: 0- or 1-based indices (default: detected)."),
    n_features: int | None = typer.Option(
        None, "--n-features", help="LIBSVM: the feature count, when the file does not show the largest index."
    ),
    hash_bits: int | None = typer.Option(None, "--hash-bits", help="CSV: hash into 2^B keys (default 24 with --categorical)."),
    categorical: list[str] | None = typer.Option(
        None, "--categorical", help="CSV: columns to hash as categories (repeatable or comma-separated)."
    ),
    seed: int = typer.Option(0, "--seed"),
    label: str | None = typer.Option(None, "--label", help="Label column (name or index); default 'label' or the first."),
    drop: list[str] | None = typer.Option(None, "--drop", help="Columns to ignore (names or indices, repeatable or comma-separated)."),
    no_header: bool = typer.Option(False, "--no-header", help="The CSV has no header row."),
    no_standardize: bool = typer.Option(False, "--no-standardize", help="Do not standardize features."),
    out_path: str = typer.Option("model.npz", "--out", "-o", help="Where to write the model."),
    model_class: str | None = typer.Option(None, "--model-class", help="Train your own model class (pkg.module:Class) instead of MODEL."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (progress goes to stderr)."),
    plot: str | None = typer.Option(None, "--plot", help="Also draw the training curves to this image (.png, .svg, .pdf; the plot extra)."),
    max_frame_bytes: int = MaxFrame,
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Train a model on the parameter server (an embedded cluster unless --server is given)."""
    from psctl.apps.train import StopRequest, TrainConfig, result_summary
    from psctl.apps.train import train as run_train

    if plot is not None:
        _check_plot_path(plot)  # before training: a missing extra or folder is not found out at the end
    if shards is not None and server is not None:
        _usage("--shards is for the embedded cluster; a running server (--server) has its own shards")
    every_steps, every_s = _steps_or_seconds(checkpoint_every, "--checkpoint-every")
    cfg = TrainConfig(
        model=model_class or model,
        data=data,
        workers=workers,
        **({} if shards is None else {"shards": shards}),
        server=server,
        local_workers=local_workers,
        mode=mode,
        staleness=staleness,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_decay=lr_decay,
        validate=validate,
        test_split=test_split,
        patience=patience,
        partition_mode=partition_mode,
        worker_memory=worker_memory,
        min_shard_bytes=min_shard_bytes,
        heartbeat_interval_s=heartbeat_interval_s,
        max_restarts=max_restarts,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=every_steps,
        checkpoint_every_s=every_s,
        resume=resume,
        keep=keep,
        replace=replace,
        resume_from=resume_from,
        failure_timeout_s=failure_timeout_s,
        model_params={k: v for k, v in (("loss", loss), ("huber_delta", huber_delta), ("rank", rank)) if v is not None},
        l2=l2,
        seed=seed,
        label=label,
        drop=_split(drop),
        has_header=not no_header,
        standardize=not no_standardize,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        out=out_path,
        max_frame_bytes=max_frame_bytes,
        format=data_format,
        delimiter=delimiter,
        index_base=index_base,
        n_features=n_features,
        hash_bits=hash_bits,
        categorical=_split(categorical),
        optimizer=optimizer,
        l1=l1,
        save_optimizer_state=save_optimizer_state,
        security=security,
    )
    view = _TrainView(cfg.epochs, console=err if as_json else out)

    async def main() -> Any:
        stop = StopRequest()
        runtime.on_signal(stop.signal)
        return await run_train(cfg, view.on_event, stop)

    try:
        result = _run(main)
    finally:
        view.close()
    if plot is not None:
        _save_plot(result.meta, plot, result.model_path)
    if as_json:
        print(json.dumps(result_summary(result), indent=2), flush=True)
        return
    m = result.metrics
    out.print(
        f"done: mode {cfg.mode}, {cfg.workers} workers, {m['seconds']:.2f} s; "
        f"train loss {m['train_loss']:.4f}, {_figures(m, prefix='train_')} "
        f"over {m['samples']} rows; model written to {result.model_path}",
        highlight=False,
    )
    if "best_epoch" in m:
        weights = "the best epoch's" if m["weights_from_epoch"] != "last" else "the last epoch's"
        out.print(f"best held-out loss {m['best_val_loss']:.4f} at epoch {m['best_epoch'] + 1}; saved {weights} weights", highlight=False)
    epochs_run = len(result.meta.get("history", {}).get("epochs", [])) or cfg.epochs or 1
    out.print(f"rows trained: {m['rows_trained']} ({m['rows_trained'] / epochs_run:.0f} per epoch)", highlight=False)
    if result.meta.get("model_params", {}).get("sparse"):
        for line in _sparse_lines(m):  # its own traffic line: against a dense model of the key space
            out.print(line, highlight=False)
    elif "traffic" in m:
        out.print(_traffic(m["traffic"]), highlight=False)
    if m["lost_workers"]:
        out.print(f"warning: workers lost during training: {m['lost_workers']}", highlight=False)


def _check_plot_path(path: str) -> None:
    from psctl.apps import history

    try:
        history.check_available()
    except PsctlError as exc:
        _usage(str(exc))
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        _usage(f"--plot/--out '{path}': give a .png, .svg or .pdf file")
    if Path(path).is_dir() or not Path(path).absolute().parent.is_dir():
        _usage(f"--plot/--out '{path}' is a folder or in a folder that does not exist")


def _save_plot(meta: dict[str, Any], path: str, model_path: str) -> None:
    from psctl.apps import history

    try:
        history.save(meta.get("history") or {}, path, f"{meta.get('kind')} model {Path(model_path).name}")
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    err.print(f"training curves drawn to {path}", highlight=False)


@app.command()
def plot(
    model_path: str = typer.Argument(..., help="A model file written by 'psctl train'."),
    out_path: str = typer.Option("curves.png", "--out", "-o", help="The image to write (.png, .svg or .pdf)."),
    as_json: bool = typer.Option(False, "--json", help="Print the history (per epoch, and the events) as JSON instead."),
) -> None:
    """Draw a model's training curves: loss and metric per epoch (training, held-out), samples/s, staleness, events."""
    from psctl.apps import history

    if not as_json:
        _check_plot_path(out_path)
    try:
        meta = history.model_meta(model_path)
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        print(json.dumps(meta.get("history") or {}, indent=2), flush=True)
        return
    _save_plot(meta, out_path, model_path)


def _traffic(t: dict[str, float]) -> str:
    share = t["pulled_per_epoch"] / t["dense_per_epoch"] if t["dense_per_epoch"] else float("nan")
    return (
        f"traffic per epoch: pulled {_si_bytes(t['pulled_per_epoch'])}, pushed {_si_bytes(t['pushed_per_epoch'])}; "
        f"pulling whole tables at each of the {t['steps_per_epoch']} steps would be {_si_bytes(t['dense_per_epoch'])} "
        f"(pulled {share:.1%} of that)"
    )


def _si_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.3g} TB"


def _sparse_lines(m: dict[str, Any]) -> list[str]:
    """Keys, weights, shard memory and traffic of a sparse model."""
    per_shard = ", ".join(str(k) for k in m["shard_keys"])
    return [
        f"keys: {m['unique_keys']} unique of a {m['key_space']}-key space (per shard: {per_shard}); "
        f"non-zero weights: {m['nonzero_weights']}",
        f"shard memory: tables {', '.join(_si_bytes(b) for b in m['shard_table_bytes'])}; "
        f"process peak RSS {', '.join(_si_bytes(b) for b in m['shard_peak_rss_bytes'])}",
        f"traffic per epoch: pulled {_si_bytes(m['bytes_pulled_per_epoch'])}, pushed {_si_bytes(m['bytes_pushed_per_epoch'])}; "
        f"a dense model of the same key space: {_si_bytes(m['dense_bytes_per_epoch'])} each way",
    ]


def _figures(metrics: dict[str, Any], prefix: str = "") -> str:
    """'accuracy 0.9731' or 'rmse 0.41 mae 0.32' from a metrics dict."""
    names = [n for n in ("accuracy", "rmse", "mae") if prefix + n in metrics]
    label = prefix.replace("_", " ")
    return " ".join(f"{label}{n} {metrics[prefix + n]:.4f}" for n in names)


class _TrainView:
    """Renders driver events: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, epochs: int | None, console: Console):
        self.epochs = epochs or 0  # None: the model's default, known at the "planned" event
        self.console = console
        self.interactive = console.is_terminal
        self.clocks: dict[int, int] = {}
        self.samples = 0  # from progress reports (the bar)
        self.epoch_samples = 0  # from completed epochs (the per-epoch lines)
        self.loss = float("nan")
        self.started = time.monotonic()
        self.progress: Progress | None = None
        self.task: Any = None
        self.n_shards = 0  # the server's shards, from the "submitted" event

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "planned":
            self.epochs = event.get("epochs") or self.epochs
            features = "features from the data" if event["features"] is None else f"{event['features']} features"
            self._plain(f"planned: {event['rows']} rows, {features}, {event['workers']} workers")
            if self.interactive:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.progress = Progress(
                    TextColumn("[bold]training"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total} steps"),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                )
                self.progress.start()
                self.task = self.progress.add_task("train", total=event["steps"], info="starting")
        elif kind == "cluster_up":
            self._note(f"cluster up in {event['seconds']:.2f} s at {event['address']}")
        elif kind == "kept":
            n = len(event["shards"])
            self._note(f"model kept on the server as {event['name']} (version {event['version']}, {n} shard{'s' * (n != 1)})")
        elif kind == "submitted":
            self.started = time.monotonic()
            self.n_shards = len(event["shards"])
            self._note(f"job {event['job_id']} on {self.n_shards} shards")
        elif kind == "placed":
            if event["shards"] < self.n_shards:
                self._note(f"tables of {_bytes(event['bytes'])} on {event['shards']} of the {self.n_shards} shards (--min-shard-bytes)")
        elif kind == "progress":
            self.clocks[event["worker_id"]] = event["clock"]
            self.samples += event["samples"]
            if event["samples"]:
                self.loss = event["loss_sum"] / event["samples"]
            self._update(f"epoch {event['epoch'] + 1}/{self.epochs}")
        elif kind == "epoch":
            self.epoch_samples += event["samples"]
            line = f"epoch {event['epoch'] + 1}/{self.epochs}: loss {event['loss']:.4f} {_figures(event['metrics'])}"
            if "val" in event:
                line += f" | held-out loss {event['val']['loss']:.4f} {_figures(event['val']['metrics'])}"
            line += f" | samples/s {self._rate(self.epoch_samples):.0f}"
            if self.progress is not None:
                self.progress.console.print(line, highlight=False)
            self._plain(line)
        elif kind == "shard_lost":
            msg = f"warning: {event['reason']}; rolling back to the checkpoint at clock {event['clock']}"
            self._note(msg)
        elif kind == "shard_recovered":
            msg = f"shard {event['index']} recovered from clock {event['clock']}; {event['replayed_steps']} steps replayed"
            self._note(msg)
        elif kind == "checkpoint":
            self._note(f"checkpoint at clock {event['clock']}")
        elif kind == "checkpoint_failed":
            from psctl.apps.results import checkpoint_failed_line

            self._note(f"warning: {checkpoint_failed_line(event)}", err)
        elif kind == "halting":
            self._note(f"stopping: every worker stops at one clock and the shards save a final checkpoint in "
                       f"'{event['dir']}' (Ctrl-C again to stop at once)", err)
        elif kind == "resuming":
            self.epochs = event.get("epochs", self.epochs)  # the checkpoint's job's (or more, if given)
            applied = "".join(f"; applying {a}" for a in event.get("applied", []))
            self._note(f"resuming from the checkpoint at clock {event['clock']} in {event['dir']}{applied}")
        elif kind == "worker_joined" and event.get("replacing"):
            how = "a surviving worker process took over" if event.get("takeover") else "a new worker took"
            msg = (f"{how} lost partition {event['partition']} from clock {event['start_clock']} "
                   f"(worker {event['worker_id']}, pid {event['pid']} on {event['host']})")
            self._note(msg)
        elif kind == "worker_restarted":
            instead = (f"worker {event['replacing']}" if event.get("replacing") is not None
                       else f"worker process {event.get('process')}, which exited before it registered")
            msg = f"started a new worker process in place of {instead} (restart {event['restarts']})"
            self._note(msg)
        elif kind == "converged":
            msg = (f"converged after epoch {event['epoch'] + 1}: the training loss fell by less than {event['tol']:g} "
                   f"in {event['epochs']} epochs (give --epochs N to train exactly N)")
            self._note(msg)
        elif kind == "early_stop":
            msg = f"early stop after epoch {event['epoch'] + 1}: best held-out loss at epoch {event['best_epoch'] + 1}"
            self._note(msg)
        elif kind == "worker_lost":
            msg = f"warning: worker {event['worker_id']} lost after {event['at_s']:.1f} s ({event.get('reason', 'gone')})"
            self._note(msg, err)
        elif kind == "done":
            self._plain(f"trained: loss {event['loss']:.4f} {_figures(event['metrics'])}")

    def _note(self, msg: str, console: Console | None = None) -> None:
        """A line that must show now, on a terminal (above the progress bar) as in a pipe."""
        console = self.progress.console if self.progress else console or self.console
        console.print(msg, highlight=False, markup=False)
        console.file.flush()

    def _rate(self, samples: int) -> float:
        return samples / max(time.monotonic() - self.started, 1e-9)

    def _update(self, where: str) -> None:
        if self.progress is not None:
            info = f"{where} loss {self.loss:.4f} {self._rate(self.samples):,.0f} samples/s"
            self.progress.update(self.task, completed=sum(self.clocks.values()), info=info)

    def _plain(self, line: str) -> None:
        """A line for a log (on a terminal the progress bar shows it)."""
        if not self.interactive:
            print(line, file=self.console.file, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# -- predict ------------------------------------------------------------------
@app.command()
@_security_options(serving=False)
def predict(
    model_path: str = typer.Argument(..., help="A model file written by 'psctl train', or with --server a kept model's name."),
    data: str | None = typer.Argument(None, help="Data in the model's format: CSV with its feature columns (label optional), or LIBSVM."),
    out_path: str | None = typer.Option(None, "--out", "-o", help="Write per-row predictions to this CSV."),
    model_class: str | None = typer.Option(None, "--model-class", help="Allow loading a model of this user class."),
    cold_start: str | None = typer.Option(
        None, "--cold-start", help="mf: rows with an unseen user or item: nan (default), drop, or mean (global mean + known bias)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-w", help="Spread the file over this many worker processes (each reads only its byte range); same output as one."
    ),
    failure_timeout_s: float | None = typer.Option(
        None, "--failure-timeout-s", help="With --workers: a worker silent this long (stopped, hung) ends the command [default: 5.0]."
    ),
    delimiter: str | None = typer.Option(
        None, "--delimiter", help="CSV: the cell separator, one character or 'tab' (default: the training file's)."
    ),
    user: str | None = typer.Option(None, "--user", "-u", help="mf: predict one rating, of this user (with --item), without a data file."),
    item: str | None = typer.Option(None, "--item", "-i", help="mf: the item of the one rating --user asks for."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (rows, metrics, ...) as one JSON object."),
    server: str | None = typer.Option(
        None, "--server", help="HOST:PORT of a psctl server: MODEL names a model kept there (psctl train --keep)."
    ),
    max_frame_bytes: int = MaxFrame,
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Apply a model file (or a model kept on a server) to data; print metrics when the data has labels (mf: or one rating, --user U --item I)."""
    from psctl.apps.predict import predict as run_predict
    from psctl.apps.predict import predict_one, prediction_summary

    pulled = None
    if server is not None and (user is not None or item is not None):
        _usage("--user/--item read a model file; with --server give a data file of (user, item) rows")
    if server is not None and workers is None and failure_timeout_s is not None:
        _usage("--failure-timeout-s is how long a silent predict worker is waited for; it needs --workers N")
    if user is not None or item is not None:
        if user is None or item is None:
            _usage("--user and --item go together: give both for one rating")
        if data is not None or out_path or workers is not None or failure_timeout_s is not None:
            _usage("--user/--item predict one rating without a data file; leave out the data file, --out, --workers and --failure-timeout-s")
        try:
            one = predict_one(model_path, user, item, model_class, cold_start)
        except PsctlError as exc:
            err.print(f"psctl: error: {exc}", markup=False, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        if as_json:
            from psctl.apps.results import json_safe

            print(json.dumps(json_safe(one), indent=2), flush=True)
        else:
            out.print(f"{one['predicted_rating']:.4f}", highlight=False)
        return
    if delimiter is not None and server is not None:
        _usage("--delimiter is for a model file's prediction; a kept model reads its training file's delimiter")
    if data is None:
        _usage("give a data file to predict (or, for an mf model, --user U --item I for one rating)")
    try:
        if server is None:
            pred = run_predict(model_path, data, model_class, cold_start, workers=workers, out=out_path,
                               failure_timeout_s=failure_timeout_s, delimiter=delimiter)  # fmt: skip
        elif workers is not None:
            from psctl.apps import kept

            pred, pulled = kept.predict_spread(
                server, model_path, data, workers, model_class_path=model_class, cold_start=cold_start, out=out_path,
                failure_timeout_s=failure_timeout_s, security=security, max_frame_bytes=max_frame_bytes,
            )  # fmt: skip
        else:
            from psctl.apps import kept
            from psctl.apps.predict import check_predictions_path, write_predictions

            if out_path:
                check_predictions_path(out_path)
            pred, pulled = runtime.run(lambda: kept.predict(server, model_path, data, model_class_path=model_class,
                                                            cold_start=cold_start, security=security,
                                                            max_frame_bytes=max_frame_bytes))  # fmt: skip
            if out_path:
                write_predictions(pred, out_path)
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        summary = prediction_summary(pred, model_path, data, out_path)
        if pulled is not None:
            summary["server"], summary["pulled"] = server, pulled
        print(json.dumps(summary, indent=2), flush=True)
        return
    if pulled is not None:
        out.print(f"read {pulled['keys_pulled']} keys ({_bytes(pulled['bytes_pulled'])}) of model {model_path} from {server}",
                  highlight=False)  # fmt: skip
    unknown = getattr(pred, "unknown", None)
    if unknown and unknown["occurrences"]:
        out.print(
            f"ignored {unknown['occurrences']} occurrences of {unknown['features']} features "
            "the model has no weight for (weight 0)",
            highlight=False,
        )
    if pred.metrics is None:
        out.print(f"{len(pred.predicted)} rows predicted (no label column, so no metrics)")
    else:
        out.print(f"{pred.meta['kind']} model {model_path} on {data}:", highlight=False)
        from rich.table import Table

        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in pred.metrics.items():
            if name != "confusion":
                table.add_row(name, f"{value:.0f}" if name == "rows" else f"{value:.4f}")
        out.print(table)
        if "confusion" in pred.metrics:
            out.print(_confusion_table(pred.metrics["confusion"], pred.meta["classes"]))
    if getattr(pred, "cold_start", None) is not None:
        from psctl.apps.recommend import describe_cold_start

        out.print(describe_cold_start(pred.cold_start), highlight=False)
    if out_path:
        out.print(f"predictions written to {out_path}")


@app.command()
def recommend(
    model_path: str = typer.Argument(..., help="An mf model file written by 'psctl train mf'."),
    user: str | None = typer.Option(None, "--user", "-u", help="The user to recommend for (an id from the training data)."),
    top: int = typer.Option(10, "--top", "-k", help="How many items per user."),
    exclude: str | None = typer.Option(None, "--exclude", help="A ratings CSV: leave out the items each user rated there."),
    out_path: str | None = typer.Option(None, "--out", "-o", help="Write the top items of every user to this CSV."),
    as_json: bool = typer.Option(False, "--json", help="With --user: the items as one JSON object."),
) -> None:
    """Top items by predicted rating, for one user (a table) or every user (--out CSV)."""
    from psctl.apps import recommend as rec
    from psctl.apps.results import json_safe

    if as_json and user is None:
        _usage("--json is for --user U; --out FILE writes every user's items as CSV")

    if (user is None) == (out_path is None):
        err.print("psctl: error: give either --user U (one user, as a table) or --out FILE (every user, as CSV)")
        raise typer.Exit(2)
    try:
        rec.check_top(top)
        mf = rec.load_mf(model_path)
        excluded = rec.read_exclusions(mf, exclude) if exclude else None
        if out_path is not None:
            started = time.monotonic()
            rows = rec.recommend_all(mf, top, out_path, excluded)
            out.print(
                f"top {top} items for {len(mf.users)} users ({rows} rows) written to {out_path} "
                f"in {time.monotonic() - started:.2f} s",
                highlight=False,
            )
            return
        assert user is not None
        items = rec.recommend_user(mf, user, top, excluded)
        left_out = rec.rated_count(mf, user, excluded) if excluded is not None else None
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        result = {"model_path": model_path, "user": user, "top": top, "left_out": left_out,
                  "items": [{"rank": r, "item": item, "predicted_rating": score} for r, (item, score) in enumerate(items, 1)]}
        print(json.dumps(json_safe(result), indent=2), flush=True)
        return
    from rich.table import Table

    table = Table(title=f"top {top} items for {mf.user_col} {user}")
    table.add_column("rank", justify="right")
    table.add_column(mf.item_col)
    table.add_column("predicted rating", justify="right")
    for rank, (item, score) in enumerate(items, 1):
        table.add_row(str(rank), item, f"{score:.3f}")
    out.print(table)
    if excluded is not None:
        out.print(f"left out the {left_out} items {user} rated in {exclude}", highlight=False)


def _confusion_table(cm: Any, classes: list[str]) -> Table:
    from rich.table import Table

    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("true \\ predicted")
    for c in classes:
        table.add_column(c, justify="right")
    for c, row in zip(classes, cm):
        table.add_row(c, *(str(int(v)) for v in row))
    return table


# -- serve --------------------------------------------------------------------
_SECURITY_HELP = {o.name: o.help for o in runtime.SECURITY_OPTIONS}


@app.command()
def serve(
    models: list[str] = typer.Argument(..., help="Model files to serve, each named by its file stem, or NAME=path (with --server: kept models, NAME or ALIAS=NAME)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a token or --insecure)."),
    port: int = typer.Option(8501, "--port", help="Port to listen on (0: any free port; 8501 is TensorFlow Serving's REST port)."),
    token_file: str | None = typer.Option(
        None, "--token-file", help="File (mode 600) with the bearer token clients must send; default $PSCTL_SERVE_TOKEN."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Serve beyond loopback without a token (trusted networks only)."),
    tls_cert: str | None = typer.Option(None, "--tls-cert", help=_SECURITY_HELP["tls_cert"]),
    tls_key: str | None = typer.Option(None, "--tls-key", help=_SECURITY_HELP["tls_key"]),
    model_class: str | None = typer.Option(None, "--model-class", help="Allow loading models of this user class."),
    max_rows: int = typer.Option(10_000, "--max-rows", help="Instances one request may hold."),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", help="Largest request body."),
    max_connections: int = typer.Option(1024, "--max-connections", help="Connections held at once; one more is told 503."),
    idle_timeout_s: float = typer.Option(15.0, "--idle-timeout-s", help="Seconds a connection may go without a complete request."),
    request_timeout_s: float = typer.Option(10.0, "--request-timeout-s", help="Seconds a request's body has to arrive."),
    server: str | None = typer.Option(
        None, "--server", help="HOST:PORT of a psctl server: serve the models kept there (MODELS are kept names, NAME or ALIAS=NAME)."
    ),
    refresh_s: float | None = typer.Option(
        None, "--refresh-s", help="With --server: seconds between reads of the weights (default 1; a request's weights are at most this plus one read old)."
    ),
    secret_file: str | None = typer.Option(None, "--secret-file", help="With --server: " + _SECURITY_HELP["secret_file"]),
    tls_ca: str | None = typer.Option(None, "--tls-ca", help="With --server: " + _SECURITY_HELP["tls_ca"]),
    handshake_timeout_s: float | None = typer.Option(None, "--handshake-timeout-s", help="With --server: " + _SECURITY_HELP["handshake_timeout_s"]),
) -> None:
    """Answer prediction requests over HTTP (TensorFlow Serving's REST shape) for model files, or for models kept on a server."""
    from psctl.apps import serve as srv
    from psctl.apps.serving import parse_kept_args, parse_model_args

    if server is None and any(v is not None for v in (refresh_s, secret_file, tls_ca, handshake_timeout_s)):
        _usage("--refresh-s, --secret-file, --tls-ca and --handshake-timeout-s are for serving kept models; give --server HOST:PORT")
    try:
        named = parse_model_args(models) if server is None else parse_kept_args(models)
        client = {"secret_file": secret_file, "tls_ca": tls_ca}
        if handshake_timeout_s is not None:
            client["handshake_timeout_s"] = handshake_timeout_s
        server_security = runtime.build_security(**client) if server is not None else runtime.LOCAL
    except PsctlError as exc:
        _usage(str(exc))
    cfg = srv.ServeConfig(
        models=named, host=host, port=port, token_file=token_file, insecure=insecure, tls_cert=tls_cert, tls_key=tls_key,
        model_class=model_class, max_rows=max_rows, max_body_bytes=max_body_bytes, max_connections=max_connections,
        idle_timeout_s=idle_timeout_s, request_timeout_s=request_timeout_s, server=server,
        refresh_s=srv.DEFAULT_REFRESH_S if refresh_s is None else refresh_s, server_security=server_security,
    )  # fmt: skip
    _run(lambda: srv.run(cfg, _line))


# -- cluster roles ------------------------------------------------------------
@app.command()
@_security_options(serving=True)
def server(
    shards: int = typer.Option(2, "--shards", help="Shard processes to start on this host."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a secret)."),
    port: int = typer.Option(0, "--port", help="Coordinator port (0: any free port)."),
    coordinator: str | None = typer.Option(None, "--coordinator", help="Join this coordinator instead of starting one."),
    failure_timeout_s: float | None = typer.Option(
        None, "--failure-timeout-s", help="Between jobs: a shard silent this long is declared lost and restarted [default: 5.0]."
    ),
    max_frame_bytes: int = MaxFrame,
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Run a coordinator and N shard processes (or only shards, joining --coordinator)."""
    from psctl.apps.server import serve

    _run(lambda: serve(shards, _line, host=host, port=port, coordinator=coordinator, max_frame_bytes=max_frame_bytes,
                       security=security, failure_timeout_s=failure_timeout_s))  # fmt: skip


def _line(text: str) -> None:
    """A line an operator or a script waits for (an address): printed and flushed at once."""
    print(text, flush=True)


@app.command("coordinator")
@_security_options(serving=True)
def coordinator_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a secret)."),
    port: int = typer.Option(0, "--port"),
    failure_timeout_s: float | None = typer.Option(
        None, "--failure-timeout-s", help="Between jobs: a shard silent this long is declared lost [default: 5.0]."
    ),
    max_frame_bytes: int = MaxFrame,
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Run the coordinator alone (shards join with 'psctl server --coordinator' or 'psctl shard')."""
    from psctl.apps.server import run_coordinator

    _run(lambda: run_coordinator(_line, host=host, port=port, max_frame_bytes=max_frame_bytes, security=security,
                                 failure_timeout_s=failure_timeout_s))  # fmt: skip


@app.command()
@_security_options(serving=True)
def shard(
    coordinator: str = typer.Option(..., "--coordinator", help="HOST:PORT of the coordinator."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a secret)."),
    port: int = typer.Option(0, "--port"),
    advertise_host: str | None = typer.Option(None, "--advertise-host", help="Address workers should use for this shard."),
    max_frame_bytes: int = MaxFrame,
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Run one shard that joins a coordinator."""
    from psctl.apps.server import run_shard

    try:
        code = run_shard(coordinator, host=host, port=port, advertise_host=advertise_host,
                         max_frame_bytes=max_frame_bytes, security=security)  # fmt: skip
    except PsctlError as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command()
@_security_options(serving=False)
def worker(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of the coordinator."),
    data: str | None = typer.Option(None, "--data", help="Path of the job's data on this host, if it differs."),
    model_class: list[str] | None = typer.Option(None, "--model-class", help="Allow jobs of this user model class (pkg.module:Class)."),
    max_frame_bytes: int = MaxFrame,
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Join the next job of a running server as one worker."""
    from psctl.apps.server import run_worker

    report = _run(lambda: run_worker(server_address, data=data, model_classes=model_class, max_frame_bytes=max_frame_bytes,
                                     security=security))  # fmt: skip
    out.print(f"worker done: {report['n']} rows, final loss {report['loss_sum'] / max(report['n'], 1):.4f}", highlight=False)


@app.command()
@_security_options(serving=False)
def status(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of the coordinator."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C."),
    interval_s: float = typer.Option(1.0, "--interval-s", help="Refresh interval with --watch."),
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Show the shards, the workers and the running job of a server."""
    from psctl.apps import status as st

    if as_json and watch:
        _usage("--json prints one status; use it without --watch")
    if not interval_s > 0:
        _usage("--interval-s must be positive")
    if as_json:
        print(json.dumps(_run(lambda: st.fetch(server_address, security)), indent=2))
        return
    if not watch:
        out.print(_status_view(_run(lambda: st.fetch(server_address, security)), server_address))
        return

    async def loop() -> None:
        from rich.live import Live

        stop = runtime.on_signal()
        if out.is_terminal:
            with Live(console=out, auto_refresh=False) as live:
                await st.watch(server_address, lambda body: live.update(_status_view(body, server_address), refresh=True),
                               stop, interval_s, security)  # fmt: skip
        else:  # a pipe or a file: each refresh in full, one after the other
            def show(body: dict[str, Any]) -> None:
                out.print(f"-- {time.strftime('%H:%M:%S')}", highlight=False)
                out.print(_status_view(body, server_address))
                out.file.flush()

            await st.watch(server_address, show, stop, interval_s, security)

    _run(loop)


@app.command()
@_security_options(serving=False)
def health(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of a coordinator or a shard."),
    role: str = typer.Option("any", "--role", help="What must answer there: coordinator, shard (registered with its coordinator) or any."),
    timeout_s: float = typer.Option(5.0, "--timeout-s", help="Seconds for the whole check: connection, handshake and answer."),
    min_shards: int = typer.Option(0, "--min-shards", help="A coordinator is healthy only with at least this many shards registered."),
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """Exit 0 when the psctl coordinator or shard at --server answers (a readiness or liveness probe); else one sentence."""
    from psctl.apps import health as hl

    found = _run(lambda: hl.probe(server_address, role, security, timeout_s, min_shards))
    out.print(f"psctl {found.role} at {found.address} is up: {found.summary}", highlight=False, markup=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def start(
    ctx: typer.Context,
    wait_s: float | None = typer.Option(
        None, "--wait-s", envvar="PSCTL_WAIT_S", help="Wait up to this many seconds for the role's coordinator to answer before starting."
    ),
    min_shards: int = typer.Option(
        0, "--min-shards", envvar="PSCTL_MIN_SHARDS", help="With --wait-s: wait until the coordinator has this many shards registered."
    ),
) -> None:
    """Run the role $PSCTL_ROLE names (coordinator, shard, server, worker or train); each of its flags may be
    given as PSCTL_<FLAG> (--secret-file: PSCTL_SECRET_FILE), the rest of the command line goes to the role."""
    from psctl.apps import health as hl
    from psctl.apps import start as rules

    try:
        role = rules.role_from_env(os.environ)
        name = rules.ROLES[role][0]
        command = typer.main.get_command(app).commands[name]  # typer builds fresh objects: setting envvar here stays here
        flags = []
        for param in command.params:
            flag = max(param.opts, key=len) if param.param_type_name == "option" else str(param.name)
            param.envvar = rules.flag_envvar(flag)
            flags.append(flag)
        rules.check_variables(role, os.environ, flags)
    except PsctlError as exc:
        _fail(exc)
    run_role = command.callback
    assert run_role is not None

    def wait_then_run(**params: Any) -> Any:
        """The role's own command, once its coordinator answers (with --wait-s)."""
        try:
            address = rules.wait_target(role, params, wait_s, min_shards)
            if address is not None:
                security = runtime.build_security(**{o.name: params[o.name] for o in runtime.SECURITY_OPTIONS if o.name in params})
                assert wait_s is not None
                up = _run(lambda: hl.wait_until_up(address, "coordinator", security, wait_s, min_shards=min_shards,
                                                   on_waiting=lambda why: _line(f"psctl: waiting up to {wait_s:g} s for the coordinator at {address} ({why})")))
                _line(f"psctl: the coordinator at {address} is up ({up.summary}); starting psctl {name}")
        except PsctlError as exc:
            _fail(exc)
        return run_role(**params)

    command.callback = wait_then_run
    # Parsing errors of the role's flags (or of their variables) are shown as the role's own command shows them.
    command.main(args=list(ctx.args), prog_name=f"psctl {name}")


@app.command()
@_security_options(serving=False)
def models(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of the coordinator."),
    drop: str | None = typer.Option(None, "--drop", help="Free the model kept under this name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    security: runtime.Security = runtime.LOCAL,
) -> None:
    """List the models kept on a server (psctl train --keep), or free one with --drop."""
    from psctl.apps import kept

    if drop is not None:
        body = _run(lambda: kept.drop_model(server_address, drop, security))
        if as_json:
            print(json.dumps(body, indent=2))
        else:
            n = body["freed"]
            out.print(f"dropped model {body['name']}: its parts on {n} shard{'' if n == 1 else 's'} are freed", highlight=False)
        return
    rows = _run(lambda: kept.list_models(server_address, security=security))
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "meta"} for r in rows], indent=2))
        return
    if not rows:
        out.print(f"no models are kept on {server_address}", highlight=False)
        return
    from rich.table import Table

    table = Table(title=f"models kept on {server_address}")
    for col in ("name", "kind", "state", "trained", "keys", "bytes", "per shard (keys)", "metrics"):
        table.add_column(col, justify="right" if col in ("keys", "bytes") else "left")
    for r in rows:
        parts = r["shards"]
        trained = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["trained_at"])) if r.get("trained_at") else "-"
        metrics = r.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
                          and k in ("train_loss", "train_accuracy", "train_rmse", "val_loss", "val_accuracy", "val_auc", "val_rmse"))
        table.add_row(
            r["name"], str(r.get("kind")), r["state"] + (f" ({r['reason']})" if r.get("reason") else ""), trained,
            str(sum(p.get("keys", 0) for p in parts)), _bytes(sum(p.get("bytes", 0) for p in parts)),
            " ".join(str(p.get("keys", "-")) for p in parts), shown or "-",
        )
    out.print(table)


def _fail(exc: PsctlError) -> None:
    """Refuse with the error's sentence and its exit code."""
    err.print(f"psctl: error: {exc}", markup=False, highlight=False)
    raise typer.Exit(exc.exit_code) from None


def _usage(sentence: str) -> None:
    """Refuse the command line: one sentence and the usage exit code (2)."""
    err.print(f"psctl: error: {sentence}", markup=False, highlight=False)
    raise typer.Exit(2)


def _status_view(body: dict[str, Any], address: str) -> Any:
    from rich.console import Group
    from rich.table import Table

    shards = Table(title=f"psctl server {address}: shards")
    for col in ("shard", "address", "pid", "clock", "keys", "bytes", "updates/s", "samples", "last checkpoint"):
        shards.add_column(col, justify="right" if col not in ("address",) else "left")
    for s in body["shards"]:
        saved = s.get("last_checkpoint")
        shards.add_row(
            str(s["shard_id"]), s["address"], str(s["pid"]), str(s.get("clock", "-")), str(s.get("keys", "-")), _bytes(s.get("bytes")),
            f"{s['updates_s']:.1f}" if "updates_s" in s else "-", str(s.get("samples", "-")),
            "-" if saved is None else f"clock {saved}",
        )
    parts: list[Any] = [shards]
    job = body.get("job")
    if job is None:
        parts.append("no job running")
        return Group(*parts)
    mode = job["mode"] + (f" (staleness {job['staleness']})" if job["mode"] == "ssp" else "")
    parts.append(f"job {job['job_id']}: {job['state']}, mode {mode}, epoch {job['epoch']} of {job['epochs']}")
    workers = Table(title="workers")
    for col in ("worker", "state", "host", "pid", "clock", "lag", "samples/s", "last heartbeat"):
        workers.add_column(col, justify="right")
    fastest = max((w["clock"] for w in job["workers"]), default=0)
    for w in job["workers"]:
        beat = w.get("last_heartbeat_s")
        workers.add_row(
            str(w["worker_id"]), w["state"], str(w["host"]), str(w["pid"]), str(w["clock"]), str(fastest - w["clock"]),
            f"{w.get('samples_s', 0):,.0f}", "-" if beat is None else f"{beat:.1f} s ago",
        )
    parts.append(workers)
    return Group(*parts)


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    # The in-process coordinator logs for operators; people running commands see
    # one-sentence errors instead. PSCTL_LOG=INFO shows everything.
    logging.basicConfig(level=os.environ.get("PSCTL_LOG", "ERROR").upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app()
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(1)
