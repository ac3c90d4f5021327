"""The cluster helpers that need no cluster: the standard-error relay that turns JAX's fatal
report on losing the coordination service into one line (`maxjax.stderr_relay`), and the
`python -m maxjax.cluster` check's refusal without a cluster."""

import io
import subprocess
import sys

from maxjax.stderr_relay import Relay, lost_process

# What JAX 0.10.2 writes to a surviving process's standard error when process 0 (the
# coordination service's host) is killed: two C++ log lines, more from the preemption manager,
# the fatal line, its native stack trace and Python's abort dump.
DYING = b"""W1127 05:46:04.029518   29673 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/GetKeyValue:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}. This is only expected if one of the tasks is unhealthy.
E1127 05:44:10.094802   29130 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1127 05:44:10.094889   29130 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
*** Check failure stack trace: ***
    @     0x7fef7ac40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
Fatal Python error: Aborted

Thread 0x00007f036c403b80 (most recent call first):
"""


# What a survivor of a lost process wrote when gloo ended it (a CI run of the 4-process test):
# a survivor that moved on sent its next collective's 8 bytes where this one waited for 4.
GLOO_DYING = b"""terminate called after throwing an instance of 'gloo::EnforceNotMet'
  what():  [enforce fail at external/gloo/gloo/transport/tcp/pair.cc:459] op.preamble.length <= op.nbytes. 8 vs 4. Received data size doesn't match expected size. Is there a distributed collective mismatch in your code?
Fatal Python error: Aborted

Thread 0x00007f036c403b80 (most recent call first):
"""


def relayed(text: bytes) -> list[str]:
    """The lines a relay for process 1 of 4 writes for `text`, fed at once, then closed."""
    sink = io.BytesIO()
    relay = Relay(sink, "maxjax.train", 1, 4)
    for line in text.splitlines(keepends=True):
        relay.feed(line, 0.0)
    relay.close()
    return sink.getvalue().decode().splitlines()


def test_losing_the_coordinator_becomes_one_line_after_what_came_before():
    lines = relayed(b"step 3 of 8\n" + DYING)
    assert lines[0] == "step 3 of 8"
    assert len(lines) == 2, lines
    assert lines[1].startswith("maxjax.train: error: process 0 stopped responding")
    assert "process 1 stops too" in lines[1] and "Start all 4 processes" in lines[1]


def test_log_lines_without_a_fatal_one_pass_unchanged_in_order():
    text = b"W1127 05:46:04.029518   29673 some_file.cc:147] a warning\nnext line\nlast\n"
    sink = io.BytesIO()
    relay = Relay(sink, "maxjax.train", 1, 4, hold_s=2.0)
    relay.feed(text.splitlines(keepends=True)[0], 0.0)
    relay.feed(b"next line\n", 0.5)
    assert sink.getvalue() == b""  # held: a fatal line could still follow
    relay.release(2.1)
    assert sink.getvalue() == text.splitlines(keepends=True)[0]
    relay.release(2.6)
    relay.feed(b"last\n", 2.7)
    assert sink.getvalue() == text


def test_a_process_that_said_why_gets_no_second_line():
    own = b"maxjax.train: error: process 2 stopped responding (no heartbeat for 10 s); ...\n"
    assert relayed(own + DYING) == [own.decode().rstrip("\n")]


def test_gloo_ending_the_process_becomes_one_line_with_its_message():
    lines = relayed(b"step 3 of 8\n" + GLOO_DYING)
    assert len(lines) == 2 and lines[0] == "step 3 of 8", lines
    assert lines[1].startswith("maxjax.train: error: gloo aborted this process in a collective")
    assert "Received data size doesn't match expected size" in lines[1]
    assert "process 1 stops too" in lines[1]
    # The stream ends before gloo's message: the line still comes, without it.
    cut = relayed(GLOO_DYING.splitlines(keepends=True)[0])
    assert len(cut) == 1 and cut[0].startswith("maxjax.train: error: gloo aborted"), cut
    own = b"maxjax.train: error: process 2 stopped responding (no heartbeat for 10 s); ...\n"
    assert relayed(own + GLOO_DYING) == [own.decode().rstrip("\n")]


def test_the_lost_process_comes_from_the_fatal_line():
    assert lost_process(b"... UNAVAILABLE: Failed to send RPC to coordination service").startswith(
        "process 0 "
    )
    named = b"INTERNAL: Task /job:jax_worker/replica:0/task:3 heartbeat timeout"
    assert lost_process(named).startswith("process 3 ")
    assert lost_process(b"INTERNAL: something else").startswith("a process of the cluster")


def test_cluster_check_refuses_without_a_cluster():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-m", "maxjax.cluster"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "error: no cluster in the environment" in run.stderr
