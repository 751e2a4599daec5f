"""The psctl command line: parse, build a config, call the library, render."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from psctl import auth, net
from psctl.errors import PsctlError
from psctl.wire import DEFAULT_MAX_FRAME_BYTES, MsgType

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="psctl: a parameter server for machine learning.",
)
out = Console()
err = Console(stderr=True)

MaxFrame = typer.Option(DEFAULT_MAX_FRAME_BYTES, "--max-frame-bytes", help="Largest frame accepted from a peer.")

# The security flags: (name, type, option, serving roles only).
_SECURITY_FLAGS: list[tuple[str, Any, Any, bool]] = [
    ("secret_file", str | None, typer.Option(
        None, "--secret-file", help=f"File (mode 600) with the cluster's shared secret; default ${auth.SECRET_ENV}."), False),
    ("insecure", bool, typer.Option(
        False, "--insecure", help="Allow listening beyond loopback without a secret (trusted networks only)."), True),
    ("tls_cert", str | None, typer.Option(
        None, "--tls-cert", help="TLS certificate this process presents when it serves (PEM)."), True),
    ("tls_key", str | None, typer.Option(None, "--tls-key", help="Private key of --tls-cert (PEM)."), True),
    ("tls_ca", str | None, typer.Option(
        None, "--tls-ca", help="CA certificates trusted when connecting with TLS (PEM); default: the system's."), False),
    ("handshake_timeout_s", float, typer.Option(
        net.DEFAULT_HANDSHAKE_TIMEOUT_S, "--handshake-timeout-s",
        help="Seconds a new connection has to authenticate (or, without a secret, send a first frame)."), False),
    ("idle_timeout_s", float, typer.Option(
        net.DEFAULT_IDLE_TIMEOUT_S, "--idle-timeout-s",
        help="Seconds a peer may go silent in the middle of a frame before it is dropped."), False),
    ("max_connections", int, typer.Option(
        net.DEFAULT_MAX_CONNECTIONS, "--max-connections", help="Connections a serving process holds at once."), True),
    ("max_keys_per_request", int, typer.Option(
        net.DEFAULT_MAX_KEYS_PER_REQUEST, "--max-keys-per-request", help="Keys one pull or push may name."), True),
]  # fmt: skip


def _security_options(serving: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the security flags; it receives them built into ``security: net.Security``.

    ``serving`` adds the flags that matter only to a process that listens.
    One list of flags, so every command spells and documents them the same way.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        flags = [f for f in _SECURITY_FLAGS if serving or not f[3]]
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != "security"]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
                   for name, kind, opt, _ in flags]  # fmt: skip

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name, *_ in flags}
            try:
                security = _build_security(**values)
            except PsctlError as exc:
                err.print(f"psctl: error: {exc}", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            return command(*args, security=security, **kwargs)

        del wrapper.__wrapped__  # typer reads the signature below, not the command's
        wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _build_security(
    secret_file: str | None = None,
    insecure: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    handshake_timeout_s: float = net.DEFAULT_HANDSHAKE_TIMEOUT_S,
    idle_timeout_s: float = net.DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int = net.DEFAULT_MAX_CONNECTIONS,
    max_keys_per_request: int = net.DEFAULT_MAX_KEYS_PER_REQUEST,
) -> net.Security:
    tls = auth.TlsConfig(tls_cert, tls_key, tls_ca) if tls_cert or tls_key or tls_ca else None
    return net.Security(
        secret=auth.load_secret(secret_file),
        tls=tls,
        insecure=insecure,
        handshake_timeout_s=handshake_timeout_s,
        idle_timeout_s=idle_timeout_s,
        max_connections=max_connections,
        max_keys_per_request=max_keys_per_request,
    )


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a command's coroutine; one sentence and a non-zero exit for every user-facing error."""
    try:
        return net.run(main)
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("psctl: interrupted; every process it started has been stopped")
        raise typer.Exit(130) from None


