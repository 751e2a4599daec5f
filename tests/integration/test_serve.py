"""psctl serve as a client sees it: a real `psctl serve` process on loopback, a real HTTP client (aiohttp)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import EXAMPLES, psctl_json, run_psctl
from .cluster import write_secret

aiohttp = pytest.importorskip("aiohttp", reason="psctl serve needs the serve extra: pip install -e '.[serve]'")

pytestmark = [pytest.mark.integration]


class ServeProcess:
    """`psctl serve ...` as a real process; its URL is read from its first line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "psctl", "serve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the test's timeout
        if "listening on" not in line:
            code, out, err = self.stop()
            raise RuntimeError(f"psctl serve did not start (exit {code}): {line + out!r} {err}")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err


def train(*args: str) -> None:
    r = run_psctl("train", *args, "--workers", "2", "--shards", "1", timeout_s=240)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A binary classifier, a multi-class one, a regression and an mf model, trained by psctl."""
    d = tmp_path_factory.mktemp("serve")
    train("logreg", str(EXAMPLES / "breast_cancer/train.csv"), "--epochs", "3", "--lr", "0.5", "--out", str(d / "cancer.npz"))
    train("softmax", str(EXAMPLES / "digits/train.csv"), "--epochs", "2", "--lr", "0.5", "--out", str(d / "digits.npz"))
    train("linreg", str(EXAMPLES / "regression/train.csv"), "--label", "target", "--epochs", "3", "--out", str(d / "reg.npz"))
    train("mf", str(EXAMPLES / "ratings/train.csv"), "--epochs", "3", "--rank", "4", "--lr", "0.16", "--l2", "0.1", "--out", str(d / "mf.npz"))
    return d


@pytest.fixture(scope="module")
def served(models):
    server = ServeProcess(str(models / "cancer.npz"), str(models / "digits.npz"), f"regression={models / 'reg.npz'}",
                          str(models / "mf.npz"), "--port", "0")  # fmt: skip
    yield server
    code, out, err = server.stop()
    assert code == 0 and "psctl serve stopped" in out, err


def read_rows(path: Path, drop: str) -> tuple[list[str], list[list[float]]]:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    keep = [j for j, c in enumerate(header) if c != drop]
    return [header[j] for j in keep], [[float(r[j]) for j in keep] for r in body]


def psctl_predictions(model: Path, data: Path, out: Path) -> list[dict[str, str]]:
    r = run_psctl("predict", str(model), str(data), "--out", str(out))
    assert r.returncode == 0, r.stderr
    with open(out) as fh:
        return list(csv.DictReader(fh))


async def post(session, url: str, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) or not isinstance(body, (dict, list)) else json.dumps(body)
    if isinstance(data, bytes) and len(data) > 1 << 20:
        data = io.BytesIO(data)  # aiohttp warns about large raw bytes
    async with session.post(url, data=data, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def get(session, url: str, **kwargs):
    async with session.get(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,data,label", [
    ("cancer", "breast_cancer/test.csv", "label"),
    ("digits", "digits/test.csv", "label"),
    ("regression", "regression/test.csv", "target"),
])  # fmt: skip
async def test_predictions_equal_psctl_predict(served, models, tmp_path, name, data, label):
    model_file = models / ("reg.npz" if name == "regression" else f"{name}.npz")
    expected = psctl_predictions(model_file, EXAMPLES / data, tmp_path / "p.csv")
    columns, rows = read_rows(EXAMPLES / data, label)
    async with aiohttp.ClientSession() as s:
        status, meta = await get(s, f"{served.url}/v1/models/{name}")
        assert status == 200 and meta["columns"] == columns and meta["source"]["kind"] == "file"
        status, as_arrays = await post(s, f"{served.url}/v1/models/{name}:predict", {"instances": rows})
        assert status == 200, as_arrays
        objects = [dict(zip(columns, r)) for r in rows]
        status, as_objects = await post(s, f"{served.url}/v1/models/{name}:predict", {"instances": objects})
        assert status == 200 and as_objects == as_arrays
    got = as_arrays["predictions"]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if meta["task"] == "regression":
            assert float(f"{g['value']:.6g}") == float(e["predicted"])
        elif meta["task"] == "binary":
            assert g["label"] == e["predicted"] and f"{g['probability']:.6f}" == e["probability"]
        else:
            assert g["label"] == e["predicted"]
            assert [f"{g['scores'][c]:.6f}" for c in meta["classes"]] == [e[f"score_{c}"] for c in meta["classes"]]


@pytest.mark.timeout(300)
async def test_mf_ratings_and_recommendations_equal_the_command_line(served, models, tmp_path):
    test = EXAMPLES / "ratings/test.csv"
    expected = psctl_predictions(models / "mf.npz", test, tmp_path / "p.csv")
    pairs = [[r["userId"], r["movieId"]] for r in expected]
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, f"{served.url}/v1/models/mf:predict", {"instances": pairs})
        assert status == 200, body
        for g, e in zip(body["predictions"], expected, strict=True):
            if e["predicted"] == "nan":
                assert g == {"rating": None, "known": False}
            else:
                assert g["known"] and float(f"{g['rating']:.6g}") == float(e["predicted"])
        # integer ids and objects keyed by the model's columns answer the same
        one = {"userId": int(pairs[0][0]), "movieId": int(pairs[0][1])}
        status, single = await post(s, f"{served.url}/v1/models/mf:predict", {"instances": [one]})
        assert status == 200 and single["predictions"][0] == body["predictions"][0]
        status, meta = await get(s, f"{served.url}/v1/models/mf")
        assert meta["kind"] == "mf" and meta["columns"] == ["userId", "movieId"] and meta["users"] > 0
        status, rec = await post(s, f"{served.url}/v1/models/mf:recommend", {"user": 7, "top": 5})
        assert status == 200, rec
        cli = psctl_json("recommend", str(models / "mf.npz"), "--user", "7", "--top", "5")
        assert [(i["item"], round(i["predicted_rating"], 9)) for i in rec["items"]] == [
            (i["item"], round(i["predicted_rating"], 9)) for i in cli["items"]
        ]
        excluded = [rec["items"][0]["item"]]
        status, rec2 = await post(s, f"{served.url}/v1/models/mf:recommend", {"user": "7", "top": 5, "exclude": excluded})
        assert status == 200 and excluded[0] not in [i["item"] for i in rec2["items"]] and len(rec2["items"]) == 5
        status, err = await post(s, f"{served.url}/v1/models/mf:recommend", {"user": "nobody"})
        assert status == 404 and "not in the model" in err["error"]


@pytest.mark.timeout(120)
async def test_list_health_and_openapi(served):
    async with aiohttp.ClientSession() as s:
        status, health = await get(s, f"{served.url}/v1/health")
        assert status == 200 and health == {"status": "ok", "models": 4}
        status, listing = await get(s, f"{served.url}/v1/models")
        assert status == 200
        assert {m["name"]: m["kind"] for m in listing["models"]} == {
            "cancer": "logreg", "digits": "softmax", "regression": "linreg", "mf": "mf"}  # fmt: skip
        status, doc = await get(s, f"{served.url}/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.")
        assert {p for p in doc["paths"] if p.endswith(":predict")} == {
            f"/v1/models/{n}:predict" for n in ("cancer", "digits", "mf", "regression")}  # fmt: skip
        assert [p for p in doc["paths"] if p.endswith(":recommend")] == ["/v1/models/mf:recommend"]
        body = doc["paths"]["/v1/models/cancer:predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        by_name, by_order = body["properties"]["instances"]["items"]["oneOf"]
        assert by_order["minItems"] == by_order["maxItems"] == 30 and len(by_name["required"]) == 30


def _is_sentence(body: dict) -> bool:
    return set(body) == {"error"} and isinstance(body["error"], str) and 10 < len(body["error"]) < 400 and "\n" not in body["error"]


HOSTILE = [
    ("POST", "/v1/models/cancer:predict", b"{not json", 400),
    ("POST", "/v1/models/cancer:predict", b"\xff\xfe\x00", 400),
    ("POST", "/v1/models/cancer:predict", b"[1, 2, 3]", 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": 7}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [[1, 2]]}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [{"nope": 1}]}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [{"mean_radius": 1}]}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [["a"]]}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [[' + b",".join([b"true"] * 30) + b"]]}", 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [[' + b",".join([b"1e999"] * 30) + b"]]}", 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [[NaN]]}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [[' + b",".join([b"1" + b"0" * 400] * 30) + b"]]}", 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [null]}', 400),
    ("POST", "/v1/models/cancer:predict", b'{"inputs": []}', 400),
    ("POST", "/v1/models/cancer:predict", b"[" * 100_000 + b"]" * 100_000, 400),
    ("POST", "/v1/models/cancer:predict", b'{"instances": [' + b",".join([b"[]"] * 2000) + b"]}", 400),
    ("POST", "/v1/models/mf:predict", b'{"instances": [[1.5, 2]]}', 400),
    ("POST", "/v1/models/mf:predict", b'{"instances": [[1, 2]], "cold_start": "guess"}', 400),
    ("POST", "/v1/models/mf:recommend", b'{"user": 7, "top": -1}', 400),
    ("POST", "/v1/models/mf:recommend", b'{"user": {"a": 1}}', 400),
    ("POST", "/v1/models/cancer:recommend", b'{"user": 7}', 404),
    ("POST", "/v1/models/cancer:explain", b"{}", 404),
    ("POST", "/v1/models/cancer", b"{}", 405),
    ("GET", "/v1/models/cancer:recommend", None, 405),
    ("POST", "/v1/models/ghost:predict", b"{}", 404),
    ("GET", "/v1/models/ghost", None, 404),
    ("GET", "/etc/passwd", None, 404),
    ("GET", "/v1/models/cancer:predict", None, 405),
    ("DELETE", "/v1/models/cancer", None, 405),
    ("PUT", "/v1/health", b"{}", 405),
]


CONNECTIONS = 2000


@pytest.mark.timeout(240)
async def test_hostile_requests_get_a_sentence_and_the_server_goes_on(models):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * CONNECTIONS:
        pytest.skip(f"the file descriptor limit ({hard}) is too low for {CONNECTIONS} connections")
    if soft != resource.RLIM_INFINITY and soft < 3 * CONNECTIONS:  # for this process and the server it starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (3 * CONNECTIONS, hard))
    server = ServeProcess(str(models / "cancer.npz"), str(models / "mf.npz"), "--port", "0", "--max-rows", "1000",
                          "--max-body-bytes", "1000000", "--max-connections", "300", "--idle-timeout-s", "2",
                          "--request-timeout-s", "2")  # fmt: skip
    try:
        rss_start = server.rss_bytes()
        good = {"instances": [[1.0] * 30]}
        # A connection each: a pooled one may be closed by --idle-timeout-s just as it is reused.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for method, path, body, expected in HOSTILE:
                async with s.request(method, server.url + path, data=body) as resp:
                    answer = await resp.json(content_type=None)
                    assert resp.status == expected, (method, path, body[:60] if body else None, answer)
                    assert _is_sentence(answer), answer
            # bodies over the limit: declared, and streamed without a length (chunked)
            status, answer = await post(s, f"{server.url}/v1/models/cancer:predict", b"[" * 2_000_000)
            assert status == 413 and "--max-body-bytes" in answer["error"]

            async def chunks():
                for _ in range(40):
                    yield b" " * 65536

            status, answer = await post(s, f"{server.url}/v1/models/cancer:predict", chunks())
            assert status == 413 and _is_sentence(answer)
            # many large bodies at once, many times: memory stays bounded
            big = b'{"instances": [' + b",".join([b"[" + b",".join([b"1.5"] * 30) + b"]"] * 1000) + b"]}"
            assert len(big) < 1_000_000
            for _ in range(5):
                results = await asyncio.gather(*(post(s, f"{server.url}/v1/models/cancer:predict", big) for _ in range(40)))
                assert all(status == 200 for status, _ in results)

        # thousands of connections: the ones over --max-connections get a 503 sentence, then all close
        socks = []
        try:
            for _ in range(CONNECTIONS):
                c = socket.socket()
                c.setblocking(False)
                try:
                    c.connect(("127.0.0.1", server.port))
                except BlockingIOError:
                    pass
                socks.append(c)
            refused = await _count_refused(socks)
            assert refused >= CONNECTIONS - 300 - 50, refused  # a few may be still in the backlog when counted
            async with aiohttp.ClientSession() as s:
                status, _ = await post(s, f"{server.url}/v1/models/cancer:predict", good)
                # the held connections are idle: within --idle-timeout-s they are closed and room is made
                deadline = time.monotonic() + 30
                while status == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)  # a retry interval, not synchronisation: the loop checks the answer
                    status, _ = await post(s, f"{server.url}/v1/models/cancer:predict", good)
                assert status == 200
        finally:
            for c in socks:
                c.close()

        # malformed HTTP itself: aiohttp's 400, and no traceback in the server's log (checked at the end)
        for raw in (b"GET /v1/health HTTP/1.1\r\nX-Null: \x00\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            assert (await asyncio.wait_for(reader.read(), 20)).split(b" ", 2)[1] == b"400"
            writer.close()

        # a slow client: headers never finished, or a body that never arrives
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/models/cancer:predict HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by the server
        assert time.monotonic() - started < 15
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/models/cancer:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n{")
        started = time.monotonic()
        reply = await asyncio.wait_for(reader.read(), 20)
        assert reply.startswith(b"HTTP/1.1 408") and b"--request-timeout-s" in reply
        # closed within the request timeout again, not after aiohttp's 10 s of lingering on the body
        assert time.monotonic() - started < 9
        writer.close()

        assert server.alive()
        async with aiohttp.ClientSession() as s:
            status, body = await post(s, f"{server.url}/v1/models/cancer:predict", good)
            assert status == 200 and len(body["predictions"]) == 1
        grown = server.rss_bytes() - rss_start
        assert grown < 200 << 20, f"RSS grew by {grown >> 20} MiB"
    finally:
        code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err, err


async def _count_refused(socks: list[socket.socket], timeout_s: float = 30) -> int:
    """How many of the connections got the 503 sentence and were closed."""
    loop = asyncio.get_running_loop()

    async def answer(c: socket.socket) -> bytes:
        try:
            return await asyncio.wait_for(loop.sock_recv(c, 4096), timeout_s)
        except (TimeoutError, OSError):
            return b""

    # The held ones stay silent until --idle-timeout-s; only look at what arrives before then.
    replies = await asyncio.gather(*(asyncio.wait_for(answer(c), 1.5) for c in socks), return_exceptions=True)
    refused = 0
    for r in replies:
        if isinstance(r, bytes) and r.startswith(b"HTTP/1.1 503"):
            assert b"--max-connections" in r
            refused += 1
    return refused


@pytest.mark.timeout(120)
async def test_beyond_loopback_needs_a_token(models, tmp_path):
    model = str(models / "cancer.npz")
    r = run_psctl("serve", model, "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 5 and "without a token" in r.stderr and "Traceback" not in r.stderr
    token_file, token = write_secret(tmp_path)
    server = ServeProcess(model, "--host", "0.0.0.0", "--port", "0", "--token-file", str(token_file))
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as s:
            status, _ = await get(s, f"{url}/v1/health")
            assert status == 200  # probes need no token
            status, body = await get(s, f"{url}/v1/models/cancer")
            assert status == 401 and _is_sentence(body)
            status, body = await get(s, f"{url}/v1/models/cancer", headers={"Authorization": "Bearer " + "0" * 64})
            assert status == 401 and "wrong token" in body["error"]
            status, body = await get(s, f"{url}/v1/models/cancer", headers={"Authorization": f"Bearer {token.decode()}"})
            assert status == 200 and body["kind"] == "logreg"
    finally:
        code, _, err = server.stop()
    assert code == 0, err


@pytest.mark.timeout(120)
def test_bad_command_lines_are_one_sentence(models, tmp_path):
    def refused(*args: str) -> str:
        r = run_psctl("serve", *args, "--port", "0")
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        line = " ".join(r.stderr.split())
        assert line.startswith("psctl: error:"), line
        return line

    assert "does not exist" in refused(str(tmp_path / "missing.npz"))
    not_a_model = tmp_path / "data.npz"
    not_a_model.write_text("label,x\n1,2\n")
    refused(str(not_a_model))
    assert "two models are named 'cancer'" in refused(str(models / "cancer.npz"), f"cancer={models / 'reg.npz'}")
    assert "--max-rows" in refused(str(models / "cancer.npz"), "--max-rows", "0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_psctl("serve", str(models / "cancer.npz"), "--port", str(port))
        assert r.returncode == 1 and "the port is in use" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(120)
async def test_tls_with_the_existing_flags(models, tmp_path):
    import ssl

    from tests.certs import self_signed_cert

    pair = self_signed_cert(tmp_path)
    if pair is None:
        pytest.skip("no openssl command and no cryptography package to make a certificate")
    cert, key = pair
    r = run_psctl("serve", str(models / "cancer.npz"), "--port", "0", "--tls-cert", str(cert))
    assert r.returncode == 2 and "both --tls-cert and --tls-key" in r.stderr
    server = ServeProcess(str(models / "cancer.npz"), "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as s:
            status, body = await post(s, f"{server.url}/v1/models/cancer:predict", {"instances": [[1.0] * 30]}, ssl=ctx)
            assert status == 200 and len(body["predictions"]) == 1
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port gets no answer
                await get(s, f"http://127.0.0.1:{server.port}/v1/health")
        assert server.alive()
    finally:
        code, _, err = server.stop()
    assert code == 0, err


@pytest.mark.timeout(60)
def test_without_the_serve_extra_it_names_the_pip_install(models):
    hide = "import sys; sys.modules['aiohttp'] = None; from psctl.cli import main; sys.argv = ['psctl', *sys.argv[1:]]; main()"
    r = subprocess.run([sys.executable, "-c", hide, "serve", str(models / "cancer.npz"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs aiohttp" in r.stderr and "pip install 'psctl[serve]'" in r.stderr
