"""Every benchmark module imports (they run nothing at import): a command in benchmarks/
that the code has moved away from fails here, not when somebody next reproduces a figure."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py") if p.stem != "__main__")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


@pytest.mark.timeout(60)
def test_the_suite_cpu_report_sums_by_file_and_ranks_tests(tmp_path):
    from benchmarks import suite_cpu

    (tmp_path / "tests-1.tsv").write_text("tests/a.py::t1\t2.0\t0.5\t1.5\ntests/a.py::t2\t9.0\t0.5\t0.5\n")
    (tmp_path / "tests-2.tsv").write_text("tests/b.py::t3\t1.0\t0.1\t0.0\n")
    rows = suite_cpu.read(tmp_path)
    assert sorted(rows) == [("tests/a.py::t1", 2.0, 2.0), ("tests/a.py::t2", 9.0, 1.0), ("tests/b.py::t3", 1.0, 0.1)]
    text = suite_cpu.report(rows, top=1)
    assert text.startswith("3 tests: CPU 3 s, wall 12 s")
    assert "     3.0     11.0      2  tests/a.py" in text and "tests/b.py" not in text
    assert text.splitlines()[-1].endswith("tests/a.py::t2")  # waits 8 s


@pytest.mark.timeout(60)
def test_the_peers_table_puts_psctl_first_and_says_how_far_it_is_ahead():
    from benchmarks.peers_table import Figure, assemble

    nan = float("nan")
    table = assemble(
        [
            Figure("it/s", "peer", 200.0, True),
            Figure("it/s", "psctl", 100.0, True, psctl=True),
            Figure("s", "psctl", 10.0, False, psctl=True),
            Figure("s", "slow peer", 40.0, False),
            Figure("s", "absent peer", nan, False, "skipped: not installed"),
            Figure("us", "peer without psctl", 5.0, False),
        ]
    )
    assert [(row[0], row[1]) for row in table.rows] == [
        ("it/s", "psctl"), ("it/s", "peer"), ("s", "psctl"), ("s", "slow peer"), ("s", "absent peer"), ("us", "peer without psctl"),
    ]  # fmt: skip
    assert [row[3] for row in table.rows[:4]] == [1.0, 0.5, 1.0, 4.0]  # twice as fast: 0.5; four times the time: 4
    assert all(math.isnan(row[3]) for row in table.rows[4:])  # nothing to compare: no figure, or no psctl figure
    assert table.rows[4][4] == "skipped: not installed"


@pytest.mark.timeout(60)
def test_the_scale_tables_read_where_a_job_stops_scaling():
    from benchmarks.scale import QUICK, Config, rows_table, shards_table, workers_table

    def fig(samples_s, wall_s=10.0):
        return {"samples_s": samples_s, "first_epoch_s": 1.0, "wall_s": wall_s, "cpu_s": 1.0, "worker_peak_mib": 50.0, "accuracy": 0.8}

    w = [Config(100, n, 2) for n in (1, 2, 4)]
    table = workers_table(QUICK, dict(zip(w, [fig(100.0), fig(150.0), fig(120.0)])), w)
    assert [row[3] for row in table.rows][1:] == [1.5, 0.8]  # 4 workers: 0.8x the best of fewer (2 workers)
    assert "Most samples/s at 2 workers" in table.notes[0] and "4 workers at -20%" in table.notes[0] and "past the goal" in table.notes[0]

    s = [Config(100, 8, 1), Config(100, 8, 2), Config(100, 8, 2, spread=True)]
    table = shards_table(QUICK, dict(zip(s, [fig(100.0), fig(95.0), fig(60.0)])), s)
    assert [row[1] for row in table.rows] == ["as placed", "as placed", "every shard"]
    assert "at worst -5% samples/s as placed" in table.notes[0] and "-40% spread" in table.notes[0]

    r = [Config(n, 8, 2) for n in (50_000, 100_000, 200_000)]
    table = rows_table(QUICK, dict(zip(r, [fig(0.0, 4.0), fig(0.0, 6.0), fig(0.0, 13.2)])), r)
    assert [round(row[3], 6) for row in table.rows][1:] == [0.75, 1.1]  # 6 s against a linear 8; 13.2 against 12
    assert "grows 1.10x a linear growth" in table.notes[0] and "peak RSS grows 1.00x while its partition grows 4x" in table.notes[0]


@pytest.mark.timeout(60)
def test_a_process_trees_memory_counts_shared_pages_once_in_pss():
    import os
    import subprocess
    import sys

    from benchmarks.peers_table import tree_memory_bytes

    child = subprocess.Popen([sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        child.stdout.readline()  # its interpreter is up
        child_rss, child_pss = tree_memory_bytes(child.pid)
        mine_rss, mine_pss = tree_memory_bytes(os.getpid())
        with open(f"/proc/{os.getpid()}/smaps_rollup") as fh:
            own_rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Rss:"))
        assert child_rss >= child_pss > 0  # a page shared with another process counts less in PSS
        assert mine_rss > own_rss  # the child is in this process's tree
    finally:
        child.communicate(b"", timeout=30)
