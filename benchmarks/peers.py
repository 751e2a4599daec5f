"""Section peers: other parameter-server stacks on the same 4 MiB pull + 4 MiB push, when importable.

- PyTorch RPC: a parameter-server process holding one float32 tensor; the
  client calls ``rpc_sync(pull)`` then ``rpc_sync(push, grad)``. Once with
  TensorPipe restricted to TCP (``_transports=["uv"]``), once with its defaults
  (shared memory where it can).
- gloo ``all_reduce`` of the same tensor between two processes.
- A Ray actor with ``pull`` / ``push`` methods.
- With ``--payload-bytes N``, PyTorch RPC and Ray time one round trip of an
  N-byte array (the server returns it) instead.
- ``gloo-logreg``: the data-parallel loop PyTorch users write for logistic
  regression: every process takes its share of each batch, and the gradients
  are averaged with ``all_reduce`` at every step.

None of these are psctl dependencies; ``pip install -e '.[benchmarks]'`` installs
them. Each peer is skipped, with the reason printed, unless it imports. Each runs in child
processes (``python -m benchmarks.peers ...``) that print one JSON line.
The code paths for peers that were not importable where BENCHMARKS.md was
produced have not been run there; BENCHMARKS.md says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import SectionResult, Settings, Table, child_env, python

ROWS = 1 << 20  # 4 MiB of float32
PEER_TIMEOUT_S = 120.0
_state: dict[str, Any] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- functions the PyTorch RPC server runs (module level: RPC finds them by name) --


def _ps_pull() -> Any:
    return _state["w"]


def _ps_push(grad: Any) -> None:
    _state["w"].sub_(grad, alpha=1e-6)


def _ps_echo(payload: Any) -> Any:
    return payload


def _round_trips(call: Any, duration_s: float) -> dict[str, Any]:
    """Each ``call()``'s duration in seconds, until ``duration_s`` is up (after a warm-up of 50)."""
    for _ in range(50):
        call()
    samples, clock = [], time.perf_counter
    end = clock() + duration_s
    while True:
        t0 = clock()
        call()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= end:
            return {"samples_s": samples}


def _torch_rpc(rank: int, world: int, port: int, transport: str, duration_s: float, payload_bytes: int = 0) -> dict[str, Any] | None:
    """Rank 0 is the server; every other rank a worker that prints its own figures."""
    import torch
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4)
    if transport == "tcp":
        options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, _transports=["uv"], _channels=["basic"])
    name = "ps" if rank == 0 else f"worker{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=options)
    out = None
    if rank == 0:
        _state["w"] = torch.zeros(ROWS, dtype=torch.float32)
    elif payload_bytes:
        payload = torch.zeros(payload_bytes, dtype=torch.uint8)
        out = _round_trips(lambda: rpc.rpc_sync("ps", _ps_echo, args=(payload,)), duration_s)
    else:
        grad = torch.ones(ROWS, dtype=torch.float32)
        for _ in range(5):
            rpc.rpc_sync("ps", _ps_pull)
            rpc.rpc_sync("ps", _ps_push, args=(grad,))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            rpc.rpc_sync("ps", _ps_pull)
            rpc.rpc_sync("ps", _ps_push, args=(grad,))
            n += 1
        out = {"its": n / (time.perf_counter() - start)}
    rpc.shutdown()
    return out


def _gloo(rank: int, port: int, duration_s: float) -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(ROWS, dtype=torch.float32)
    for _ in range(5):
        dist.all_reduce(t)
    # Both ranks must run the same number of collectives, so the count is fixed, not timed.
    count = max(20, int(duration_s * 40))
    start = time.perf_counter()
    for _ in range(count):
        dist.all_reduce(t)
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    return {"its": count / elapsed} if rank == 0 else None


