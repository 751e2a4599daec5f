import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"
# The example models are a few KB: `psctl train` puts such a model on one shard. Tests of a
# job on several shards (a shard killed or stopped, per-shard status and files) spread it
# over every shard, as a model of 256 KB per shard would be.
EVERY_SHARD = ("--min-shard-bytes", "0")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile psctl's modules once, before the tests start psctl processes.

    A run starts about 500 psctl commands and 230 fork servers, each importing psctl. Where
    PYTHONDONTWRITEBYTECODE is set (this project's CI sets it) no process caches what it
    compiled, so each compiled psctl's sources again: about 0.2 s of CPU a process, a
    minute of the suite's time on two cores. Writing the cache here changes no module, and
    leaves an up-to-date one alone; where the folder is read-only nothing is written.
    """
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller did it
        return
    import compileall

    compileall.compile_dir(REPO / "psctl", quiet=2)


def run_psctl(*args: str, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process; output captured as text."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "psctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd or REPO,
        env=env,
    )


def psctl_json(*args: str, timeout_s: float = 120) -> dict:
    """Run ``psctl ARGS --json`` (train or predict) and return its one JSON object; it must succeed."""
    import json

    r = run_psctl(*args, "--json", timeout_s=timeout_s)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def write_logreg_csv(path: Path, rows: int, features: int = 4, seed: int = 0, header: bool = True) -> Path:
    """A learnable binary problem with named columns."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    w = np.linspace(1, -1, features)
    y = (X @ w + 0.1 * rng.normal(size=rows) > 0).astype(int)
    lines = []
    if header:
        lines.append(",".join(["label"] + [f"x{i}" for i in range(features)]))
    for label, row in zip(y, X):
        lines.append(",".join([str(label)] + [repr(float(v)) for v in row]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def logreg_csv(tmp_path: Path) -> Path:
    return write_logreg_csv(tmp_path / "train.csv", rows=300)
