"""Spread the suite over pytest-xdist workers file by file, and keep the memory-heavy runs apart.

Every test file is one xdist group (so module-scoped runners compile once), except the notebooks
and the benchmark tests: each of them builds every strategy of the tiny model, and two of them
at once can exceed a 24 GiB machine, so they share one group and run one after another.
"""

from pathlib import Path

import pytest

HEAVY = {"test_bench.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        heavy = path.suffix == ".ipynb" or path.name in HEAVY
        item.add_marker(pytest.mark.xdist_group("heavy" if heavy else str(path)))
