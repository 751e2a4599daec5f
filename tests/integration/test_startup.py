"""Start-up of many workers on the embedded cluster: the handshake timeout bounds a handshake,
not the time the cluster takes to start.

The driver opened its control connection before starting the worker processes and sent
its first frame (SUBMIT) only once all of them were up; with 80 workers that took longer
than the handshake timeout, and the coordinator dropped the silent connection ("connection
... is closed"). Now every connection speaks first at once (a PING, or the handshake).
"""

from __future__ import annotations

import re

import pytest

from ..conftest import EXAMPLES, run_psctl

pytestmark = pytest.mark.integration

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"  # 456 rows


@pytest.mark.timeout(400)
def test_eighty_workers_train_on_the_embedded_cluster(tmp_path):
    out = tmp_path / "m.npz"
    result = run_psctl(
        "train", "logreg", str(TRAIN), "--workers", "80", "--epochs", "2", "--out", str(out), timeout_s=380
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())
    assert (found := re.search(r"rows trained: (\d+)", text)) and int(found.group(1)) == 2 * 456, text[-2000:]
    assert out.exists()
