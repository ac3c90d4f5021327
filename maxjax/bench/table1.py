"""Table 1 of the seed: TPOT, TPS, throughput, utilisation and memory efficiency per strategy.

`python -m maxjax.bench table1 [--config PATH] [--json PATH] [--repeats N] [--set KEY=VALUE ...]`

What the numbers mean on emulated devices. Without an accelerator the 16 "devices" are XLA CPU
devices that share this machine's cores, so a strategy's wall time is the total work of all its
device programs plus its overheads (collectives become memory copies, the pipeline bubble is
computed on zeros, replicated routing is done 8 times, the host dispatches every program), not
the time of 16 GPUs working in parallel. TPOT and throughput here rank the strategies by work and
overhead at the tiny config's sizes; they are not comparable to the seed's milliseconds on 16
A100s. Utilisation is model flops utilisation of the whole host: the flops of one training step
of the model (the single-device program's `cost_analysis`, so no redundant or bubble work)
divided by the step's wall time times the float32 matmul rate this host reaches. Memory
efficiency is the bytes a device holds at the peak of a training step, from the memory plan
(`python -m maxjax.bench memory`; parameters, AdamW state, gradients, saved residuals, pieces and
the temporaries of every program the device runs, the same accounting for every strategy), over a
stated capacity (the seed's 80 GB A100), so at tiny sizes it is a tiny fraction; the per-device
bytes are reported beside it. The seed's values are printed next to ours for
reference only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import jax
import numpy as np

from maxjax.bench import measure

SEED_TABLE1 = {
    "tp": {"tpot_ms": 2.84, "tps": 8450, "throughput": 135200, "utilization": 68.4,
           "memory_efficiency": 72.3},
    "pp": {"tpot_ms": 3.12, "tps": 7692, "throughput": 123072, "utilization": 62.1,
           "memory_efficiency": 69.8},
    "tp_pp": {"tpot_ms": 2.76, "tps": 8696, "throughput": 139136, "utilization": 71.2,
              "memory_efficiency": 74.1},
    "ma": {"tpot_ms": 1.82, "tps": 13289, "throughput": 212624, "utilization": 89.7,
           "memory_efficiency": 85.4},
}  # fmt: skip
TABLE_STRATEGIES = ("tp", "pp", "tp_pp", "ma")
THROUGHPUT_WORKLOAD = "training steps (loss, gradients, clip, AdamW): tokens/s"


def parse_args(argv: list[str], description: str = "Table 1 of the seed") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maxjax.bench table1", description=description)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--strategies", default=",".join(TABLE_STRATEGIES))
    parser.add_argument("--batch", type=int, help="training batch (default: a multiple of 16)")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, help="default: sequence.length")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--capacity-gb", type=float, default=80.0, help="device memory capacity")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Any:
    from maxjax.config import load_config

    return load_config(args.config, args.set)


def available_strategies(requested: str) -> list[str]:
    """The requested strategies that are registered; a note on stdout for each missing one.
    Raises ConfigError when none of them is (a table without rows)."""
    from maxjax.config import ConfigError
    from maxjax.parallel import STRATEGIES

    names = [s.strip() for s in requested.split(",") if s.strip()]
    found = [n for n in names if n in STRATEGIES]
    if not found:
        raise ConfigError(
            "--strategies",
            f"none of {names} is available; choose from {', '.join(STRATEGIES)}",
        )
    for name in names:
        if name not in STRATEGIES:
            print(f"note: strategy {name!r} is not registered yet; skipped")
    return found


def training_batch(cfg: Any, requested: int | None) -> int:
    """A batch every strategy's data parallelism and micro-batching divides."""
    if requested:
        return requested
    return math.lcm(cfg.sequence.batch_size, cfg.hardware.total_gpus)


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 50257, size=(batch, length), dtype=np.int32)


def measure_decode(
    runner: Any, params: Any, args: argparse.Namespace, prompt_len: int
) -> dict[str, Any]:
    """TPOT of KV-cache decoding; {} with a note if the strategy cannot generate."""
    prompt = random_tokens(args.decode_batch, prompt_len, seed=1)
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (one decode step after the prefill)")

    def generate() -> Any:
        return runner.generate(params, prompt, args.new_tokens)

    try:
        jax.block_until_ready(generate())
    except NotImplementedError as e:
        return {"tpot_ms": None, "decode_note": str(e)}
    step, whole = measure.decode_step_time(generate, args.repeats, warm_up=False)
    return {
        "tpot_ms": step.median * 1e3,
        "tpot_ms_min": step.low * 1e3,
        "tpot_ms_max": step.high * 1e3,
        "decode_tokens_per_s": args.decode_batch / step.median,
        "decode_batch": args.decode_batch,
        "prompt_len": prompt_len,
        "generate_s_median": whole.median,
    }


def measure_training(
    runner: Any, params: Any, cfg: Any, args: argparse.Namespace, batch: int
) -> tuple[dict[str, Any], Any]:
    """Median training-step time and tokens/s; returns (fields, params after the steps)."""
    from maxjax import optim

    tx = optim.make_optimizer(cfg)
    tokens = random_tokens(batch, cfg.sequence.length + 1)
    state = runner.init_train_state(params, tx)
    rng = jax.random.key(0)
    state, metrics = runner.train_step(state, tokens, tx, rng)
    jax.block_until_ready(metrics)
    samples = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = runner.train_step(state, tokens, tx, rng)
        jax.block_until_ready((state.params, metrics))
        samples.append(time.perf_counter() - start)
    timing = measure.Timing.of(samples)
    step_tokens = batch * cfg.sequence.length
    return {
        "step_s_median": timing.median,
        "step_s_min": timing.low,
        "step_s_max": timing.high,
        "step_tokens": step_tokens,
        "throughput": step_tokens / timing.median,
        "throughput_min": step_tokens / timing.high,
        "throughput_max": step_tokens / timing.low,
    }, state.params


