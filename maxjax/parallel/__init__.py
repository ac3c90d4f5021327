"""Execution strategies: where the model's parameters live and how a step runs.

`make_runner(cfg, strategy)` returns a `Runner` (see `maxjax.parallel.runner`) for:

- ``"single"``: the whole model on one device, the reference every strategy must equal.
- ``"ma"``: MoE-Attention separation: attention (heads split unevenly, embedding, norms, router,
  LM head) on the attention submesh, experts on the expert submesh, capacity buffers between them
  once each way per layer, micro-batches in ping-pong (`maxjax.parallel.ma`).
- ``"tp"``: tensor parallelism (heads and experts split over 8 devices) x data parallelism 2.
- ``"pp"``: GPipe pipeline of 2 stages (micro-batches, ppermute) x data parallelism 8.
- ``"tp_pp"``: tensor parallelism 8 x pipeline 2 (`maxjax.parallel.baselines` for all three).
"""

from __future__ import annotations

from maxjax.config import Config
from maxjax.parallel.mesh import DeviceError
from maxjax.parallel.runner import LayoutReport, Runner, TrainState
from maxjax.parallel.single import SingleRunner

STRATEGIES = ("single", "ma", "tp", "pp", "tp_pp")


def make_runner(cfg: Config, strategy: str) -> Runner:
    """The runner of `strategy` for `cfg` (raises ValueError for an unknown strategy)."""
    if strategy == "single":
        return SingleRunner(cfg)
    if strategy == "ma":
        from maxjax.parallel.ma import MARunner

        return MARunner(cfg)
    if strategy in ("tp", "pp", "tp_pp"):
        from maxjax.parallel.baselines import BaselineRunner

        return BaselineRunner(cfg, strategy)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


__all__ = ["STRATEGIES", "DeviceError", "LayoutReport", "Runner", "TrainState", "make_runner"]