def _gloo_logreg(rank: int, world: int, port: int, data: str, epochs: int, batch_size: int, lr: float) -> dict[str, Any] | None:
    """Data-parallel mini-batch SGD: the same batches, order and step as ``training.numpy_sgd``.

    ``data`` is a prefix: ``{data}-X.npy`` (standardized float32 rows) and ``{data}-y.npy`` (0/1).
    Each rank takes every ``world``-th row of each batch and its gradient's share of the batch
    mean; ``all_reduce`` sums the shares, so every step is numpy's step.
    """
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    X_all = np.load(f"{data}-X.npy", mmap_mode="r")  # one copy in the page cache for all ranks
    y_all = np.load(f"{data}-y.npy", mmap_mode="r")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    w = torch.zeros(X_all.shape[1] + 1, dtype=torch.float32)
    grad = torch.empty_like(w)
    dist.barrier()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng([0, epoch]).permutation(len(y_all))
        for s in range(0, len(y_all), batch_size):
            batch = order[s : s + batch_size]
            mine = np.sort(batch[rank::world])
            X, y = torch.from_numpy(X_all[mine]), torch.from_numpy(np.asarray(y_all[mine]))
            err = (torch.sigmoid(X @ w[:-1] + w[-1]) - y) / len(batch)
            grad[:-1] = X.T @ err
            grad[-1] = err.sum()
            dist.all_reduce(grad)
            w -= lr * grad
    dist.barrier()
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    if rank != 0:
        return None
    X, y = torch.from_numpy(np.asarray(X_all)), torch.from_numpy(np.asarray(y_all))
    accuracy = float(((torch.sigmoid(X @ w[:-1] + w[-1]) >= 0.5).float() == y).float().mean())
    samples = epochs * len(y_all)
    return {"samples_s": samples / seconds, "seconds": seconds, "samples": samples, "accuracy": accuracy}


def _ray(duration_s: float, payload_bytes: int = 0, workers: int = 1) -> dict[str, Any]:
    """One actor; the driver is the worker, or with ``workers`` > 1 as many tasks (its/s summed)."""
    import numpy as np
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class ParameterServer:
        def __init__(self) -> None:
            self.w = np.zeros(ROWS, np.float32)

        def pull(self) -> Any:
            return self.w

        def push(self, grad: Any) -> None:
            self.w -= 1e-6 * grad

        def echo(self, payload: Any) -> Any:
            return payload

    ps = ParameterServer.remote()

    def pull_push(ps: Any, duration_s: float) -> float:
        """What one worker does: pull, push, until the time is up (after 5 warm-up steps); its it/s."""
        grad = np.ones(ROWS, np.float32)
        for _ in range(5):
            ray.get(ps.pull.remote())
            ray.get(ps.push.remote(grad))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            ray.get(ps.pull.remote())
            ray.get(ps.push.remote(grad))
            n += 1
        return n / (time.perf_counter() - start)

    if workers > 1:  # as many tasks, each its own process
        task = ray.remote(pull_push)
        out = {"its": sum(ray.get([task.remote(ps, duration_s) for _ in range(workers)]))}
    elif payload_bytes:
        payload = np.zeros(payload_bytes, np.uint8)
        out = _round_trips(lambda: ray.get(ps.echo.remote(payload)), duration_s)
    else:
        out = {"its": pull_push(ps, duration_s)}
    ray.shutdown()
    return out


def _run_pair(args: list[str], world: int = 2, timeout_s: float = PEER_TIMEOUT_S) -> dict[str, Any]:
    """Start ranks 0 to ``world - 1`` of a peer; the first JSON result printed."""
    return _run_ranks(args, world, timeout_s)[0]


def _run_ranks(args: list[str], world: int, timeout_s: float = PEER_TIMEOUT_S) -> list[dict[str, Any]]:
    """Start ranks 0 to ``world - 1`` of a peer; every JSON result they print, in rank order."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [python(), "-m", "benchmarks.peers", *args, "--rank", str(rank), "--world", str(world), "--port", port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for rank in range(world)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            if p.returncode:
                raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads(line) for out in outs for line in out.splitlines() if line.startswith("{")]
    if not results:
        raise RuntimeError("no result printed")
    return results


def importable(module: str) -> bool:
    """Installed, not a folder of that name on the path (Ray leaves /tmp/ray: a namespace package from cwd /tmp)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None


