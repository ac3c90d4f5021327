"""Joining a multi-process JAX cluster, and ending cleanly when a process of it is lost.

A collective whose peer has died never returns; JAX's coordination service notices the silence
after its heartbeat timeout and then aborts every other process with a multi-line fatal log and a
stack trace. `PeerWatch` ends them first, with one line: every process publishes a counter in the
coordination service's key-value store every second and watches the others'; a process whose
counter has not moved for `peer_timeout_s` seconds (MAXJAX_PEER_TIMEOUT_S, default 30) is named
as lost, and each survivor prints

    maxjax.train: error: process 2 stopped responding (no heartbeat for 30 s); ...

and exits with status 1 (on CPU, gloo can end a survivor first: see `maxjax.stderr_relay`).
JAX's own heartbeat timeout is set to 4 x that + 10 s (JAX sends its heartbeats at intervals of
a good part of its timeout, so a shorter one could fire first), so the watch speaks first. A
process that ends normally marks its heartbeat "done" on the way out, so a peer that finishes
later does not take it for lost.

Process 0 hosts the coordination service. When it dies, JAX's client in every other process sees
the connection drop and aborts the process from C++ within a second, before the watch can speak.
So a cluster process's standard error runs through `maxjax.stderr_relay`, which replaces that
abort's report by the same kind of line, naming process 0 (MAXJAX_DEBUG=1: no relay, the report
as JAX writes it). Checkpoints are written into a temporary directory renamed only when
complete, so starting all processes again resumes from the newest complete one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax

from maxjax import stderr_relay

PEER_TIMEOUT_S = 30
_WATCH: PeerWatch | None = None
_KEY = "maxjax/heartbeat/"
_DONE = "done"


def peer_timeout_s() -> float:
    return float(os.environ.get("MAXJAX_PEER_TIMEOUT_S", PEER_TIMEOUT_S))


def cluster_arguments() -> dict[str, Any] | None:
    """`jax.distributed.initialize`'s arguments for the cluster the environment describes, None
    if it describes none: MAXJAX_COORDINATOR_ADDRESS (host:port of process 0),
    MAXJAX_NUM_PROCESSES and MAXJAX_PROCESS_ID, or SLURM or Open MPI with more than one task
    (no arguments: JAX's own auto-detection)."""
    env = os.environ
    if "MAXJAX_COORDINATOR_ADDRESS" in env:
        return {
            "coordinator_address": env["MAXJAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env["MAXJAX_NUM_PROCESSES"]),
            "process_id": int(env["MAXJAX_PROCESS_ID"]),
        }
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return {}
    return None


def init_distributed() -> bool:
    """Join a multi-process JAX cluster if the environment describes one (`cluster_arguments`);
    True if it did. Once joined, standard error goes through the relay (`relay_stderr`) and a
    `PeerWatch` starts."""
    arguments = cluster_arguments()
    if arguments is None:
        return False
    timeout = peer_timeout_s()
    jax.distributed.initialize(**arguments, heartbeat_timeout_seconds=int(4 * timeout) + 10)
    if os.environ.get("MAXJAX_DEBUG") != "1":
        relay_stderr(jax.process_index(), jax.process_count())
    global _WATCH
    _WATCH = PeerWatch(timeout)
    _WATCH.start()
    return True


def wait_for_lost_peer() -> None:
    """Called when a computation failed in a cluster run (gloo: "Connection closed by peer"
    when a peer died mid-collective): give the watch the time to name the lost process, which
    ends this process with its line. Returns at once outside a cluster, or when the watch has
    named nobody after the peer timeout (the failure was something else)."""
    if _WATCH is None or not _WATCH.is_alive():
        return
    deadline = time.monotonic() + _WATCH.timeout_s + 5 * _WATCH.interval_s
    while time.monotonic() < deadline and _WATCH.is_alive():
        time.sleep(0.1)


def relay_stderr(process: int, processes: int) -> subprocess.Popen:
    """Send this process's standard error (file descriptor 2, so JAX's C++ logs too) through a
    `maxjax.stderr_relay` process writing to the original one. At a normal exit the original is
    put back and the relay drained before the process ends."""
    original = os.dup(2)
    relay = subprocess.Popen(
        [sys.executable, stderr_relay.__file__, program_name(), str(process), str(processes)],
        stdin=subprocess.PIPE,
        stdout=original,
    )
    sys.stderr.flush()
    os.dup2(relay.stdin.fileno(), 2)
    relay.stdin.close()

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            relay.wait(timeout=5)

    atexit.register(drain)
    return relay


def program_name() -> str:
    """'maxjax.train' under `python -m maxjax.train`, the script's name otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0] or "maxjax").stem


def _client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


class PeerWatch(threading.Thread):
    """Publishes this process's heartbeat and ends the process with one line when another
    process's heartbeat stops (see the module docstring)."""

    def __init__(self, timeout_s: float, interval_s: float = 1.0):
        super().__init__(name="maxjax-peer-watch", daemon=True)
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.process = jax.process_index()
        self.processes = jax.process_count()
        self.finished = False
        self._publishing = threading.Lock()
        atexit.register(self.finish)

    def finish(self) -> None:
        """Mark this process's heartbeat done (it is ending normally) and stop watching."""
        with self._publishing, contextlib.suppress(Exception):  # a service already gone
            self.finished = True
            _client().key_value_set(f"{_KEY}{self.process}", _DONE, allow_overwrite=True)

    def run(self) -> None:
        client = _client()
        beat = 0
        started = time.monotonic()
        seen: dict[int, tuple[str, float]] = {}
        while not self.finished:
            try:
                with self._publishing:
                    if self.finished:
                        return
                    client.key_value_set(f"{_KEY}{self.process}", str(beat), allow_overwrite=True)
                values = dict(client.key_value_dir_get(_KEY))
            except Exception as e:  # noqa: BLE001 - the service is gone: process 0 is lost
                if self.finished:
                    return
                self.stop(f"the coordinator (process 0) stopped responding ({type(e).__name__})")
                return
            beat += 1
            now = time.monotonic()
            for peer in range(self.processes):
                value = values.get(f"{_KEY}{peer}")
                if value is not None and seen.get(peer, (None,))[0] != value:
                    seen[peer] = (value, now)
                last = seen.get(peer, (None, started))[1]
                lost = value != _DONE and now - last > self.timeout_s
                if peer != self.process and lost and not self.finished:
                    self.stop(
                        f"process {peer} stopped responding (no heartbeat for "
                        f"{self.timeout_s:g} s)",
                        waiting=self.process == 0,
                    )
                    return
            time.sleep(self.interval_s)

    def stop(self, why: str, waiting: bool = False) -> None:
        """Print the line and exit. With `waiting` (process 0, which hosts the coordination
        service) first wait until the other survivors have stopped too: the service ending
        would otherwise make JAX abort them before they print their own line."""
        line = stderr_relay.summary(program_name(), why, self.process, self.processes)
        sys.stderr.write(line.decode())
        sys.stderr.flush()
        if waiting:
            self._wait_until_peers_stop()
        os._exit(1)

    def _wait_until_peers_stop(self) -> None:
        """Until no other process's heartbeat has moved for 3 intervals (at most the timeout)."""
        client, quiet_s = _client(), 3 * self.interval_s
        start = time.monotonic()
        values: dict[str, str] = {}
        changed = start
        while time.monotonic() - start < self.timeout_s:
            try:
                now_values = dict(client.key_value_dir_get(_KEY))
            except Exception:  # noqa: BLE001 - nothing left to wait for
                return
            now_values.pop(f"{_KEY}{self.process}", None)
            if now_values != values:
                values, changed = now_values, time.monotonic()
            elif time.monotonic() - changed >= quiet_s:
                return
            time.sleep(self.interval_s / 4)


def check(config: str) -> dict[str, Any]:
    """Join the cluster the environment describes exactly as `maxjax.train` does (the config's
    devices per process, gloo on CPU) and run one collective over every device of every
    process. What this process saw."""
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from maxjax.config import load_config
    from maxjax.evaluate import setup_jax

    setup_jax(load_config(config))
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("all",))
    local = np.array([[d.id] for d in jax.local_devices()], np.int32)
    ids = multihost_utils.host_local_array_to_global_array(local, mesh, P("all"))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ids)
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "local_devices": [d.id for d in jax.local_devices()],
        "devices": len(devices),
        "collective_ok": int(total.addressable_data(0)) == sum(d.id for d in devices),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m maxjax.cluster",
        description="Check a cluster launch before a long job: join it as maxjax.train would, "
        "run one collective over every device, print what this process sees.",
    )
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--hold", type=float, default=0.0, help="stay joined this many seconds")
    args = parser.parse_args(argv)
    if cluster_arguments() is None:
        print(
            f"{program_name()}: error: no cluster in the environment: set "
            "MAXJAX_COORDINATOR_ADDRESS, MAXJAX_NUM_PROCESSES and MAXJAX_PROCESS_ID, or start "
            "it under SLURM or Open MPI (tutorials/cluster.md)",
            file=sys.stderr,
        )
        return 2
    seen = check(args.config)
    print(
        f"process {seen['process']} of {seen['processes']}: local devices "
        f"{seen['local_devices']} of {seen['devices']}; collective over all devices: "
        f"{'ok' if seen['collective_ok'] else 'WRONG RESULT'}",
        flush=True,
    )
    time.sleep(args.hold)
    return 0 if seen["collective_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
