"""Measuring helpers shared by the Table 1 and sequence-length benchmarks.

Every timing excludes a warm-up call (compilation) and is reported as the median of repeated runs
with its min-max spread. Device-side work is awaited with `jax.block_until_ready`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

EMULATED_DEVICES = 16
GB = 1e9


def setup_devices(count: int = EMULATED_DEVICES) -> None:
    """Ask for `count` emulated CPU devices; a no-op once JAX's backend has started.

    Call before anything touches `jax.devices()`. On a machine with an accelerator the CPU
    device count does not matter (JAX's default backend is the accelerator).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", count)


def device_label() -> str:
    """Where the numbers come from, e.g. '16 emulated CPU devices on 2 cores'."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"{len(devices)} emulated CPU devices on {os.cpu_count()} cores"
    return f"{len(devices)} x {devices[0].device_kind}"


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and min-max of repeated wall times (seconds)."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))


def time_calls(fn: Callable[[], Any], repeats: int) -> Timing:
    """Wall time of fn() after one warm-up call, `repeats` times."""
    jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


@contextlib.contextmanager
def decode_step_timer() -> Iterator[list[float]]:
    """Record the wall time of every decode step (not the prefill) of `decode.generate_loop`.

    Every strategy's `generate` runs the shared loop, so wrapping its step function times the
    same thing everywhere: one KV-cache step for the whole batch, including the host round trip
    of the sampled token.
    """
    from maxjax.model import decode

    steps: list[float] = []
    original = decode.generate_loop

    def timed_loop(step_fn, caches, prompt, *args, **kwargs):
        calls = [0]

        def timed_step(tokens, caches, start):
            begin = time.perf_counter()
            out = jax.block_until_ready(step_fn(tokens, caches, start))
            if calls[0] > 0:
                steps.append(time.perf_counter() - begin)
            calls[0] += 1
            return out

        return original(timed_step, caches, prompt, *args, **kwargs)

    decode.generate_loop = timed_loop
    try:
        yield steps
    finally:
        decode.generate_loop = original


def decode_step_time(
    generate: Callable[[], Any], repeats: int, warm_up: bool = True
) -> tuple[Timing, Timing]:
    """(one decode step, one whole generate call) over `repeats` calls after a warm-up call."""
    if warm_up:
        jax.block_until_ready(generate())
    whole = []
    with decode_step_timer() as steps:
        for _ in range(repeats):
            begin = time.perf_counter()
            jax.block_until_ready(generate())
            whole.append(time.perf_counter() - begin)
    if not steps:
        raise RuntimeError("generate did not run decode.generate_loop; no decode step timed")
    return Timing.of(steps), Timing.of(whole)


def host_matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """Float32 matmul flops/s that one device program reaches on this host (all cores)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    timing = time_calls(lambda: matmul(a), repeats)
    return 2 * size**3 / timing.median


def train_step_flops(cfg: Any, batch: int, seq_len: int) -> float:
    """Flops of one training step of the model (loss + gradients) on tokens[batch, seq_len + 1],
    read from the single-device program's `cost_analysis` (no redundant or bubble work)."""
    from maxjax import model

    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    grad = jax.jit(jax.value_and_grad(lambda p, t: model.loss_fn(cfg, p, t)[0]))
    compiled = grad.lower(model.abstract_params(cfg), tokens).compile()
    return float(cost_of(compiled).get("flops", 0.0))


def cost_of(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return dict(cost or {})
