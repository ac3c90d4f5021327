"""Spread the suite over pytest-xdist workers file by file, and keep the memory-heavy runs apart.

Every test file is one xdist group (so module-scoped runners compile once), except the files that
build the memory-hungry strategies: the pipeline baseline replicates the whole model and its
AdamW state on 8 data-parallel replicas (about 9 GiB on 16 emulated devices), so two such runs at
once exceed a 24 GiB machine. Those files share one group and run one after another.
"""

from pathlib import Path

import pytest

HEAVY = {"test_bench.py", "test_baselines.py", "test_generate.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        heavy = path.suffix == ".ipynb" or path.name in HEAVY
        item.add_marker(pytest.mark.xdist_group("heavy" if heavy else str(path)))
