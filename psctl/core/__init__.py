"""Pure logic over plain data and numpy arrays: the clock gate, key routing, tables,
shard state, job state, optimizers, batching. No asyncio, sockets or transport."""
