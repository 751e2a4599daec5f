"""Your own training loop on psctl, through the Python API (ps-lite's KVWorker, in asyncio).

Two workers fit y = X w + b by least squares on their own shards of synthetic data,
in bounded-staleness mode, against a local server with two shard processes.

    python examples/api_custom_loop.py
"""

import asyncio

import numpy as np

from psctl.apps.api import Job, KVWorker, LocalServer, TableSpec

TRUE_W = np.array([2.0, -1.0, 0.5, 3.0, 0.0])
STEPS = 300


async def worker(address: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(500, 5))
    y = X @ TRUE_W + 1.0 + 0.1 * rng.normal(size=500)
    async with await KVWorker.join(address) as kv:
        for _ in range(STEPS):
            rows = rng.integers(0, 500, size=32)
            w = await kv.pull("w")  # 5 weights and the bias, at this worker's clock
            err = X[rows] @ w[:5] + w[5] - y[rows]
            kv.push("w", np.append(X[rows].T @ err, err.sum()).astype(np.float32) / len(rows))
            await kv.clock()


async def main() -> None:
    async with LocalServer(shards=2) as server:
        async with await Job.submit(server.address, [TableSpec("w", 6)], workers=2, mode="ssp", staleness=1, lr=0.05) as job:
            await asyncio.gather(worker(server.address, 1), worker(server.address, 2))
            params = await job.wait(timeout_s=60)
    print("learned:", np.round(params["w"], 2))
    print("true:   ", np.append(TRUE_W, 1.0))


if __name__ == "__main__":
    asyncio.run(main())
