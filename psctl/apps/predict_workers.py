"""The worker process of ``psctl predict --workers N``: ``python -m psctl.apps.predict_workers FOLDER K``.

It reads the task the parent left in FOLDER (JSON), reads only byte range K of the data
file, applies the same pure step as one process (``predict.read_rows``, then
``predict.evaluate_rows``), and leaves its per-row arrays (``.npy``, no pickle) and, when
the parent writes a predictions file, its rows of that file in FOLDER. See
``predict.predict_spread`` for the parent's side and why files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

from psctl.apps import predict as P
from psctl.data import csvfile
from psctl.errors import PsctlError


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


def work(folder: Path, k: int) -> None:
    """Predict partition ``k`` of the task in ``folder``; write its result files there."""
    task = json.loads((folder / P.TASK_FILE).read_text())
    pred = P.load_predictor(task["model_path"], task["model_class"])
    plan = P.InputPlan.from_dict(task["plan"])
    part = csvfile.Partition.from_dict(task["partitions"][k])
    rows = P.read_rows(pred, plan, task["data_path"], part)
    evaluated = P.evaluate_rows(pred, rows, task["cold_start"])
    if task["write_rows"]:
        mine = P.combine(pred, [evaluated], plan, task["cold_start"], scored=False)
        with open(folder / f"{k}.rows.csv", "w", newline="") as fh:
            P.write_prediction_rows(mine, fh)
    P.save_part(evaluated, folder, k)


def main(argv: list[str] | None = None) -> int:
    folder, k = (sys.argv[1:] if argv is None else argv)[:2]
    _watch_parent(Path(folder))
    try:
        work(Path(folder), int(k))
    except PsctlError as exc:
        (Path(folder) / f"{k}.error.json").write_text(json.dumps({"message": str(exc), "exit_code": exc.exit_code}))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