def _on_signal() -> asyncio.Event:
    """An event SIGINT or SIGTERM sets. The handlers are in place when this returns, so
    call it before announcing an address: a signal right after must not interrupt."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())


# -- train --------------------------------------------------------------------
@app.command()
@_security_options(serving=True)
def train(
    model: str = typer.Argument(..., help="Model kind: logreg."),
    data: str = typer.Argument(..., help="Training data (CSV)."),
    workers: int = typer.Option(8, "--workers", "-w", help="Number of workers."),
    shards: int = typer.Option(2, "--shards", help="Shard processes of the embedded cluster."),
    server: str | None = typer.Option(None, "--server", help="HOST:PORT of a running psctl server."),
    local_workers: int | None = typer.Option(
        None, "--local-workers", help="With --server: workers to start here (the rest join with 'psctl worker')."
    ),
    mode: str = typer.Option("sync", "--mode", help="sync, async or ssp."),
    staleness: int = typer.Option(0, "--staleness", help="Bound on clock lag in ssp mode."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(0.1, "--lr", help="Learning rate of the shards' SGD."),
    l2: float = typer.Option(0.0, "--l2", help="L2 regularization strength."),
    seed: int = typer.Option(0, "--seed"),
    label: str | None = typer.Option(None, "--label", help="Label column (name or index); default 'label' or the first."),
    drop: list[str] | None = typer.Option(None, "--drop", help="Columns to ignore (names or indices, repeatable or comma-separated)."),
    no_header: bool = typer.Option(False, "--no-header", help="The CSV has no header row."),
    no_standardize: bool = typer.Option(False, "--no-standardize", help="Do not standardize features."),
    out_path: str = typer.Option("model.npz", "--out", "-o", help="Where to write the model."),
    max_frame_bytes: int = MaxFrame,
    security: net.Security = net.LOCAL,
) -> None:
    """Train a model on the parameter server (an embedded cluster unless --server is given)."""
    from psctl.train import TrainConfig
    from psctl.train import train as run_train

    cfg = TrainConfig(
        model=model,
        data=data,
        workers=workers,
        shards=shards,
        server=server,
        local_workers=local_workers,
        mode=mode,
        staleness=staleness,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        l2=l2,
        seed=seed,
        label=label,
        drop=_split(drop),
        has_header=not no_header,
        standardize=not no_standardize,
        out=out_path,
        max_frame_bytes=max_frame_bytes,
        security=security,
    )
    view = _TrainView(cfg.epochs, interactive=out.is_terminal)
    try:
        result = _run(lambda: run_train(cfg, view.on_event))
    finally:
        view.close()
    m = result.metrics
    out.print(
        f"done: mode {cfg.mode}, {cfg.workers} workers, {m['seconds']:.2f} s; "
        f"train loss {m['train_loss']:.4f}, train accuracy {m['train_accuracy']:.4f} "
        f"over {m['samples']} rows; model written to {result.model_path}",
        highlight=False,
    )
    if m["lost_workers"]:
        out.print(f"warning: workers lost during training: {m['lost_workers']}", highlight=False)


class _TrainView:
    """Renders driver events: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, epochs: int, interactive: bool):
        self.epochs = epochs
        self.interactive = interactive
        self.clocks: dict[int, int] = {}
        self.samples = 0  # from progress reports (the bar)
        self.epoch_samples = 0  # from completed epochs (the per-epoch lines)
        self.loss = float("nan")
        self.started = time.monotonic()
        self.progress: Progress | None = None
        self.task: Any = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "planned":
            self._plain(f"planned: {event['rows']} rows, {event['features']} features, {event['workers']} workers")
            if self.interactive:
                self.progress = Progress(
                    TextColumn("[bold]training"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total} steps"),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(),
                    console=out,
                    transient=True,
                )
                self.progress.start()
                self.task = self.progress.add_task("train", total=event["steps"], info="starting")
        elif kind == "cluster_up":
            self._plain(f"cluster up in {event['seconds']:.2f} s at {event['address']}")
        elif kind == "submitted":
            self.started = time.monotonic()
            self._plain(f"job {event['job_id']} on {len(event['shards'])} shards")
        elif kind == "progress":
            self.clocks[event["worker_id"]] = event["clock"]
            self.samples += event["samples"]
            if event["samples"]:
                self.loss = event["loss_sum"] / event["samples"]
            self._update(f"epoch {event['epoch'] + 1}/{self.epochs}")
        elif kind == "epoch":
            self.epoch_samples += event["samples"]
            line = (
                f"epoch {event['epoch'] + 1}/{self.epochs}: loss {event['loss']:.4f} "
                f"accuracy {event['accuracy']:.4f} samples/s {self._rate(self.epoch_samples):.0f}"
            )
            if self.progress is not None:
                self.progress.console.print(line, highlight=False)
            self._plain(line)
        elif kind == "worker_lost":
            msg = f"warning: worker {event['worker_id']} lost after {event['at_s']:.1f} s"
            (self.progress.console if self.progress else err).print(msg, highlight=False)
        elif kind == "done":
            self._plain(f"trained: loss {event['loss']:.4f} accuracy {event['accuracy']:.4f}")

    def _rate(self, samples: int) -> float:
        return samples / max(time.monotonic() - self.started, 1e-9)

    def _update(self, where: str) -> None:
        if self.progress is not None:
            info = f"{where} loss {self.loss:.4f} {self._rate(self.samples):,.0f} samples/s"
            self.progress.update(self.task, completed=sum(self.clocks.values()), info=info)

    def _plain(self, line: str) -> None:
        if not self.interactive:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# -- predict ------------------------------------------------------------------
