"""The balancer: decide when the pools are out of balance and what plan restores it.

Pure functions of arrays and plain values: the imbalance between devices, an expert placement
per layer that evens them (which expert lives on which expert device, each device holding at
most its slots), and the ping-pong schedule's time for a micro-batch count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np


def imbalance(times: Sequence[float] | np.ndarray) -> float:
    """(slowest - fastest) / slowest: 0 when balanced; the seed acts above 0.05."""
    t = np.asarray(times, dtype=np.float64)
    return float((t.max() - t.min()) / t.max()) if t.max() > 0 else 0.0


def rebalance_experts(
    expert_load: Sequence[float] | np.ndarray,
    devices: Sequence[str],
    experts_per_device: int,
) -> dict[str, tuple[int, ...]]:
    """Place experts on devices so that the summed loads are as even as a heuristic makes them.

    Heaviest expert first, each onto the least-loaded device that still has room (longest
    processing time first), then improved by moves and swaps (`_exchange`). Each device holds
    at most `experts_per_device`: all are full when the experts fill the devices, some slots
    stay empty when not (as after an expert device failed).
    """
    load = np.asarray(expert_load, dtype=np.float64)
    if load.size > len(devices) * experts_per_device:
        raise ValueError(
            f"{load.size} experts do not fit {len(devices)} devices x {experts_per_device}"
        )
    placed: dict[str, list[int]] = {d: [] for d in devices}
    totals = dict.fromkeys(devices, 0.0)
    for expert in np.argsort(-load, kind="stable"):
        open_devices = [d for d in devices if len(placed[d]) < experts_per_device]
        target = min(open_devices, key=lambda d: (totals[d], devices.index(d)))
        placed[target].append(int(expert))
        totals[target] += float(load[expert])
    groups = _exchange([placed[d] for d in devices], load, experts_per_device)
    return {d: tuple(sorted(experts)) for d, experts in zip(devices, groups, strict=True)}


def _exchange(groups: list[list[int]], load: np.ndarray, capacity: int) -> list[list[int]]:
    """Improve a placement by moving one expert, or swapping two, between the most (or least)
    loaded device and any other: the step that narrows the spread of the device loads most is
    taken, until none narrows it (the greedy pass leaves loads that a swap would even)."""
    groups = [list(g) for g in groups]
    for _ in range(4 * len(load)):
        totals = np.array([float(load[g].sum()) for g in groups])
        hi, lo = int(np.argmax(totals)), int(np.argmin(totals))
        best, best_spread = None, float(totals.max() - totals.min())
        pairs = {(hi, o) for o in range(len(groups)) if o != hi}
        pairs |= {(o, lo) for o in range(len(groups)) if o != lo}
        for src, dst in sorted(pairs):
            options = [(e, None) for e in groups[src]] if len(groups[dst]) < capacity else []
            options += [(e, f) for e in groups[src] for f in groups[dst]]
            for e, f in options:
                shift = float(load[e]) - (float(load[f]) if f is not None else 0.0)
                trial = totals.copy()
                trial[src] -= shift
                trial[dst] += shift
                if trial.max() - trial.min() < best_spread - 1e-12:
                    best, best_spread = (src, dst, e, f), float(trial.max() - trial.min())
        if best is None:
            break
        src, dst, e, f = best
        groups[src].remove(e)
        groups[dst].append(e)
        if f is not None:
            groups[dst].remove(f)
            groups[src].append(f)
    return groups


def pingpong_layer_time(attention_time: float, expert_time: float, microbatches: int) -> float:
    """One layer of the two-pool pipeline with m micro-batches, each stage taking t/m per micro-batch.

    The first micro-batch passes both stages; each further one adds the slower stage's share:
    a/m + e/m + (m - 1) * max(a, e)/m. Per-micro-batch overheads are the predictor's to model
    (pass times predicted for the micro-batch size instead of dividing).
    """
    a, e, m = attention_time / microbatches, expert_time / microbatches, microbatches
    return a + e + (m - 1) * max(a, e)


def device_load_rows(loads: np.ndarray, order: np.ndarray, devices: int) -> np.ndarray:
    """Each expert device's summed load per layer [L, J], for loads [L, E] of canonical experts
    and a placement order [L, R] (canonical expert of each row, device-major; -1 for an empty
    slot, which carries no load)."""
    loads, order = np.asarray(loads, np.float64), np.asarray(order)
    by_row = np.take_along_axis(loads, np.maximum(order, 0), axis=1)
    by_row = np.where(order >= 0, by_row, 0.0)
    return by_row.reshape(len(order), devices, -1).sum(-1)


def _least_moves(groups: list[tuple[int, ...]], current: np.ndarray) -> list[tuple[int, ...]]:
    """The expert groups assigned to devices so that as many experts as possible stay where
    they are (`current` [J, R/J], -1 for an empty slot); every assignment is tried (J! of them,
    J = expert devices)."""
    best, kept_best = groups, -1
    for assignment in itertools.permutations(range(len(groups))):
        kept = sum(len(set(groups[g]) & set(current[d])) for d, g in enumerate(assignment))
        if kept > kept_best:
            best, kept_best = [groups[g] for g in assignment], kept
    return best


def layer_imbalance(
    loads: np.ndarray,
    order: np.ndarray,
    devices: int,
    device_time: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Per layer, the `imbalance` between the expert devices of placement `order` [L, R] for
    expert loads [L, E]: of their loads, or of `device_time` of their loads (see
    `plan_placement`)."""
    rows = device_load_rows(loads, order, devices)
    values = rows if device_time is None else device_time(rows)
    return np.array([imbalance(v) for v in values])


def plan_placement(
    loads: np.ndarray,
    order: np.ndarray,
    devices: int,
    threshold: float,
    device_time: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A new placement for the layers whose expert devices differ by more than `threshold`
    (`imbalance`), each re-placed by `rebalance_experts` and kept only where it evens the
    devices; the others keep their order. The new groups go to the devices that keep the most
    of their experts, so that as little as possible moves.

    loads [L, E]: each canonical expert's load (e.g. share of routed assignments); order
    [L, R]: the placement in use (R = E, or more rows when some slots are empty, -1).
    `device_time` maps the devices' loads [N, J] to their predicted stage times [N, J] (a
    fitted time model); with it, the devices are compared by predicted time (what the
    threshold applies to, and what a new placement must even), otherwise by load. The groups are
    planned from the loads either way. Returns (order [L, R], imbalance before [L], after [L])."""
    order = np.asarray(order, np.int32)
    per_device = order.shape[1] // devices
    before = layer_imbalance(loads, order, devices, device_time)
    new_order, after = order.copy(), before.copy()
    names = [str(d) for d in range(devices)]
    for layer in np.flatnonzero(before > threshold):
        groups = list(rebalance_experts(loads[layer], names, per_device).values())
        current = order[layer].reshape(devices, per_device)
        placed = _least_moves(groups, current)
        # A device that keeps its experts keeps their rows too; the others' empty slots last.
        placed = [
            c if set(g) == set(c[c >= 0]) else (*g, *[-1] * (per_device - len(g)))
            for g, c in zip(placed, current, strict=True)
        ]
        row = np.array([e for g in placed for e in g], np.int32)
        balanced = layer_imbalance(loads[layer][None], row[None], devices, device_time)[0]
        if balanced < before[layer]:
            new_order[layer], after[layer] = row, balanced
    return new_order, before, after
