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

from typing import Any

from maxjax.config import Config, ConfigError
from maxjax.parallel.mesh import DeviceError
from maxjax.parallel.runner import (
    CANONICAL_LAYOUT,
    LayoutReport,
    Runner,
    TrainState,
    map_with_path,
)
from maxjax.parallel.single import SingleRunner

STRATEGIES = ("single", "ma", "tp", "pp", "tp_pp")

# More MA micro-batches than this stalled training on XLA's CPU client (the tiny config with 4
# and with 8 did, within three steps); likely because a device's part of a program waiting in a
# collective holds a thread of a shared pool (README, "a known limit of the CPU backend").
CPU_MAX_MA_MICROBATCHES = 2


def max_ma_microbatches() -> int | None:
    """The most MA micro-batches this process's backend trains with: `CPU_MAX_MA_MICROBATCHES`
    on CPU, None (no known limit) elsewhere."""
    import jax

    return CPU_MAX_MA_MICROBATCHES if jax.default_backend() == "cpu" else None


def check_backend(cfg: Config, strategy: str) -> None:
    """Raise DeviceError where `cfg` is known not to train on this process's backend: `ma` with
    more than `max_ma_microbatches()` micro-batches (on the CPU backend, where a run stalls in
    XLA's collectives and is ended after its 40 s timeout)."""
    micro, limit = cfg.ma_separation.microbatches, max_ma_microbatches()
    if strategy == "ma" and limit is not None and micro > limit:
        raise DeviceError(
            f"ma_separation.microbatches = {micro}: on the CPU backend MA training with more than "
            f"{CPU_MAX_MA_MICROBATCHES} micro-batches stalls in XLA's CPU collectives (see the "
            f"README); use at most {CPU_MAX_MA_MICROBATCHES} here (GPUs have no such limit)"
        )


def check_strategy(cfg: Config, strategy: str, batch: int | None = None) -> None:
    """Raise ConfigError if `strategy` is unknown or cannot run `cfg` (no devices needed).

    The rules that depend on the strategy: its tensor and pipeline degrees divide the heads,
    experts and layers, and a batch of `batch` sequences (if given) splits into whole rows per
    data-parallel group and micro-batch.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            "--strategy", f"{strategy!r} is not available; choose one of {STRATEGIES}"
        )
    if strategy == "ma":
        parts = cfg.ma_separation.microbatches * cfg.ma_separation.gradient_accumulation
        if batch is not None and batch % parts:
            raise ConfigError(
                "sequence.batch_size",
                f"{batch} does not split into {parts} equal micro-batches "
                f"(ma_separation.microbatches = {cfg.ma_separation.microbatches} times "
                f"ma_separation.gradient_accumulation = "
                f"{cfg.ma_separation.gradient_accumulation})",
            )
        return
    if strategy == "single":
        return
    split = strategy.split("_")
    tp = cfg.baselines.tensor_parallel if "tp" in split else 1
    pp = cfg.baselines.pipeline_parallel if "pp" in split else 1
    total, layers = cfg.hardware.total_gpus, cfg.model.layers
    rules = [
        (
            total % (tp * pp) == 0,
            "baselines.pipeline_parallel",
            f"tp x pp = {tp * pp} must divide the {total} devices",
        ),
        (
            cfg.model.attention_heads % tp == 0,
            "baselines.tensor_parallel",
            f"tensor_parallel = {tp} must divide model.attention_heads = "
            f"{cfg.model.attention_heads}",
        ),
        (
            cfg.moe.experts_per_layer % tp == 0,
            "baselines.tensor_parallel",
            f"tensor_parallel = {tp} must divide moe.experts_per_layer = "
            f"{cfg.moe.experts_per_layer}",
        ),
        (
            layers % pp == 0,
            "baselines.pipeline_parallel",
            f"pipeline_parallel = {pp} must divide model.layers = {layers}",
        ),
    ]
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(key, f"strategy {strategy!r}: {rule}")
    data, parts = total // (tp * pp), cfg.baselines.microbatches
    if batch is not None and batch % (data * parts):
        raise ConfigError(
            "sequence.batch_size",
            f"strategy {strategy!r} splits the batch over data parallelism {data} x "
            f"micro-batches {parts} = {data * parts}; {batch} is not a multiple of it",
        )


def make_runner(cfg: Config, strategy: str) -> Runner:
    """The runner of `strategy` for `cfg` (ConfigError if the strategy cannot run `cfg`)."""
    check_strategy(cfg, strategy)
    if strategy == "single":
        return SingleRunner(cfg)
    if strategy == "ma":
        from maxjax.parallel.ma import MARunner

        return MARunner(cfg)
    if strategy in ("tp", "pp", "tp_pp"):
        from maxjax.parallel.baselines import BaselineRunner

        return BaselineRunner(cfg, strategy)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def canonical_from_storage(layout: dict, tree: Any) -> Any:
    """A tree stored in `layout` (a runner's `storage_layout()`) in the single-device layout.

    Pure and traceable, needs no devices: a checkpoint written under one strategy is read under
    another (or none) through this."""
    kind = layout["kind"]
    if kind == CANONICAL_LAYOUT["kind"]:
        return tree
    if kind == "ma":
        from maxjax.parallel.ma.layout import ParamLayout

        param_layout = ParamLayout.from_description(layout)
        return map_with_path(param_layout.from_layout, tree)
    if kind == "stacked_stages":
        from maxjax.parallel.baselines import unstack_stages

        layers = len(tree["layers"])
        return unstack_stages(tree, layers // layout["stages"], layout["vocab_size"])
    raise ValueError(f"unknown stored parameter layout {kind!r}")


__all__ = [
    "CANONICAL_LAYOUT",
    "STRATEGIES",
    "canonical_from_storage",
    "check_backend",
    "max_ma_microbatches",
    "check_strategy",
    "DeviceError",
    "LayoutReport",
    "Runner",
    "TrainState",
    "make_runner",
]
