"""The statistics pass is pooled in partition order, whatever order the workers' STATS came in:
merging partial statistics is not associative in floating point, so arrival order would
make a seeded job's standardization, and model, differ in the last bits from run to run."""

from psctl.cluster.coordinator import pool_stats
from psctl.core import events


def _part(mean: float) -> dict:
    return {"stats": {"count": 3, "mean": [mean], "m2": [1.0]}, "labels": ["0", "1"], "vocab": {}}


def test_statistics_are_pooled_in_partition_order():
    arrived = {2: _part(2.0), 0: _part(0.0), 1: _part(1.0)}
    pooled = pool_stats(events.PoolStats("job", arrived))
    assert [s["mean"] for s in pooled.body["stats"]] == [[0.0], [1.0], [2.0]]
