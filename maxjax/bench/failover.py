"""Fault tolerance of MA separation, measured (seed §5.9): what the replicas cost, how long an
attention failover takes, throughput with failed devices, and a restart from a checkpoint.

`python -m maxjax.bench failover [--config tiny] [--set KEY=VALUE ...] [--repeats N]
[--fail 5,1,9] [--restart] [--json PATH]`

On 16 emulated CPU devices, all in this process:

- **replicas**: the training step (`train_step`: loss, gradients, AdamW, and with
  ``replication_factor: 2`` the standby copies) with factor 1 and 2, taking turns, medians over
  ``--repeats`` steps; the standby's bytes per attention device beside its own state;
- **in-place failover**: the devices of ``--fail`` fail one after the other (each after the
  previous recovery, so every failure is survived): for each, the recovery time (the state rebuilt
  over the survivors and the new standbys made) and the first step after it (which compiles the
  programs of the new layout), then the step time and tokens per second with that many failed
  devices;
- **restart** (``--restart``): the same failure handled the other way: a checkpoint is written,
  then ``python -m maxjax.train`` starts on the attention devices that survive (the layout of
  ``failover: standby``, which a restart needs no spare for) and restores it; the time from the
  process start until its first step is logged (start-up, restore, compile, one step).

All devices share this machine's cores: times compare the paths with each other on this
machine, not with GPUs. Prints, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from maxjax.bench.ma_step import _emulate_devices


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maxjax.bench failover", description=__doc__)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    parser.add_argument(
        "--fail", default="5,1,9", help="attention devices that fail, in order (comma-separated)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="also time a restart from a checkpoint"
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(argv)


def _batches(cfg: Any, count: int) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (cfg.sequence.batch_size, cfg.sequence.length + 1)
    return [rng.integers(0, cfg.training.vocab_size, shape, np.int32) for _ in range(count)]


def _timed_step(runner: Any, state: Any, batch: Any, tx: Any, step: int) -> tuple[Any, float]:
    import jax

    start = time.perf_counter()
    state, metrics = runner.train_step(state, batch, tx, jax.random.key(step))
    jax.block_until_ready((state.params, metrics, runner.standby))
    return state, time.perf_counter() - start


def replica_cost(cfg: Any, repeats: int) -> dict[str, Any]:
    """Training step time with replication_factor 1 and 2 (taking turns) and the standby's
    bytes per attention device."""
    from maxjax import optim
    from maxjax.config import with_overrides
    from maxjax.parallel import make_runner
    from maxjax.parallel.ma.schedule import device_bytes

    runs = {}
    for factor in (1, 2):
        factor_cfg = with_overrides(cfg, [f"ma_separation.attention.replication_factor={factor}"])
        runner = make_runner(factor_cfg, "ma")
        tx = optim.make_optimizer(factor_cfg)
        runs[factor] = [runner, runner.init_train_state(runner.init(0), tx), tx, []]
    batches = _batches(cfg, repeats + 1)
    for i, batch in enumerate(batches):
        for run in runs.values():
            run[1], seconds = _timed_step(run[0], run[1], batch, run[2], i)
            if i:  # the first step compiles
                run[3].append(seconds)
    runner, state = runs[2][0], runs[2][1]
    attention = runner.split_pools(state.params)["attention"]
    own = device_bytes(attention) // len(runner.attention_devices)
    return {
        "step_seconds": {f: statistics.median(run[3]) for f, run in runs.items()},
        "standby_bytes_per_attention_device": runner.standby_bytes(),
        "own_parameter_bytes_per_attention_device": own,
        "repeats": repeats,
    }


def in_place_failover(cfg: Any, failing: list[int], repeats: int) -> list[dict[str, Any]]:
    """Devices `failing` fail one after another; per row: failed devices so far, recovery and
    first-step seconds, median step seconds and tokens per second."""
    from maxjax import optim
    from maxjax.parallel import make_runner

    runner = make_runner(cfg, "ma")
    tx = optim.make_optimizer(cfg)
    state = runner.init_train_state(runner.init(0), tx)
    batches = _batches(cfg, (len(failing) + 1) * (repeats + 1))
    tokens = cfg.sequence.batch_size * cfg.sequence.length
    rows, step = [], 0
    for failed in range(len(failing) + 1):
        row: dict[str, Any] = {"failed_devices": failing[:failed]}
        if failed:
            state, record = runner.fail_device(state, failing[failed - 1], tx)
            row["recovery_seconds"] = record["recovery_seconds"]
            row["head_distribution"] = record["layout"]["head_distribution"]
            row["attention_devices"] = record["layout"]["attention_devices"]
            row["expert_devices"] = record["layout"]["expert_devices"]
        times = []
        for _ in range(repeats + 1):
            state, seconds = _timed_step(runner, state, batches[step], tx, step)
            step += 1
            times.append(seconds)
        row["first_step_seconds"] = times[0]
        row["step_seconds"] = statistics.median(times[1:])
        row["tokens_per_second"] = tokens / row["step_seconds"]
        rows.append(row)
    return rows


def restart_from_checkpoint(config: str, overrides: list[str], failed: int) -> dict[str, Any]:
    """Write a checkpoint (2 steps), then time `python -m maxjax.train` on the layout without
    `failed` from its start until it logs its first step. Runs in subprocesses."""
    from maxjax.config import load_config
    from maxjax.parallel.ma.failover import surviving_config

    cfg = load_config(config, overrides)
    after = surviving_config(cfg, [failed])
    att = after.ma_separation.attention
    layout = [
        f"ma_separation.attention.gpus={att.gpus}",
        f"ma_separation.attention.devices={list(att.devices)}",
        f"ma_separation.attention.head_distribution={list(att.head_distribution)}",
        f"hardware.failed_devices={list(after.hardware.failed_devices)}",
    ]
    with tempfile.TemporaryDirectory() as directory:
        base = [sys.executable, "-m", "maxjax.train", "--config", config, "--no-progress"]
        base += ["--checkpoint-dir", directory]
        for item in overrides:
            base += ["--set", item]
        subprocess.run([*base, "--steps", "2"], check=True, capture_output=True, timeout=900)
        metrics = Path(directory) / "metrics.jsonl"
        logged = len(metrics.read_text().splitlines())
        command = [*base, "--steps", "3"] + [a for item in layout for a in ("--set", item)]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first_step = None
        while process.poll() is None and first_step is None:
            lines = metrics.read_text().splitlines()
            if any('"loss"' in line for line in lines[logged:]):
                first_step = time.perf_counter() - start
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=900)
        if process.returncode:
            raise RuntimeError(f"the restarted run failed: {stderr.decode()[-2000:]}")
        if first_step is None:
            first_step = time.perf_counter() - start
        return {
            "seconds_to_first_step": first_step,
            "failed_device": failed,
            "layout_overrides": layout,
        }


def _report(result: dict[str, Any]) -> None:
    cost = result["replicas"]
    steps = cost["step_seconds"]
    print(f"config {result['config']}, measured here on {result['devices']} (16 emulated devices)")
    print(
        f"  replicas: train step {steps[1] * 1e3:.0f} ms with replication_factor 1, "
        f"{steps[2] * 1e3:.0f} ms with 2 ({100 * (steps[2] / steps[1] - 1):+.1f}%), medians of "
        f"{cost['repeats']}; standby {cost['standby_bytes_per_attention_device'] / 2**20:.1f} MiB "
        f"per attention device (a copy of its predecessor's split parameters and both moments; "
        f"its own parameters: {cost['own_parameter_bytes_per_attention_device'] / 2**20:.1f} "
        "MiB)"
    )
    for row in result["failover"]:
        head = f"  {len(row['failed_devices'])} failed {row['failed_devices']}:"
        if row["failed_devices"]:
            head += (
                f" recovery {row['recovery_seconds']:.2f} s, first step after it "
                f"{row['first_step_seconds']:.2f} s (compiles the new layout); attention "
                f"devices {row['attention_devices']}, expert devices {row['expert_devices']};"
            )
        print(
            f"{head} step {row['step_seconds'] * 1e3:.0f} ms, "
            f"{row['tokens_per_second']:.0f} tokens/s"
        )
    restart = result.get("restart")
    if restart:
        first = result["failover"][1]
        print(
            f"  device {restart['failed_device']} lost, in place: "
            f"{first['recovery_seconds'] + first['first_step_seconds']:.2f} s to the next step "
            f"done; restart from a checkpoint: {restart['seconds_to_first_step']:.2f} s "
            "(process start, restore, compile, one step)"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    _emulate_devices()
    import jax

    from maxjax.config import load_config

    cfg = load_config(args.config, args.set)
    failing = [int(d) for d in args.fail.split(",") if d.strip()]
    result: dict[str, Any] = {
        "config": args.config,
        "overrides": args.set,
        "devices": jax.devices()[0].platform,
        "replicas": replica_cost(cfg, args.repeats),
        "failover": in_place_failover(cfg, failing, args.repeats),
    }
    if args.restart and failing:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        result["restart"] = restart_from_checkpoint(args.config, args.set, failing[0])
    _report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