def available() -> dict[str, str | None]:
    """Each peer's module -> None if importable, else why not."""
    reasons: dict[str, str | None] = {}
    for module in ("torch", "ray"):
        reasons[module] = None if importable(module) else f"{module} is not installed (pip install -e '.[benchmarks]')"
    return reasons


async def run_peers(settings: Settings, dense_4mb_its: float | None) -> SectionResult:
    import asyncio

    result = SectionResult("peers")
    reasons = available()
    duration = 1.0 if settings.quick else 5.0
    table = Table(
        "Peers: 4 MiB pull + 4 MiB push per iteration against one server",
        ["peer", "it/s", "psctl 1 shard x peer", "note"],
        command=settings.command("peers"),
        notes=["psctl's figure is section dense's 1-shard 4 MiB row from the same run (run dense too for the ratio)."],
    )
    plans: list[tuple[str, str, list[str] | None]] = [
        ("PyTorch RPC, TensorPipe over TCP", "torch", ["torch-rpc", "--transport", "tcp"]),
        ("PyTorch RPC, TensorPipe defaults (shm)", "torch", ["torch-rpc", "--transport", "default"]),
        ("gloo all_reduce (2 processes)", "torch", ["gloo"]),
        ("Ray actor", "ray", None),
    ]
    for label, module, pair in plans:
        if reasons[module] is not None:
            table.rows.append([label, float("nan"), float("nan"), f"skipped: {reasons[module]}"])
            result.figures[label] = {"skipped": reasons[module]}
            continue
        try:
            if pair is not None:
                figures = await asyncio.to_thread(_run_pair, [*pair, "--seconds", str(duration)])
            else:
                figures = await asyncio.to_thread(_run_single, ["ray", "--seconds", str(duration)])
        except Exception as exc:  # a peer's failure is a row, not the end of the run
            table.rows.append([label, float("nan"), float("nan"), f"failed: {exc}"])
            result.figures[label] = {"failed": str(exc)}
            continue
        its = figures["its"]
        table.rows.append([label, its, dense_4mb_its / its if dense_4mb_its else float("nan"), ""])
        result.figures[label] = figures
    if all(r is not None for r in reasons.values()):
        result.skipped = "; ".join(r for r in reasons.values() if r)
    result.tables.append(table)
    return result


def _run_single(args: list[str], timeout_s: float = PEER_TIMEOUT_S) -> dict[str, Any]:
    out = subprocess.run(
        [python(), "-m", "benchmarks.peers", *args], capture_output=True, text=True, timeout=timeout_s, env=child_env()
    )
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    p.add_argument("peer", choices=("torch-rpc", "gloo", "gloo-logreg", "ray"))
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transport", choices=("tcp", "default"), default="tcp")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--payload-bytes", type=int, default=0, help="torch-rpc, ray: time round trips of this many bytes")
    p.add_argument("--workers", type=int, default=1, help="ray: worker tasks (torch-rpc: --world, workers + 1)")
    p.add_argument("--data", help="gloo-logreg: the prefix of DATA-X.npy and DATA-y.npy")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.peer == "torch-rpc":
        out = _torch_rpc(args.rank, args.world, args.port, args.transport, args.seconds, args.payload_bytes)
    elif args.peer == "gloo":
        out = _gloo(args.rank, args.port, args.seconds)
    elif args.peer == "gloo-logreg":
        out = _gloo_logreg(args.rank, args.world, args.port, args.data, args.epochs, args.batch_size, args.lr)
    else:
        out = _ray(args.seconds, args.payload_bytes, args.workers)
    if out is not None:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
