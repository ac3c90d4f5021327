"""One line instead of JAX's fatal report when a cluster's coordination service is lost.

Process 0 of a multi-process run hosts JAX's coordination service. When that process dies, JAX's
client in every other process aborts it from C++ within a second: an error line, a fatal line,
a native stack trace and Python's own abort dump. No Python code runs in between, so
`maxjax.cluster.PeerWatch` cannot speak first as it does for any other lost process.

`maxjax.cluster.relay_stderr` therefore routes a cluster process's standard error through this
small process (standard library only, started as `python .../stderr_relay.py PROGRAM PROCESS
PROCESSES`). It passes every line on unchanged, except JAX's fatal block: the C++ errors logged
as the service goes away, the fatal line and everything the dying process writes after it are
replaced by one line naming the lost process, in the form `PeerWatch` uses (see `Relay`). A
relay ignores SIGINT and SIGTERM, so what its process writes while being stopped still comes
through, and ends when the process's standard error closes.

The gloo CPU collectives can end a survivor the same way when any other process dies: a
survivor whose collective failed moves on, and its next collective's data reaches a process
still waiting in the old one, whose gloo thread then throws and C++ terminates the process.
That report (`terminate called after throwing an instance of 'gloo::...'`, gloo's message and
the abort dump) becomes one line too, with gloo's message in it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time
from typing import BinaryIO

FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
# gloo (the CPU collectives) throwing on one of its own threads: C++ terminates the process.
GLOO_ABORT = b"terminate called after throwing an instance of 'gloo::"
# An absl log line (JAX's C++ logging): severity, date, time, thread, file:line].
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ \]]+:\d+\]")
_TASK = re.compile(rb"/task:(\d+)")
HOLD_S = 2.0


def lost_process(fatal: bytes) -> str:
    """Who was lost, from JAX's fatal line: the coordinator (process 0) when the service itself
    cannot be reached, else the task the service names."""
    if b"Failed to send RPC to coordination service" in fatal or b"UNAVAILABLE" in fatal:
        return "process 0 stopped responding (it hosts the coordination service, now unreachable)"
    task = _TASK.search(fatal)
    if task is not None:
        return f"process {int(task.group(1))} stopped responding (reported by the coordination service)"
    return "a process of the cluster was lost (reported by the coordination service)"


def gloo_aborted(detail: bytes) -> str:
    """Why, when gloo ended the process: a peer lost mid-collective does this (a survivor that
    moved on sends its next collective's data where another survivor waits for the lost one's).
    gloo's own message says which check failed."""
    why = "gloo aborted this process in a collective, as it does when a peer process is lost"
    shown = detail.decode(errors="replace")
    return f"{why} ({shown})" if shown else why


def summary(program: str, why: str, process: int, processes: int) -> bytes:
    return (
        f"{program}: error: {why}; process {process} stops too. Start all {processes} processes "
        "again to resume from the newest complete checkpoint.\n"
    ).encode()


class Relay:
    """The filter itself, fed line by line with the time each arrived.

    A C++ log line and every line after it are held for `hold_s` seconds: the errors JAX logs
    as the service goes away come just before its fatal line. Lines whose hold ends are written
    in order; when the fatal line comes, what is held is dropped and the one line written
    instead (nothing, if the process already wrote its own `PROGRAM: error:` line)."""

    def __init__(
        self, sink: BinaryIO, program: str, process: int, processes: int, hold_s: float = HOLD_S
    ):
        self.sink, self.program = sink, program
        self.process, self.processes, self.hold_s = process, processes, hold_s
        self.held: list[tuple[float, bytes]] = []
        self.said = False
        self.fatal = False
        self.gloo_abort = False

    def feed(self, line: bytes, now: float) -> None:
        if self.gloo_abort:
            self.gloo_abort = False
            detail = line.split(b"what():", 1)[1].strip() if b"what():" in line else b""
            self.say(gloo_aborted(detail))
            return
        if self.fatal:
            return
        if GLOO_ABORT in line:
            self.fatal = self.gloo_abort = True
            self.held.clear()
            return
        if FATAL in line:
            self.fatal = True
            self.held.clear()
            self.say(lost_process(line))
            return
        self.release(now)
        if self.held or _LOG_LINE.match(line):
            self.held.append((now, line))
            return
        self.said = self.said or line.startswith(f"{self.program}: error:".encode())
        self.sink.write(line)
        self.sink.flush()

    def say(self, why: str) -> None:
        """The one line (nothing if the process already wrote its own)."""
        if not self.said:
            self.sink.write(summary(self.program, why, self.process, self.processes))
            self.said = True
        self.sink.flush()

    def close(self) -> None:
        """The stream ended: write what is still held, or the line of an abort whose detail
        never came."""
        if self.gloo_abort:
            self.gloo_abort = False
            self.say(gloo_aborted(b""))
        self.release(0.0, everything=not self.fatal)

    def release(self, now: float, everything: bool = False) -> None:
        """Write the held lines whose hold has ended (all, with `everything`), in order."""
        while self.held and (everything or now - self.held[0][0] >= self.hold_s):
            self.sink.write(self.held.pop(0)[1])
        self.sink.flush()

    def next_release(self) -> float | None:
        return self.held[0][0] + self.hold_s if self.held else None


def run(source_fd: int, relay: Relay) -> None:
    """Feed `relay` the lines read from `source_fd` until it closes."""
    pending = b""
    while True:
        due = relay.next_release()
        wait = None if due is None else max(0.0, due - time.monotonic())
        readable, _, _ = select.select([source_fd], [], [], wait)
        if not readable:
            relay.release(time.monotonic())
            continue
        chunk = os.read(source_fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            relay.feed(line + b"\n", time.monotonic())
    if pending:
        relay.feed(pending, time.monotonic())
    relay.close()


def main(argv: list[str]) -> None:
    program, process, processes = argv[0], int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run(sys.stdin.fileno(), Relay(sys.stdout.buffer, program, process, processes))


if __name__ == "__main__":
    main(sys.argv[1:])
