"""Execution strategies: where the model's parameters live and how a step runs.

`make_runner(cfg, strategy)` returns a `Runner` (see `maxjax.parallel.runner`) for:

- ``"single"``: the whole model on one device, the reference every strategy must equal.
"""

from __future__ import annotations

from maxjax.config import Config
from maxjax.parallel.mesh import DeviceError
from maxjax.parallel.runner import LayoutReport, Runner, TrainState
from maxjax.parallel.single import SingleRunner

STRATEGIES = ("single",)


def make_runner(cfg: Config, strategy: str) -> Runner:
    """The runner of `strategy` for `cfg` (raises ValueError for an unknown strategy)."""
    if strategy == "single":
        return SingleRunner(cfg)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


__all__ = ["STRATEGIES", "DeviceError", "LayoutReport", "Runner", "TrainState", "make_runner"]
