"""MA separation across 4 processes x 4 CPU devices (the seed's 4 nodes x 4 GPUs).

Launches `tests/ma_multiprocess_worker.py` four times with `jax.distributed` (gloo collectives);
every process compares its shards of the MA logits and the loss with the single-device reference.
Then `python -m maxjax.train` itself, four times, as tutorials/cluster.md launches it.
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


def cluster_env() -> dict[str, str]:
    """The environment of a launched process: no device count or compile cache from the
    suite's (a process that loads programs from the cache runs ahead of one that compiles them,
    and gloo gives up on collectives whose peers are 30 s apart)."""
    drop = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.slow
def test_ma_across_four_processes_matches_single(tmp_path):
    env = {**cluster_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = free_port()
    runs = run_processes(
        [[sys.executable, str(WORKER), str(i), str(port), str(tmp_path)] for i in range(PROCESSES)],
        [env] * PROCESSES,
        TIMEOUT_S,
    )
    for i, run in enumerate(runs):
        assert run.returncode == 0, f"process {i} failed:\n{(run.stdout + run.stderr)[-4000:]}"
    results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(PROCESSES)]
    # Processes 0-2 hold the attention devices (the logits, split by vocabulary, and the loss);
    # process 3 holds the expert devices only.
    assert [r["logit_shards"] for r in results] == [4, 4, 4, 0]
    for r in results:
        assert r["logits_error"] <= 1e-5
    for r in results[:3]:
        assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * abs(r["reference_loss"])


def launch_train(directory: Path, steps: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """`python -m maxjax.train` as 4 processes x 4 CPU devices, launched the way
    tutorials/cluster.md says (MAXJAX_COORDINATOR_ADDRESS, MAXJAX_NUM_PROCESSES,
    MAXJAX_PROCESS_ID); nothing else is set: the project picks gloo and its transport itself."""
    env = cluster_env()
    env.update(
        JAX_PLATFORMS="cpu",
        MAXJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        MAXJAX_NUM_PROCESSES=str(PROCESSES),
    )
    command = [
        sys.executable,
        "-m",
        "maxjax.train",
        "--config",
        "configs/tiny.yaml",
        "--strategy",
        "ma",
        "--steps",
        str(steps),
        "--checkpoint-dir",
        str(directory),
        "--no-progress",
        *TRAIN_OVERRIDES,
        *extra,
    ]
    return run_processes(
        [command] * PROCESSES,
        [{**env, "MAXJAX_PROCESS_ID": str(i)} for i in range(PROCESSES)],
        TIMEOUT_S * 2,
    )


def run_processes(
    commands: list[list[str]], envs: list[dict[str, str]], timeout: float
) -> list[subprocess.CompletedProcess]:
    """Start the processes together, wait for all of them; kill what is left after `timeout`."""
    procs = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, env in zip(commands, envs, strict=True)
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


# Two layers keep the four processes' compiles short; everything else is configs/tiny.yaml.
TRAIN_OVERRIDES = ("--set", "model.layers=2")


@pytest.mark.slow
def test_training_across_four_processes_logs_the_single_process_losses(tmp_path, tiny_cfg):
    """MA training as 4 processes logs, from process 0, the losses, gradient norms and
    validation loss of the same run in one process on 16 emulated devices (relative 1e-4)."""
    from maxjax.config import with_overrides
    from maxjax.train import train

    steps = 2
    runs = launch_train(tmp_path / "cluster", steps, "--no-checkpoint")
    for i, run in enumerate(runs):
        assert run.returncode == 0, f"process {i} failed:\n{run.stderr[-4000:]}"
    assert "no checkpoints" in runs[0].stdout
    assert not any(p.name != "metrics.jsonl" for p in (tmp_path / "cluster").iterdir())
    cluster = [json.loads(line) for line in (tmp_path / "cluster" / "metrics.jsonl").open()]
    cfg = with_overrides(tiny_cfg, [TRAIN_OVERRIDES[1]])
    single = train(cfg, "ma", steps, tmp_path / "single", progress=False)["history"]
    assert [r["step"] for r in cluster] == [r["step"] for r in single]
    for got, want in zip(cluster, single, strict=True):
        for key in ("loss", "lm_loss", "grad_norm", "val_loss"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-4 * abs(want[key]), (got["step"], key)


@pytest.mark.slow
def test_training_across_processes_refuses_checkpoints_it_cannot_write(tmp_path):
    """Orbax writes only arrays every process holds a shard of; MA keeps its expert pool on the
    fourth process alone, so a run that would checkpoint stops with one line naming the flag
    before it trains, and writes nothing."""
    runs = launch_train(tmp_path / "run", 1)
    for run in runs:
        assert run.returncode == 1
        lines = [line for line in run.stderr.splitlines() if line.startswith("maxjax.train")]
        assert len(lines) == 1 and "--no-checkpoint" in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
