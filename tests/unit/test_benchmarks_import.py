"""Every benchmark module imports (they run nothing at import): a command in benchmarks/
that the code has moved away from fails here, not when somebody next reproduces a figure."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py") if p.stem != "__main__")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")