@app.command()
def predict(
    model_path: str = typer.Argument(..., help="A model file written by 'psctl train'."),
    data: str = typer.Argument(..., help="CSV with the model's feature columns (and optionally the label)."),
    out_path: str | None = typer.Option(None, "--out", "-o", help="Write per-row predictions to this CSV."),
) -> None:
    """Apply a model file to data; print metrics when the data has labels."""
    from psctl.predict import predict as run_predict
    from psctl.predict import write_predictions

    try:
        pred = run_predict(model_path, data)
        if out_path:
            write_predictions(pred, out_path)
    except PsctlError as exc:
        err.print(f"psctl: error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    if pred.metrics is None:
        out.print(f"{len(pred.predicted)} rows predicted (no label column, so no metrics)")
    else:
        out.print(f"{pred.meta['kind']} model {model_path} on {data}:", highlight=False)
        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in pred.metrics.items():
            table.add_row(name, f"{value:.0f}" if name == "rows" else f"{value:.4f}")
        out.print(table)
    if out_path:
        out.print(f"predictions written to {out_path}")


# -- cluster roles ------------------------------------------------------------
@app.command()
@_security_options(serving=True)
def server(
    shards: int = typer.Option(2, "--shards", help="Shard processes to start on this host."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a secret)."),
    port: int = typer.Option(0, "--port", help="Coordinator port (0: any free port)."),
    coordinator: str | None = typer.Option(None, "--coordinator", help="Join this coordinator instead of starting one."),
    max_frame_bytes: int = MaxFrame,
    security: net.Security = net.LOCAL,
) -> None:
    """Run a coordinator and N shard processes (or only shards, joining --coordinator)."""
    from psctl.launch import LocalCluster

    if shards < 1:
        err.print("psctl: error: --shards must be at least 1")
        raise typer.Exit(2)

    async def main() -> None:
        async with LocalCluster(host=host, max_frame_bytes=max_frame_bytes, security=security) as cluster:
            address = coordinator or await cluster.start_coordinator(port)
            shard_addresses = await cluster.start_shards(shards, address)
            signalled = _on_signal()
            if coordinator:
                print(f"psctl: {shards} shards joined the coordinator at {address}: {', '.join(shard_addresses)}", flush=True)
            else:
                print(f"psctl server listening on {address} (coordinator, {shards} shards)", flush=True)
            exits = [asyncio.ensure_future(c.proc.wait()) for c in cluster.children]
            stop = asyncio.ensure_future(signalled.wait())
            done, _ = await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
            for fut in exits:
                fut.cancel()
            if stop not in done:
                stop.cancel()
                raise PsctlError("a shard process exited; stopping the server")
        print("psctl server stopped", flush=True)

    _run(main)


@app.command("coordinator")
@_security_options(serving=True)
def coordinator_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a secret)."),
    port: int = typer.Option(0, "--port"),
    max_frame_bytes: int = MaxFrame,
    security: net.Security = net.LOCAL,
) -> None:
    """Run the coordinator alone (shards join with 'psctl server --coordinator' or 'psctl shard')."""
    from psctl.coordinator import start_coordinator

    async def main() -> None:
        srv, _, address = await start_coordinator(host, port, max_frame_bytes=max_frame_bytes, security=security)
        signalled = _on_signal()
        print(f"psctl coordinator listening on {address}", flush=True)
        try:
            await signalled.wait()
        finally:
            await srv.close()

    _run(main)


