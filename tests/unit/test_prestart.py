"""Which commands start the embedded cluster's fork server before the CLI imports itself
(psctl/cli/__init__.py, psctl/cluster/prestart.py), and the environment it gets."""

from __future__ import annotations

import pytest

from psctl.cli import starts_embedded_cluster
from psctl.cluster import prestart
from psctl.protocol import handshake


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        (["train", "logreg", "data.csv"], True),
        (["train", "logreg", "data.csv", "--workers", "8", "--epochs", "1"], True),
        (["train", "logreg", "data.csv", "--label", "--server"], False),  # a value is not told from a flag
        (["train", "logreg", "data.csv", "--server", "host:7000"], False),
        (["train", "logreg", "data.csv", "--server=host:7000", "--local-workers", "2"], False),
        (["train", "--help"], False),
        (["train", "logreg", "data.csv", "-h"], False),
        (["predict", "model.npz", "data.csv"], False),
        (["server"], False),
        ([], False),
    ],
)
def test_only_a_train_without_a_server_starts_a_cluster(args, starts):
    assert starts_embedded_cluster(args) is starts


def test_the_children_get_the_environment_without_the_secret(monkeypatch):
    assert prestart.SECRET_ENV == handshake.SECRET_ENV
    monkeypatch.setenv(handshake.SECRET_ENV, "s3cret")
    monkeypatch.setenv("PSCTL_SOMETHING", "kept")
    env = prestart.child_env()
    assert handshake.SECRET_ENV not in env and env["PSCTL_SOMETHING"] == "kept"


def test_the_children_compute_with_one_blas_thread_unless_the_environment_says_otherwise(monkeypatch):
    for name in prestart.ONE_THREAD:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    env = prestart.child_env()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "2"


def test_psctl_forkserver_0_starts_none(monkeypatch):
    monkeypatch.setenv(prestart.FORKSERVER_ENV, "0")
    assert not prestart.enabled()
    assert prestart.start_early() is None
