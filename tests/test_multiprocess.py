"""MA separation across 4 processes x 4 CPU devices (the seed's 4 nodes x 4 GPUs).

Launches `tests/ma_multiprocess_worker.py` four times with `jax.distributed` (gloo collectives);
every process compares its shards of the MA logits and the loss with the single-device reference.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ma_multiprocess_worker.py")
ROOT = WORKER.parent.parent
PROCESSES = 4
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ma_across_four_processes_matches_single(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(tmp_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(PROCESSES)]
    # Processes 0-2 hold the attention devices (the logits, split by vocabulary, and the loss);
    # process 3 holds the expert devices only.
    assert [r["logit_shards"] for r in results] == [4, 4, 4, 0]
    for r in results:
        assert r["logits_error"] <= 1e-5
    for r in results[:3]:
        assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * abs(r["reference_loss"])
