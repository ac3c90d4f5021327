"""A discrete-event simulation of a schedule of tasks on resources (device streams, links).

Each resource runs its tasks one at a time in the order they were submitted, like a stream; a
task starts when every resource it needs is free and every task it depends on has ended. A task
holding several resources (a transfer holds the sender's and the receiver's link) occupies all
of them for its duration. Submission order is a topological order, so one pass schedules all.
"""

from __future__ import annotations

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


def simulate(tasks: Sequence[Task]) -> Timeline:
    """Start and end of every task; tasks must come in a topological (submission) order."""
    free: dict[str, float] = {}
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
        ready = max(
            [end[d] for d in task.deps] + [free.get(r, 0.0) for r in task.resources] + [0.0]
        )
        start[task.name] = ready
        end[task.name] = ready + task.duration
        for r in task.resources:
            free[r] = end[task.name]
    return Timeline(tuple(tasks), start, end)
