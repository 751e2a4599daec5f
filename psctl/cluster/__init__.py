"""The thin asyncio services (coordinator, shard, worker, client) and the processes
that run them: each maps frames onto a pure core and runs what it returns."""
