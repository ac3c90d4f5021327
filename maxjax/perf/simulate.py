"""A discrete-event simulation of a schedule of tasks on resources (device streams, links).

A device runs its programs one at a time in the order they were issued, like a stream; a link
carries one transfer at a time, in the first free gap after the transfer is ready. A task starts
when every resource it needs is free and every task it depends on has ended; a task holding
several resources (a transfer holds the sender's and the receiver's link) occupies all of them
for its duration. Submission order is a topological order, so one pass schedules all.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Task:
    """A program, transfer or collective: runs `duration` seconds on all its `resources`."""

    name: str
    resources: tuple[str, ...]
    duration: float
    deps: tuple[str, ...] = ()
    kind: str = "compute"
    nbytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class Timeline:
    """When every task ran."""

    tasks: tuple[Task, ...]
    start: dict[str, float]
    end: dict[str, float]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def busy(self, resource: str) -> float:
        """Seconds `resource` spent running tasks."""
        return sum(t.duration for t in self.tasks if resource in t.resources)

    def resources(self) -> list[str]:
        return sorted({r for t in self.tasks for r in t.resources})

    def active_time(self, keep) -> float:
        """Wall time during which at least one task satisfying keep(task) runs (interval union)."""
        spans = sorted((self.start[t.name], self.end[t.name]) for t in self.tasks if keep(t))
        return union_length(spans)


def union_length(spans: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(spans):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def is_stream(resource: str) -> bool:
    """Devices (and the shared CPU host) run programs in issue order; links do not."""
    return resource.startswith(("dev:", "host"))


def _first_gap(busy: list[tuple[float, float]], start: float, duration: float) -> float:
    """Earliest time >= start at which [t, t + duration) overlaps none of `busy` (sorted)."""
    t = start
    for s, e in busy:
        if e <= t:
            continue
        if s >= t + duration:
            break
        t = e
    return t


def simulate(tasks: Sequence[Task], stream=is_stream) -> Timeline:
    """Start and end of every task; tasks must come in a topological (submission) order.

    A stream resource runs its tasks in submission order. A link takes a task in the first gap
    long enough for it after the task is ready, so a transfer that is ready early is not held
    behind one issued before it that still waits for its inputs.
    """
    free: dict[str, float] = {}
    intervals: dict[str, list[tuple[float, float]]] = {}
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for task in tasks:
        if task.name in end:
            raise ValueError(f"task {task.name!r} appears twice")
        if task.duration < 0:
            raise ValueError(f"task {task.name!r} has a negative duration {task.duration}")
        missing = [d for d in task.deps if d not in end]
        if missing:
            raise ValueError(
                f"task {task.name!r} depends on {missing[0]!r}, not submitted before it"
            )
        t = max(
            [end[d] for d in task.deps]
            + [free.get(r, 0.0) for r in task.resources if stream(r)]
            + [0.0]
        )
        links = [r for r in task.resources if not stream(r)]
        while links:
            moved = max(_first_gap(intervals.get(r, []), t, task.duration) for r in links)
            if moved == t:
                break
            t = moved
        start[task.name] = t
        end[task.name] = t + task.duration
        for r in task.resources:
            free[r] = max(free.get(r, 0.0), end[task.name])
            if not stream(r):
                bisect.insort(intervals.setdefault(r, []), (t, end[task.name]))
    return Timeline(tuple(tasks), start, end)
