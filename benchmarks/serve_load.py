"""Load on ``psctl serve``: a real HTTP client on loopback against the same model evaluated in-process.

Run from the repository root (needs the serve extra: pip install -e '.[serve]'):

    python benchmarks/serve_load.py [--seconds 10] [--rate 500] [--concurrency 8] [--json out.json]

It trains a logistic regression on examples/breast_cancer (30 features) with
``psctl train``, starts ``psctl serve`` on it as its own process on 127.0.0.1,
and measures with an aiohttp client in this process (keep-alive connections):

- ``closed``: ``--concurrency`` requests in flight for ``--seconds``, for 1-row
  and 100-row requests: requests/s and the latency percentiles (the server's
  capacity: latency there includes queueing at saturation);
- ``open``: one-row requests sent at a fixed ``--rate`` per second for
  ``--seconds`` (each at its scheduled time, whatever the answers do): the rate
  achieved and p50/p99 latency, measured from the scheduled time, so a stalled
  server shows in p99 (the issue's target: 500/s with p99 under 20 ms on 2 cores);
- ``in-process``: in this process, the same rows through ``predict.evaluate_rows``
  (psctl predict's numpy step alone) and through ``serving.predictions`` with JSON decoding and
  encoding (everything the server does but HTTP), per call.

The client shares the machine's cores with the server; on 2 cores it takes a
good part of one.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from psctl import net  # noqa: E402
from psctl.apps import predict, serving  # noqa: E402

try:
    import aiohttp
except ImportError:
    sys.exit("benchmarks/serve_load.py needs aiohttp: pip install -e '.[serve]'")

DATA = REPO / "examples" / "breast_cancer"


def percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.sort(np.asarray(lat_s)) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a[-1])}


def rows_of(path: Path) -> list[list[float]]:
    with open(path) as fh:
        reader = csv.reader(fh)
        header = next(reader)
        keep = [j for j, c in enumerate(header) if c != "label"]
        return [[float(r[j]) for j in keep] for r in reader]


def train_model(folder: Path) -> Path:
    out = folder / "cancer.npz"
    cmd = [sys.executable, "-m", "psctl", "train", "logreg", str(DATA / "train.csv"), "--workers", "2", "--epochs", "5",
           "--lr", "0.5", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=300)
    return out


class Served:
    def __init__(self, model: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "psctl", "serve", f"cancer={model}", "--port", "0"], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            sys.exit(f"psctl serve did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split("listening on ", 1)[1].split()[0] + "/v1/models/cancer:predict"

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=20)


async def closed_loop(session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            lat.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"requests": len(lat), "errors": errors, "requests_s": len(lat) / wall, **percentiles(lat)}


async def open_loop(session: aiohttp.ClientSession, url: str, body: bytes, rate: float, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    start = time.perf_counter() + 0.05

    async def one(k: int) -> None:
        nonlocal errors
        due = start + k / rate
        await asyncio.sleep(max(due - time.perf_counter(), 0))
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            if resp.status != 200:
                errors += 1
        lat.append(time.perf_counter() - due)  # from the scheduled time: waiting to be sent counts

    await asyncio.gather(*(one(k) for k in range(n)))
    wall = time.perf_counter() - start
    return {"rate_asked": rate, "requests": n, "errors": errors, "requests_s": n / wall, **percentiles(lat)}


def in_process(model_path: Path, rows: list[list[float]], repeats: int) -> dict[str, Any]:
    source = serving.FileSource.load("cancer", str(model_path))
    snap = source.loaded
    out: dict[str, Any] = {}
    for n in (1, 100):
        X = np.asarray(rows[:n])
        body = json.dumps({"instances": rows[:n]}).encode()
        timings = {}
        for what, fn in (
            ("numpy", lambda: predict.evaluate_rows(snap.predictor, predict.Rows(X, None))),
            ("with_json", lambda: json.dumps({"predictions": serving.predictions(snap, serving.parse_body(body), 10_000)})),
        ):
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                best = min(best, (time.perf_counter() - t0) / repeats)
            timings[f"{what}_us"] = best * 1e6
        out[f"{n}_rows"] = timings
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rows = rows_of(DATA / "test.csv")
    while len(rows) < 100:
        rows += rows
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else train_model(Path(tmp))
        result: dict[str, Any] = {"in_process": in_process(model, rows, args.repeats)}
        served = Served(model)
        try:
            connector = aiohttp.TCPConnector(limit=max(args.concurrency, 64))
            async with aiohttp.ClientSession(connector=connector) as session:
                warm = json.dumps({"instances": rows[:1]}).encode()
                for _ in range(50):
                    async with session.post(served.url, data=warm) as resp:
                        assert resp.status == 200, await resp.text()
                for n in (1, 100):
                    body = json.dumps({"instances": rows[:n]}).encode()
                    cpu0 = served.cpu_s()
                    r = await closed_loop(session, served.url, body, args.concurrency, args.seconds)
                    r["server_cpu_ms_per_request"] = (served.cpu_s() - cpu0) * 1e3 / max(r["requests"], 1)
                    result[f"closed_{n}_rows"] = r
                body = json.dumps({"instances": rows[:1]}).encode()
                result["open_1_row"] = await open_loop(session, served.url, body, args.rate, args.seconds)
        finally:
            served.stop()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="Length of each run.")
    p.add_argument("--rate", type=float, default=500.0, help="Open-loop one-row requests per second.")
    p.add_argument("--concurrency", type=int, default=8, help="Requests in flight in the closed-loop runs.")
    p.add_argument("--repeats", type=int, default=2000, help="In-process calls per timing.")
    p.add_argument("--model", help="A model file of the breast cancer data (default: train one).")
    p.add_argument("--json", help="Also write the figures to this file.")
    args = p.parse_args()
    result = net.run(lambda: main_async(args))  # uvloop where installed, as psctl serve itself
    for n in (1, 100):
        ip = result["in_process"][f"{n}_rows"]
        c = result[f"closed_{n}_rows"]
        print(f"{n:>3} rows: HTTP {c['requests_s']:8.0f} req/s at concurrency {args.concurrency}, p50 {c['p50_ms']:.2f} ms, "
              f"p99 {c['p99_ms']:.2f} ms, server CPU {c['server_cpu_ms_per_request']:.3f} ms/request, errors {c['errors']}; "
              f"in-process: numpy {ip['numpy_us']:.1f} us, with JSON {ip['with_json_us']:.1f} us per call")  # fmt: skip
    o = result["open_1_row"]
    print(f"  1 row at {o['rate_asked']:.0f}/s asked: {o['requests_s']:.0f} req/s achieved, p50 {o['p50_ms']:.2f} ms, "
          f"p99 {o['p99_ms']:.2f} ms, max {o['max_ms']:.2f} ms, errors {o['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
