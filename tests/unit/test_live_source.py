"""psctl serve --server's LiveSource without a server: reads, refreshes, stale weights, a moved
version and unexpected failures, with a stand-in for the kept model's connections."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from psctl.apps import kept
from psctl.data.csvfile import CsvSchema
from psctl.errors import PsctlError
from psctl.models.logreg import LogReg

pytestmark = pytest.mark.timeout(30)

SCHEMA = CsvSchema(("a", "b", "y"), 2, (0, 1), True).to_dict()


class FakeKept:
    """What LiveSource uses of a KeptModel: meta, model, tables, dense(), close()."""

    def __init__(self, server: "FakeServer", version: str):
        self.server, self.name, self.version = server, "bc", version
        self.meta = {"kind": "logreg", "schema": SCHEMA, "label": "y"}
        self.model = LogReg(2, ["no", "yes"])
        self.tables = {"w": {"name": "w", "rows": 3, "dim": 1, "sparse": server.sparse}}
        self.closed = False

    async def dense(self) -> dict[str, np.ndarray]:
        self.server.pulls += 1
        if self.server.failure is not None:
            raise self.server.failure
        if self.version != self.server.version:  # the old version was freed
            raise kept.KeptModelError(f"model 'bc' has no version {self.version} (unknown_model)")
        return {"w": np.array(self.server.weights, dtype=np.float32)}

    def close(self) -> None:
        self.closed = True


class FakeServer:
    def __init__(self, monkeypatch):
        self.version, self.weights, self.failure, self.sparse = "v1", [1.0, 2.0, 0.0], None, False
        self.opened: list[FakeKept] = []
        self.pulls = self.attempts = 0

        async def open_(server, name, **kwargs):
            self.attempts += 1
            if self.failure is not None:
                raise self.failure
            self.opened.append(FakeKept(self, self.version))
            return self.opened[-1]

        monkeypatch.setattr(kept.KeptModel, "open", staticmethod(open_))


def weights_of(source) -> list[float]:
    return source._snap.predictor.params["w"].tolist()


async def until(predicate, what: str, timeout_s: float = 10) -> None:
    """Give the source's refresh task turns until ``predicate()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # the refresh task runs meanwhile (a turn of the loop, not a synchronisation)


async def test_reads_at_start_and_every_refresh_and_follows_a_new_version(monkeypatch):
    server = FakeServer(monkeypatch)
    notices: list[str] = []
    source = kept.LiveSource("bc", "bc", "h:1", refresh_s=0.05, notice=notices.append)
    await source.start()
    try:
        assert weights_of(source) == [1.0, 2.0, 0.0] and source.version == "v1" and not source.stale
        about = source.describe()
        assert (about["kind"], about["model"], about["version"], about["refresh_s"], about["stale"]) == ("server", "bc", "v1", 0.05, False)
        server.weights = [3.0, 2.0, 0.0]  # trained further in place
        await until(lambda: weights_of(source)[0] == 3.0, "the new weights")
        server.version, server.weights = "v2", [5.0, 2.0, 0.0]  # a --resume-from job ended: a new version
        await until(lambda: source.version == "v2", "the new version")
        assert weights_of(source) == [5.0, 2.0, 0.0] and not source.stale and notices == []
        assert server.opened[0].closed  # the old version's connections were let go
    finally:
        await source.close()
    assert server.opened[-1].closed


async def test_a_failing_read_keeps_the_last_weights_marked_stale_and_says_so_once(monkeypatch):
    server = FakeServer(monkeypatch)
    notices: list[str] = []
    source = kept.LiveSource("bc", "bc", "h:1", refresh_s=0.02, notice=notices.append)
    await source.start()
    try:
        before = source.describe()["weights_as_of"]
        server.failure = PsctlError("cannot reach psctl server at h:1: Connection refused")
        await until(lambda: source.stale, "stale")
        attempts = server.attempts
        await until(lambda: server.attempts > attempts + 2, "more tries")  # it goes on trying, reconnecting
        assert weights_of(source) == [1.0, 2.0, 0.0] and source.describe()["weights_as_of"] == before
        assert source.describe()["refresh_error"] == "cannot reach psctl server at h:1: Connection refused"
        assert len(notices) == 1 and "answering with the weights of" in notices[0]
        server.failure = None
        await until(lambda: not source.stale, "a read again")
        assert len(notices) == 2 and "read again" in notices[1] and "refresh_error" not in source.describe()
    finally:
        await source.close()


async def test_an_unexpected_failure_marks_the_source_stale_and_refreshing_goes_on(monkeypatch):
    server = FakeServer(monkeypatch)
    source = kept.LiveSource("bc", "bc", "h:1", refresh_s=0.02, notice=lambda text: None)
    await source.start()
    try:
        server.failure = KeyError("tables")  # an answer psctl does not expect, or a bug
        await until(lambda: source.stale, "stale")
        assert source.describe()["refresh_error"] == "KeyError: 'tables'"
        server.failure = None
        await until(lambda: not source.stale, "a read again")
    finally:
        await source.close()


async def test_start_refuses_a_sparse_model_and_lets_go_of_its_connections(monkeypatch):
    server = FakeServer(monkeypatch)
    server.sparse = True
    source = kept.LiveSource("bc", "bc", "h:1")
    with pytest.raises(kept.KeptModelError, match="is a sparse model; psctl serve answers for dense and mf models"):
        await source.start()
    assert all(k.closed for k in server.opened) and source._task is None


async def test_a_cancel_that_arrives_as_a_read_ends_stops_the_refreshing(monkeypatch):
    """The cancel close() sends can land after a read finished but before the refresh loop
    resumed; on Python 3.11 asyncio.wait_for returned the read's result then and the loop went
    on refreshing forever (close() waited on it: psctl serve would not stop). Deterministic:
    the cancel is queued from inside the read, ahead of the read's own completion."""
    FakeServer(monkeypatch)
    source = kept.LiveSource("bc", "bc", "h:1", refresh_s=0.01, notice=lambda _: None)
    await source.start()
    real, queued = kept.serving.snapshot_of, []

    def snapshot_then_cancel(pred):
        if not queued:
            assert source._task is not None
            asyncio.get_running_loop().call_soon(source._task.cancel)
            queued.append(True)
        return real(pred)

    monkeypatch.setattr(kept.serving, "snapshot_of", snapshot_then_cancel)
    try:
        await until(lambda: source._task is not None and source._task.done(), "the refresh task to end on its cancel")
        assert source._task.cancelled()
    finally:
        await source.close()
