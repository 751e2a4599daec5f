"""The worker process of ``psctl predict --workers N``: ``python -m psctl.apps.predict_workers FOLDER K``.

It reads the task the parent left in FOLDER (JSON), reads only byte range K of the data
file, applies the same pure step as one process (``predict.read_rows``, then
``predict.evaluate_rows``), and leaves its per-row arrays (``.npy``, no pickle) and, when
the parent writes a predictions file, its rows of that file in FOLDER. See
``predict.predict_spread`` for the parent's side and why files.

While it works it proves it is alive: it writes to stdout (a pipe the parent reads)
every ``heartbeat_interval_s`` of the task, as a training worker sends its heartbeats
(``cluster.session.Heartbeat``) but without a Python thread (see :func:`_beat`), so a
worker that is stopped or frozen is noticed by the parent within its failure timeout.
Only the standard library is imported before the first sign; numpy and the model come
after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from psctl.errors import PsctlError

TASK_FILE = "task.json"  # predict.TASK_FILE, which this process imports only after its first sign of life
#: The first sign of life a worker writes to stdout; any byte there counts as one.
BEAT = b"."


# -- the worker process ------------------------------------------------------------------------
def _watch_parent(folder: Path) -> None:
    """Exit as soon as stdin closes: the parent stopped or died, so nobody waits for the result.
    The task folder goes too: a parent killed with SIGKILL cannot remove it itself."""

    def watch() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked in a buffered
        # reader holds its lock, and the interpreter aborts on it at exit.
        try:
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _beat(interval_s: float) -> None:
    """One sign of life now (so the parent hears this worker before anything slow starts),
    then one byte every ``interval_s`` until the process exits.

    The repeated ones are written by no Python thread: a Python thread needs the
    interpreter's lock, and numpy calls that hold it throughout starve it (np.loadtxt over
    600,000 rows held it 2.7 s on a loaded machine). Instead the kernel sends SIGALRM
    every ``interval_s`` (``setitimer``), and Python's C-level signal handler writes a byte
    to the wakeup fd, here stdout, at once and without the lock (``signal.set_wakeup_fd``,
    the mechanism asyncio uses to wake its loop). A stopped (SIGSTOP) or frozen process
    runs no handler, so it gives no sign. The fd is non-blocking, as set_wakeup_fd needs:
    while the parent is stopped and the pipe is full, a byte is dropped, never waited on.
    faulthandler's watchdog thread, the other way to write without the lock, reads the
    stacks while they change and crashed a worker (SIGSEGV).
    """
    try:
        os.write(1, BEAT)
    except OSError:  # the parent is gone already: _watch_parent ends this process
        return
    os.set_blocking(1, False)
    signal.set_wakeup_fd(1, warn_on_full_buffer=False)
    signal.signal(signal.SIGALRM, lambda signum, frame: None)  # the byte is the point; the handler does nothing
    signal.setitimer(signal.ITIMER_REAL, interval_s, interval_s)


def work(folder: Path, k: int, task: dict, secret: bytes | None = None) -> None:
    """Predict the partitions the task assigns to worker ``k``; write their result files there."""
    from psctl.apps import predict as P  # after the first beat: numpy and the model load slowly
    from psctl.data import csvfile

    plan = P.InputPlan.from_dict(task["plan"])
    lo, hi = task["assign"][k]
    parts = [csvfile.Partition.from_dict(task["partitions"][j]) for j in range(lo, hi)]
    if task.get("server") is None:
        pred = P.load_predictor(task["model_path"], task["model_class"])
        for part in parts:
            _predict_part(P, folder, task, plan, pred, part, P.read_rows(pred, plan, task["data_path"], part))
        return
    _run_quietly(_from_kept(P, folder, k, task, plan, parts, secret))


def _predict_part(P: Any, folder: Path, task: dict, plan: Any, pred: Any, part: Any, rows: Any) -> None:
    evaluated = P.evaluate_rows(pred, rows, task["cold_start"])
    if task["write_rows"]:
        mine = P.combine(pred, [evaluated], plan, task["cold_start"], scored=False)
        with open(folder / f"{part.index}.rows.csv", "w", newline="") as fh:
            P.write_prediction_rows(mine, fh)
    P.save_part(evaluated, folder, part.index)


async def _from_kept(P: Any, folder: Path, k: int, task: dict, plan: Any, parts: list, secret: bytes | None) -> None:
    """The partitions of a model kept on a server: for each, read its rows, pull what they touch
    from the shards (this worker's own connections), and predict them. Reading and predicting
    run in a thread, so the loop goes on serving the connections meanwhile."""
    import asyncio

    from psctl import net
    from psctl.apps import kept

    where = task["server"]
    security = net.Security(
        secret=secret, tls=net.TlsConfig(ca=where["tls_ca"]) if where["tls"] else None,
        handshake_timeout_s=where["handshake_timeout_s"], idle_timeout_s=where["idle_timeout_s"],
    )  # fmt: skip
    async with await kept.KeptModel.open(where["address"], task["model_path"], model_class_path=task["model_class"],
                                         security=security, max_frame_bytes=where["max_frame_bytes"]) as model:  # fmt: skip
        pred = await kept.base_predictor(model)
        for part in parts:
            rows = await asyncio.to_thread(P.read_rows, pred, plan, task["data_path"], part)
            batch = await kept.batch_predictor(model, pred, rows)
            await asyncio.to_thread(_predict_part, P, folder, task, plan, batch, part, rows)
        (folder / f"{k}.pulled.json").write_text(json.dumps(model.counters()))


def _run_quietly(main: Any) -> None:
    """Run ``main`` on a plain selector event loop. Not uvloop, nor anything that registers
    signal handlers: they would take the wakeup fd, which is this process's heartbeat."""
    import asyncio

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder, k = args[:2]
    _watch_parent(Path(folder))
    task = json.loads((Path(folder) / TASK_FILE).read_text())
    _beat(float(task["heartbeat_interval_s"]))
    try:
        secret = None
        if len(args) > 2:  # the cluster's secret, down an inherited pipe (read after the first sign: psctl.net loads numpy)
            from psctl.net.security import read_secret_fd

            secret = read_secret_fd(int(args[2]))
        work(Path(folder), int(k), task, secret)
    except PsctlError as exc:
        (Path(folder) / f"{k}.error.json").write_text(json.dumps({"message": str(exc), "exit_code": exc.exit_code}))
        return exc.exit_code
    finally:
        # No more beats: the interpreter restores SIGALRM's default (terminate) as it exits.
        signal.setitimer(signal.ITIMER_REAL, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
