"""Measured stage times of an MA training step, from a profiler trace.

`jax.profiler` records every executed HLO operation with the device that ran it
(``device_ordinal``, a `jax.Device.id`), its program (``hlo_module``, e.g. ``jit_experts_vjp``) and
the execution it belongs to (``run_id``). One program execution on one device is a *run*; its
time is from its first operation's start to its last one's end (`program_runs`).

`stage_samples` turns the runs of one training step into samples for the time models of
`maxjax.sync.predictor`: one per attention stage (a layer's forward or backward program for one
micro-batch; its time is the slowest attention device's) and one per expert device and expert
stage (that device's run of the expert program), each with the features in `FEATURES`. On CPU
all emulated devices share the machine's cores, so these are times on a shared machine.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

# The programs whose runs are stage samples, by pool and sweep (`maxjax.parallel.ma.stages`;
# with gradient checkpointing the forward-only programs and the recomputing backward ones).
STAGE_PROGRAMS = {
    ("attention", "forward"): ("first_vjp", "middle_vjp", "first", "middle"),
    ("attention", "backward"): (
        "first_backward",
        "layer_backward",
        "first_recompute",
        "middle_recompute",
    ),
    ("experts", "forward"): ("experts_vjp", "experts"),
    ("experts", "backward"): ("experts_backward", "experts_recompute"),
}

FEATURES = (
    "expert_stage",  # 1 for an expert device's stage, 0 for an attention stage
    "backward",  # 1 for a stage of the backward sweep
    "tokens",  # token rows the device computes: kept assignments (experts), tokens (attention)
    "microbatch_sequences",
    "sequence_length",
    "heads_per_attention_device",
    "experts_per_device",
    "compression",  # 1 with 8-bit compression between the pools
)


def feature_rows(tokens: Sequence[float] | np.ndarray, **fixed: float) -> np.ndarray:
    """Feature rows [N, len(FEATURES)]: the `tokens` feature from `tokens` (one row each), every
    other feature of `FEATURES` from `fixed`, by name."""
    tokens = np.asarray(tokens, np.float64).reshape(-1)
    rows = np.empty((len(tokens), len(FEATURES)))
    for i, name in enumerate(FEATURES):
        rows[:, i] = tokens if name == "tokens" else fixed[name]
    return rows


class ProgramRun(NamedTuple):
    device: int
    program: str  # the jitted function's name ("experts_vjp"), without JAX's "jit_"
    run: int  # the execution's run_id: one per execution, shared by its devices (not an order)
    start_s: float
    seconds: float


class StageSamples(NamedTuple):
    features: np.ndarray  # [N, len(FEATURES)]
    times: np.ndarray  # [N] seconds
    layer: np.ndarray  # [N]
    device: np.ndarray  # [N] expert device index j (0..J-1), -1 for an attention stage


def newest_trace(trace_dir: str) -> str:
    """The newest profiler trace file (*.xplane.pb) under `trace_dir`."""
    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise FileNotFoundError(f"no profiler trace (*.xplane.pb) under {trace_dir}")
    return files[-1]


def device_events(trace_file: str) -> Iterator[tuple[int, dict, int, int]]:
    """(device id, stats, start ns, duration ns) of every HLO operation event of the trace."""
    from jax.profiler import ProfileData

    for plane in ProfileData.from_file(trace_file).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "device_ordinal" in stats and "hlo_op" in stats:
                    yield int(stats["device_ordinal"]), stats, event.start_ns, event.duration_ns


def program_runs(trace_file: str) -> list[ProgramRun]:
    """Every (device, execution) of the trace as a run, in no particular order."""
    spans: dict[tuple[int, int], list] = {}
    for device, stats, start, duration in device_events(trace_file):
        key = (device, int(stats["run_id"]))
        end = start + duration
        span = spans.setdefault(key, [str(stats["hlo_module"]), start, end])
        span[1], span[2] = min(span[1], start), max(span[2], end)
    return [
        ProgramRun(device, name.removeprefix("jit_"), run, start * 1e-9, (end - start) * 1e-9)
        for (device, run), (name, start, end) in spans.items()
    ]


def stage_samples(
    runs: Sequence[ProgramRun],
    *,
    attention_devices: Sequence[int],
    expert_devices: Sequence[int],
    layers: int,
    microbatches: int,
    microbatch_sequences: int,
    sequence_length: int,
    heads_per_attention_device: float,
    experts_per_device: int,
    compression: bool,
    assignments: np.ndarray,
) -> StageSamples:
    """Samples of one training step's stage runs (see the module docstring).

    Runs are matched to layers by the order in which they started (run ids carry no order: each
    program counts its own from a random base): micro-batches of a layer run one after another,
    layers in order in the forward sweep and in reverse in the backward sweep, so the k-th run of
    a pool's forward programs is layer (k // micro-batches) % layers, and of its backward
    programs the layer counted from the last. `assignments` [layers, J]: the kept
    assignments each expert device computes per micro-batch and layer (the step's mean); tokens
    per attention device are the micro-batch's tokens over the attention devices."""
    attention = set(attention_devices)
    tokens_per_attention = microbatch_sequences * sequence_length / len(attention_devices)
    rows, times, layer_of, device_of = [], [], [], []

    def add(expert: bool, backward: bool, k: int, tokens_of, seconds: float, j: int) -> None:
        layer = (k // microbatches) % layers
        layer = layers - 1 - layer if backward else layer
        rows.append(
            feature_rows(
                [tokens_of(layer)],
                expert_stage=int(expert),
                backward=int(backward),
                microbatch_sequences=microbatch_sequences,
                sequence_length=sequence_length,
                heads_per_attention_device=heads_per_attention_device,
                experts_per_device=experts_per_device,
                compression=int(compression),
            )[0]
        )
        times.append(seconds)
        layer_of.append(layer)
        device_of.append(j)

    for backward in (False, True):
        programs = STAGE_PROGRAMS[("attention", "backward" if backward else "forward")]
        slowest: dict[int, float] = defaultdict(float)
        started: dict[int, float] = {}
        for r in runs:
            if r.device in attention and r.program in programs:
                slowest[r.run] = max(slowest[r.run], r.seconds)
                started[r.run] = min(started.get(r.run, r.start_s), r.start_s)
        for k, run in enumerate(sorted(slowest, key=started.__getitem__)):
            add(False, backward, k, lambda _: tokens_per_attention, slowest[run], -1)
        programs = STAGE_PROGRAMS[("experts", "backward" if backward else "forward")]
        for j, device in enumerate(expert_devices):
            mine = sorted(
                (r for r in runs if r.device == device and r.program in programs),
                key=lambda r: r.start_s,
            )
            for k, r in enumerate(mine):
                add(
                    True, backward, k, lambda layer, j=j: float(assignments[layer, j]), r.seconds, j
                )
    return StageSamples(
        np.asarray(rows, np.float64).reshape(-1, len(FEATURES)),
        np.asarray(times, np.float64),
        np.asarray(layer_of, np.int32),
        np.asarray(device_of, np.int32),
    )


def measured_imbalance(samples: StageSamples, expert_devices: int) -> dict[str, float]:
    """Imbalance ((slowest - fastest) / slowest, `maxjax.sync.balancer.imbalance`) of the step's
    measured stage times: between the expert devices (the worst layer), and between the pools
    (attention stages' total against the slowest expert device's stages' total)."""
    from maxjax.sync.balancer import imbalance

    experts = samples.device >= 0
    by_layer = []
    for layer in np.unique(samples.layer[experts]):
        per_device = [
            samples.times[experts & (samples.layer == layer) & (samples.device == j)].sum()
            for j in range(expert_devices)
        ]
        by_layer.append(imbalance(per_device))
    expert_totals = [samples.times[samples.device == j].sum() for j in range(expert_devices)]
    attention_total = samples.times[~experts].sum()
    return {
        "experts": max(by_layer, default=0.0),
        "pools": imbalance([attention_total, max(expert_totals, default=0.0)]),
    }