def measure_memory(runner: Any, cfg: Any, batch: int, capacity_gb: float) -> dict[str, Any]:
    """Bytes per device at the peak of a training step on `batch` sequences, from the memory
    plan (`maxjax.perf.memory`), the same accounting for every strategy: parameters, optimizer
    state, gradients, saved residuals, pieces, token states and the temporaries of the programs
    each device runs; over the stated capacity."""
    from maxjax.perf import memory

    plan = memory.plan(
        cfg, runner.name, capacity_bytes=capacity_gb * measure.GB, batch=batch, runner=runner
    )
    rows = plan.per_device()
    in_use = np.array([row["total_bytes"] for row in rows])
    state = np.array([row["parameters"] + row["optimizer_state"] for row in rows])
    return {
        "bytes_per_device_mean": float(in_use.mean()),
        "bytes_per_device_max": float(in_use.max()),
        "state_bytes_per_device_max": float(state.max()),
        "program_temp_bytes_per_device": float(max(row["temporaries"] for row in rows)),
        "memory_peak_phases": sorted({row["peak_phase"] for row in rows}),
        "capacity_gb": capacity_gb,
        "memory_efficiency": float(in_use.mean() / (capacity_gb * measure.GB)),
    }


def measure_strategy(
    cfg: Any, strategy: str, args: argparse.Namespace, host_rate: float, step_flops: float
) -> dict[str, Any]:
    from maxjax.parallel import make_runner

    batch = training_batch(cfg, args.batch)
    runner = make_runner(cfg, strategy)
    params = runner.init(0)
    measure.progress(f"{strategy}: decoding")
    row: dict[str, Any] = {"strategy": strategy}
    row.update(measure_decode(runner, params, args, args.prompt_len or cfg.sequence.length))
    measure.progress(f"{strategy}: memory")
    row.update(measure_memory(runner, cfg, batch, args.capacity_gb))
    measure.progress(f"{strategy}: training steps")
    fields, _ = measure_training(runner, params, cfg, args, batch)
    row.update(fields)
    devices = len(jax.devices())
    row["tps"] = row["throughput"] / devices
    row["utilization"] = step_flops / (row["step_s_median"] * host_rate)
    row["seed"] = SEED_TABLE1.get(strategy)
    return row


def fmt(value: Any, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], label: str, notes: dict[str, str]) -> str:
    header = (
        f"{'strategy':8s} {'TPOT ms (min-max)':>24s} {'seed':>6s} {'TPS':>9s} {'seed':>6s} "
        f"{'throughput':>11s} {'seed':>7s} {'util %':>7s} {'seed':>5s} {'mem eff %':>10s} "
        f"{'seed':>5s}"
    )
    lines = [f"Table 1, measured on {label} (medians of repeats; seed: 16 x A100 80GB)", header]
    for row in rows:
        seed = row.get("seed") or {}
        tpot = row.get("tpot_ms")
        tpot_text = (
            f"{fmt(tpot)} ({fmt(row['tpot_ms_min'])}-{fmt(row['tpot_ms_max'])})" if tpot else "n/a"
        )
        lines.append(
            f"{row['strategy']:8s} {tpot_text:>24s} {fmt(seed.get('tpot_ms')):>6s} "
            f"{fmt(row['tps']):>9s} {fmt(seed.get('tps')):>6s} {fmt(row['throughput']):>11s} "
            f"{fmt(seed.get('throughput')):>7s} {fmt(100 * row['utilization']):>7s} "
            f"{fmt(seed.get('utilization')):>5s} {fmt(100 * row['memory_efficiency']):>10s} "
            f"{fmt(seed.get('memory_efficiency')):>5s}"
        )
    lines += [f"{k}: {v}" for k, v in notes.items()]
    return "\n".join(lines)


def method_notes(args: argparse.Namespace, host_rate: float, batch: int, cfg: Any) -> dict:
    return {
        "TPOT": f"wall time of one KV-cache decode step (batch {args.decode_batch}, "
        f"{args.new_tokens - 1} steps per generate call, prefill excluded); each sequence gets "
        "one token per step",
        "throughput": f"{THROUGHPUT_WORKLOAD}, batch {batch} x {cfg.sequence.length}; "
        "TPS = throughput / devices",
        "utilization": "model flops of a training step (single-device cost_analysis) / "
        f"(step time x host matmul rate {host_rate / 1e9:.1f} GFLOP/s)",
        "memory efficiency": "mean over devices of the memory plan's peak of a training step "
        f"(python -m maxjax.bench memory) / {args.capacity_gb:g} GB",
    }


def main(argv: list[str] | None = None) -> int:
    measure.setup_devices()
    args = parse_args(list(argv or []))
    cfg = load(args)
    strategies = available_strategies(args.strategies)
    label = measure.device_label()
    batch = training_batch(cfg, args.batch)
    measure.progress("host matmul rate and model flops")
    host_rate = measure.host_matmul_rate()
    step_flops = measure.train_step_flops(cfg, batch, cfg.sequence.length)
    rows = []
    for strategy in strategies:
        measure.progress(f"{strategy}: start")
        rows.append(measure_strategy(cfg, strategy, args, host_rate, step_flops))
    notes = method_notes(args, host_rate, batch, cfg)
    print(format_table(rows, label, notes))
    for row in rows:
        if "decode_note" in row:
            print(f"note ({row['strategy']}): {row['decode_note']}")
    if args.json:
        result = {"devices": label, "config": args.config, "overrides": args.set,
                  "methods": notes, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