@app.command()
@_security_options(serving=True)
def shard(
    coordinator: str = typer.Option(..., "--coordinator", help="HOST:PORT of the coordinator."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback only with a secret)."),
    port: int = typer.Option(0, "--port"),
    advertise_host: str | None = typer.Option(None, "--advertise-host", help="Address workers should use for this shard."),
    max_frame_bytes: int = MaxFrame,
    security: net.Security = net.LOCAL,
) -> None:
    """Run one shard that joins a coordinator."""
    from psctl.child import main as child_main

    args = ["shard", "--coordinator", coordinator, "--host", host, "--port", str(port)]
    if advertise_host:
        args += ["--advertise-host", advertise_host]
    raise typer.Exit(child_main([*args, "--max-frame-bytes", str(max_frame_bytes)], security=security))


@app.command()
@_security_options(serving=False)
def worker(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of the coordinator."),
    data: str | None = typer.Option(None, "--data", help="Path of the job's data on this host, if it differs."),
    max_frame_bytes: int = MaxFrame,
    security: net.Security = net.LOCAL,
) -> None:
    """Join the next job of a running server as one worker."""
    from psctl.worker import Worker

    report = _run(
        lambda: Worker(server_address, max_frame_bytes=max_frame_bytes, data_path=data, security=security).run()
    )
    out.print(f"worker done: {report['n']} rows, {report['correct']} correct with the final model", highlight=False)


@app.command()
@_security_options(serving=False)
def status(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of the coordinator."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    security: net.Security = net.LOCAL,
) -> None:
    """Show the shards and the running job of a server."""

    async def main() -> dict[str, Any]:
        peer = await net.connect(server_address, what="psctl server", security=security)
        try:
            return (await peer.request(MsgType.STATUS, timeout_s=5.0)).body
        finally:
            peer.close()

    body = _run(main)
    if as_json:
        print(json.dumps(body, indent=2))
        return
    table = Table(title=f"psctl server {server_address}")
    for col in ("shard", "address", "pid"):
        table.add_column(col)
    for s in body["shards"]:
        table.add_row(str(s["shard_id"]), s["address"], str(s["pid"]))
    out.print(table)
    job = body.get("job")
    if job is None:
        out.print("no job running")
    else:
        out.print(f"job {job['job_id']}: mode {job['mode']}, {job['state']}")
        wt = Table()
        for col in ("worker", "state", "host", "pid"):
            wt.add_column(col)
        for w in job["workers"]:
            wt.add_row(str(w["worker_id"]), w["state"], str(w["host"]), str(w["pid"]))
        out.print(wt)


def main() -> None:
    # The in-process coordinator logs for operators; people running commands see
    # one-sentence errors instead. PSCTL_LOG=INFO shows everything.
    logging.basicConfig(level=os.environ.get("PSCTL_LOG", "ERROR").upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app()
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(1)
