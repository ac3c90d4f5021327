"""Per-pool busy time and overlap from a profiler trace.

`jax.profiler` records every executed HLO operation with the device that ran it (the
``device_ordinal`` stat, a `jax.Device.id`). A device is *busy* while one of its operations runs
(a collective counts while it waits for its peers: the device can do nothing else then either).
A pool is busy while any of its devices is. The *overlap* is the fraction of the expert pool's
busy time during which the attention pool is busy too: what the micro-batch ping-pong is for.
"""

from __future__ import annotations

from collections.abc import Iterable

Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Disjoint, sorted intervals covering the same points."""
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in union(intervals))


def intersection(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Intervals covered by both."""
    a, b = union(a), union(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def device_intervals(trace_dir: str) -> dict[int, list[Interval]]:
    """Busy intervals (seconds) of every device in the newest trace under `trace_dir`."""
    from maxjax.sync.measure import device_events, newest_trace

    busy: dict[int, list[Interval]] = {}
    for device, _, start_ns, duration_ns in device_events(newest_trace(trace_dir)):
        start = start_ns * 1e-9
        busy.setdefault(device, []).append((start, start + duration_ns * 1e-9))
    return busy


def pool_activity(
    busy: dict[int, list[Interval]], attention: Iterable[int], experts: Iterable[int]
) -> dict[str, float]:
    """Busy seconds of each pool, their overlap, and the overlap's share of the expert pool's
    busy time."""
    attention_busy = union(i for d in attention for i in busy.get(d, []))
    expert_busy = union(i for d in experts for i in busy.get(d, []))
    both = length(intersection(attention_busy, expert_busy))
    expert_s = length(expert_busy)
    return {
        "attention_busy_s": length(attention_busy),
        "experts_busy_s": expert_s,
        "overlap_s": both,
        "overlap_fraction_of_experts": both / expert_s if expert_s else 0.0,
    }
