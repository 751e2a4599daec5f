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
