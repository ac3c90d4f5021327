"""MA separation vs the single-device reference: step time, bytes between the pools, programs.

`python -m maxjax.bench ma-step [--config tiny] [--repeats N] [--skip-paper] [--trace DIR]
[--microbatch-sweep] [--breakdown] [--json PATH]`

On 16 emulated CPU devices (set up here before JAX starts), for the tiny config:

- forward + backward step time (``value_and_grad``) of "single" and "ma": medians over
  ``--repeats`` runs after ``--warmup`` runs, with min and max, the two taking turns. Measured
  here, on this machine's CPU cores: every emulated device shares them, so this shows total work
  plus dispatch overhead, not parallel speed-up;
- bytes per layer each way between the pools, with and without 8-bit compression (from shapes),
  and the bytes the attention pool's collectives move inside it;
- programs and device-to-device copies dispatched per step;
- with ``--microbatch-sweep``: the same comparison with 1, 2 and 4 micro-batches, with the CPU
  time of each step: on CPU a micro-batch overlaps nothing, so this is what each one adds;
- the attention replicas' standby copy per attention device (``replication_factor: 2``); the
  time its refresh adds to a training step is measured by ``python -m maxjax.bench failover``;
- expert work against load (``--load``): the expert programs' time on each expert device
  (forward and backward, from a profiler trace of ``--repeats`` steps) beside the routed
  assignments it serves, for the model as initialised and for the same model with each layer's
  hottest experts renumbered onto the first expert device (`hottest_experts_first`: the function
  is unchanged, the load is skewed), each with ``ma_separation.expert_compute`` 'filled_slots'
  (a device's work should follow its assignments) and 'capacity' (every slot computed). The
  bytes a device receives do not follow its load (buffers have static shapes);
- with ``--breakdown``: where the MA step's work goes: each stage program and crossing run
  alone (`StageTimer`: the driver waits after each, so nothing overlaps), its wall time per
  step summed by program, beside the single-device step;
- with ``--trace DIR``: a profiler trace of ``--repeats`` steps of "ma" with 1, 2 and 4
  micro-batches, and from it each pool's busy time and the fraction of the expert pool's busy time
  during which the attention pool is busy too (`maxjax.bench.trace`). On CPU all 16 emulated
  devices share the machine's cores, so the pools compete for the same cores: overlap here shows
  that the schedule lets both pools run at once (nothing in the driver serialises them), not that
  it makes a step faster; that needs devices of their own (a GPU cluster).

Then the paper config's training attention stage and expert stage compile ahead of time on the 16
emulated devices (nothing runs), printing per-device flops (``cost_analysis``) and memory
(``memory_analysis``). Prints, never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Any, NamedTuple

DEVICES = 16


def _emulate_devices() -> None:
    """16 CPU devices, set before any JAX backend starts (no effect on a started backend)."""
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    # Raises once the backend is up (e.g. under pytest, which set its own device count).
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", DEVICES)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maxjax.bench ma-step", description=__doc__)
    parser.add_argument("--config", default="tiny", help="config for the timed steps")
    parser.add_argument("--override", action="append", default=[], help="dotted key=value")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper AOT compile")
    parser.add_argument(
        "--paper-sequences",
        type=int,
        default=None,
        help="sequences per micro-batch for the paper compile (default: batch / microbatches)",
    )
    parser.add_argument("--trace", default=None, help="profile 'ma' steps into this directory")
    parser.add_argument(
        "--load", action="store_true", help="expert time per device, uniform vs skewed router"
    )
    parser.add_argument(
        "--microbatch-sweep",
        action="store_true",
        help="also time MA against single with 1, 2 and 4 micro-batches",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time each MA stage program and crossing alone (serialised), per step",
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(argv)


def _time_steps(steps: dict[str, Any], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median, min and max wall time of each step function, the median CPU time this process
    spent in it (every thread: the emulated devices' and the driver's), and the driver's share:
    when the call returned (every program and copy dispatched, nothing waited for) and the CPU
    time of the calling thread until then. The functions take turns, one run each per round, so
    a change in the machine's load during the measurement reaches all alike."""
    import jax

    for _ in range(warmup):
        for fn in steps.values():
            jax.block_until_ready(fn())
    runs: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "dispatch": [], "driver_cpu": []} for name in steps
    }
    for _ in range(repeats):
        for name, fn in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            start_driver = time.thread_time()
            out = fn()
            runs[name]["dispatch"].append(time.perf_counter() - start)
            runs[name]["driver_cpu"].append(time.thread_time() - start_driver)
            jax.block_until_ready(out)
            runs[name]["wall"].append(time.perf_counter() - start)
            runs[name]["cpu"].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(r["wall"]),
            "min_s": min(r["wall"]),
            "max_s": max(r["wall"]),
            "cpu_median_s": statistics.median(r["cpu"]),
            "dispatch_median_s": statistics.median(r["dispatch"]),
            "driver_cpu_median_s": statistics.median(r["driver_cpu"]),
            "repeats": repeats,
        }
        for name, r in runs.items()
    }


def microbatch_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """MA against single with 1, 2 and 4 micro-batches (`--microbatch-sweep`), each pair timed
    in turns as in `measure_steps`: what each further micro-batch costs here."""
    from maxjax.config import with_overrides
    from maxjax.parallel.ma import MARunner

    cfg, tokens, canonical, single, single_params, key = _setup(args)
    rows = []
    for micro in (1, 2, 4):
        ma = MARunner(with_overrides(cfg, [f"ma_separation.microbatches={micro}"]))
        ma_params = ma.from_canonical(canonical)
        timings = _time_steps(
            {
                "single": lambda: single.value_and_grad(single_params, tokens, key),
                "ma": lambda ma=ma, p=ma_params: ma.value_and_grad(p, tokens, key),
            },
            args.repeats,
            args.warmup,
        )
        rows.append(
            {
                "microbatches": micro,
                "programs_per_step": ma.programs_dispatched,
                "copies_per_step": ma.transport.copies_dispatched,
                **{f"{name}_{k}": v for name, t in timings.items() for k, v in t.items()},
            }
        )
        del ma, ma_params
    return rows


class _Setup(NamedTuple):
    cfg: Any
    tokens: Any  # [batch, seq + 1]
    canonical: Any  # the model's parameters, canonical layout, on the host
    single: Any
    single_params: Any
    key: Any


def _setup(args: argparse.Namespace) -> _Setup:
    """The config, a batch, the parameters and the single-device runner the timings share."""
    import jax
    import numpy as np

    from maxjax import model
    from maxjax.config import load_config
    from maxjax.parallel import make_runner

    cfg = load_config(args.config, ["training.dtype=float32", *args.override])
    batch, seq = cfg.sequence.batch_size, cfg.sequence.length
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 50257))
    canonical = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(cfg, 0))())
    single = make_runner(cfg, "single")
    return _Setup(
        cfg, tokens, canonical, single, single.from_canonical(canonical), jax.random.key(1)
    )


def measure_steps(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from maxjax.config import with_overrides
    from maxjax.parallel.ma import MARunner

    cfg, tokens, canonical, single, single_params, key = _setup(args)
    batch, seq = cfg.sequence.batch_size, cfg.sequence.length
    ma = MARunner(cfg)
    ma_params = ma.from_canonical(canonical)

    timings = _time_steps(
        {
            "single": lambda: single.value_and_grad(single_params, tokens, key),
            "ma": lambda: ma.value_and_grad(ma_params, tokens, key),
        },
        args.repeats,
        args.warmup,
    )
    programs = ma.programs_dispatched
    copies = ma.transport.copies_dispatched
    other = "none" if ma.compress else "8-bit quantization"
    other_cfg = with_overrides(
        cfg, [f"ma_separation.synchronization.communication_compression={other}"]
    )
    bytes_by_setting = {
        cfg.ma_separation.synchronization.communication_compression: ma.transfer_bytes(batch, seq),
        other: MARunner(other_cfg).transfer_bytes(batch, seq),
    }
    return {
        "config": args.config,
        "batch": batch,
        "seq_len": seq,
        "microbatches": cfg.ma_separation.microbatches,
        "transport": ma.transport.name,
        "compression": cfg.ma_separation.synchronization.communication_compression,
        "devices": str(jax.devices()[0].platform),
        "step_time": timings,
        "ma_over_single": timings["ma"]["median_s"] / timings["single"]["median_s"],
        "programs_per_step": {"single": 1, "ma": programs},
        "copies_per_step": copies,
        "bytes_moved_per_step": dict(ma.bytes_moved),
        "bytes_per_layer": bytes_by_setting,
        "replication_factor": ma.replicas,
        "standby_bytes_per_attention_device": ma.standby_bytes(),
    }


def stage_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Per step, the wall time of each MA stage program (by name) and crossing, each run alone
    (`StageTimer`), over ``--repeats`` steps after ``--warmup``; and the single-device step
    (one program) timed the same way."""
    import jax

    from maxjax.parallel.ma import MARunner, StageTimer

    cfg, tokens, canonical, single, single_params, key = _setup(args)
    ma = MARunner(cfg)
    ma_params = ma.from_canonical(canonical)
    for _ in range(args.warmup):
        jax.block_until_ready(ma.value_and_grad(ma_params, tokens, key))
        jax.block_until_ready(single.value_and_grad(single_params, tokens, key))
    ma.stage_timer = timer = StageTimer()
    single_seconds = 0.0
    for _ in range(args.repeats):
        ma.value_and_grad(ma_params, tokens, key)
        start = time.perf_counter()
        jax.block_until_ready(single.value_and_grad(single_params, tokens, key))
        single_seconds += time.perf_counter() - start
    ma.stage_timer = None
    per_step = {name: s / args.repeats for name, s in timer.seconds.items()}
    return {
        "steps": args.repeats,
        "ma_seconds_per_step": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
        "ma_calls_per_step": {name: n // args.repeats for name, n in timer.calls.items()},
        "ma_serialised_total_s": sum(per_step.values()),
        "single_seconds_per_step": single_seconds / args.repeats,
    }


def control_overlap(args: argparse.Namespace) -> dict[str, Any]:
    """The same figures for two programs with no dependence between them, one on each pool,
    dispatched back to back: the most overlap this backend can show at all."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from maxjax.bench.trace import device_intervals, pool_activity
    from maxjax.config import load_config
    from maxjax.parallel.mesh import attention_submesh, expert_submesh

    cfg = load_config(args.config, args.override)
    pools = (attention_submesh(cfg), expert_submesh(cfg))
    inputs = [
        jax.device_put(
            np.ones((64 * mesh.size, 512), np.float32), NamedSharding(mesh, P(mesh.axis_names))
        )
        for mesh in pools
    ]
    work = jax.jit(lambda x: jnp.tanh(x @ x.T @ x))
    jax.block_until_ready([work(x) for x in inputs])
    directory = os.path.join(args.trace, "control")
    jax.profiler.start_trace(directory)
    for _ in range(args.repeats):
        jax.block_until_ready([work(x) for x in inputs])
    jax.profiler.stop_trace()
    activity = pool_activity(
        device_intervals(directory),
        [d.id for d in pools[0].devices.flat],
        [d.id for d in pools[1].devices.flat],
    )
    return {"microbatches": "control", "steps": args.repeats, **activity}


def trace_overlap(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Profile `--repeats` MA steps for 1, 2 and 4 micro-batches; busy and overlap per pool."""
    import jax
    import numpy as np

    from maxjax import model
    from maxjax.bench.trace import device_intervals, pool_activity
    from maxjax.config import load_config
    from maxjax.parallel.ma import MARunner

    rows = [control_overlap(args)]
    for micro in (1, 2, 4):
        cfg = load_config(
            args.config,
            ["training.dtype=float32", *args.override, f"ma_separation.microbatches={micro}"],
        )
        batch, seq = cfg.sequence.batch_size, cfg.sequence.length
        tokens = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 50257))
        runner = MARunner(cfg)
        params = runner.from_canonical(
            jax.tree.map(np.asarray, jax.jit(lambda cfg=cfg: model.init_params(cfg, 0))())
        )
        for _ in range(args.warmup):
            jax.block_until_ready(runner.value_and_grad(params, tokens))
        directory = os.path.join(args.trace, f"microbatches_{micro}")
        jax.profiler.start_trace(directory)
        for _ in range(args.repeats):
            jax.block_until_ready(runner.value_and_grad(params, tokens))
        jax.profiler.stop_trace()
        activity = pool_activity(
            device_intervals(directory),
            [d.id for d in runner.attention_devices],
            [d.id for d in runner.expert_mesh.devices.flat],
        )
        rows.append({"microbatches": micro, "steps": args.repeats, **activity})
    return rows


def hottest_experts_first(canonical: Any, shares: Any) -> Any:
    """The same model (single-device layout, host arrays) with each layer's experts renumbered
    hottest first by `shares` [L, E] (router columns and expert weights together): it computes
    the same function, and the router now sends most tokens to the lowest-numbered experts,
    those of the first expert device in the seed's `expert_mapping`."""
    import jax
    import numpy as np

    skewed = jax.tree.map(np.array, canonical)
    for index, layer in skewed["layers"].items():
        hottest = np.argsort(-np.asarray(shares)[int(index)], kind="stable")
        layer["moe"]["router"]["kernel"] = layer["moe"]["router"]["kernel"][:, hottest]
        for name in ("wi", "wo"):
            layer["moe"]["experts"][name] = layer["moe"]["experts"][name][hottest]
    return skewed


def router_biased_toward(
    canonical: Any, hot_experts: Any, top_k: int, strength: float = 20.0, gain: float = 5.0
) -> Any:
    """The model (single-device layout, host arrays) changed so that every token's `top_k`
    choices go to `hot_experts` (say the experts of one expert device): a skewed router whose
    skew a re-placement can remove exactly.

    The hot experts are cut into G = len(hot_experts) / top_k groups of `top_k`, and the
    vocabulary into G classes (token id mod G). Every embedding row gets a component along its
    class's direction (G orthonormal directions, `strength` times the rows' RMS norm), each
    router kernel loses its components along the G directions, and a group's columns get
    `gain` times its class's direction. A token then chooses its class's group. With a
    capacity that a sequence's tokens of one class fill (a small `moe.capacity_factor`), each
    hot expert computes its full capacity in every sequence and every other expert nothing."""
    import jax
    import numpy as np

    hot = np.asarray(hot_experts)
    groups = len(hot) // top_k
    if groups < 1 or groups * top_k != len(hot):
        raise ValueError(f"{len(hot)} hot experts do not form groups of top_k = {top_k}")
    biased = jax.tree.map(np.array, canonical)
    table = biased["embed"]["embedding"]
    width = table.shape[1]
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((width, groups)))
    directions = basis.T.astype(table.dtype)  # [G, M], orthonormal rows
    rms = float(np.sqrt(np.mean(np.sum(table.astype(np.float64) ** 2, axis=1))))
    classes = np.arange(table.shape[0]) % groups
    biased["embed"]["embedding"] = table + strength * rms * directions[classes]
    for layer in biased["layers"].values():
        kernel = layer["moe"]["router"]["kernel"]
        kernel -= directions.T @ (directions @ kernel)
        for g in range(groups):
            kernel[:, hot[g * top_k : (g + 1) * top_k]] += gain * directions[g][:, None]
    return biased


def expert_time_against_load(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per expert device: expert-program seconds per step beside the assignments routed to its
    experts and those they kept within capacity (the slots it computes) per step, for the model
    as initialised and with its hottest experts on the first expert device."""
    import itertools
    import tempfile

    import jax
    import numpy as np

    from maxjax import model
    from maxjax.config import EXPERT_COMPUTE_CHOICES, load_config, with_overrides
    from maxjax.parallel import make_runner
    from maxjax.parallel.ma import MARunner
    from maxjax.sync import balancer, measure

    base = load_config(args.config, ["training.dtype=float32", *args.override])
    batch, seq = base.sequence.batch_size, base.sequence.length
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 50257))
    canonical = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(base, 0))())
    single = make_runner(base, "single")
    shares = single.value_and_grad(single.from_canonical(canonical), tokens)[0]
    shares = np.asarray(shares["expert_fraction_by_layer"])
    key = jax.random.key(1)
    expert_programs = {
        program
        for (pool, _), programs in measure.STAGE_PROGRAMS.items()
        if pool == "experts"
        for program in programs
    }
    rows = []
    routers = (
        ("as initialised", canonical),
        ("hottest experts on the first expert device", hottest_experts_first(canonical, shares)),
    )
    for (name, params), compute in itertools.product(routers, EXPERT_COMPUTE_CHOICES):
        cfg = with_overrides(base, [f"ma_separation.expert_compute={compute}"])
        runner = MARunner(cfg)
        placed = runner.from_canonical(params)
        for _ in range(args.warmup):
            jax.block_until_ready(runner.value_and_grad(placed, tokens, key))
        with tempfile.TemporaryDirectory() as directory:
            jax.profiler.start_trace(directory)
            for _ in range(args.repeats):
                metrics, _ = jax.block_until_ready(runner.value_and_grad(placed, tokens, key))
            jax.profiler.stop_trace()
            runs = measure.program_runs(measure.newest_trace(directory))
        devices = [d.id for d in runner.expert_mesh.devices.flat]
        seconds = [
            sum(r.seconds for r in runs if r.device == d and r.program in expert_programs)
            / args.repeats
            for d in devices
        ]
        per_device = {
            metric: balancer.device_load_rows(
                np.asarray(metrics[metric]) * batch * seq * cfg.moe.top_k,
                runner.experts.order,
                len(devices),
            )
            .sum(0)
            .tolist()
            for metric in ("expert_fraction_by_layer", "expert_kept_fraction_by_layer")
        }

        received = runner.bytes_moved["attention_to_experts"] / len(devices)
        rows.append(
            {
                "router": name,
                "expert_compute": compute,
                "expert_devices": devices,
                "expert_seconds_per_step": seconds,
                "assignments_per_step": per_device["expert_fraction_by_layer"],
                "kept_assignments_per_step": per_device["expert_kept_fraction_by_layer"],
                "kept_fraction": 1.0 - float(metrics["dropped_fraction"]),
                "bytes_received_per_step": [received] * len(devices),
            }
        )
    return rows


def compile_paper_stages(args: argparse.Namespace) -> dict[str, Any]:
    from maxjax.config import load_config
    from maxjax.parallel.ma import MARunner

    cfg = load_config("paper")
    sequences = args.paper_sequences or cfg.sequence.batch_size // cfg.ma_separation.microbatches
    runner = MARunner(cfg)
    out: dict[str, Any] = {"sequences_per_microbatch": sequences, "seq_len": cfg.sequence.length}
    for name, lowered in runner.lower_stages(sequences, cfg.sequence.length).items():
        start = time.perf_counter()
        compiled = lowered.compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        out[name] = {
            "compile_s": time.perf_counter() - start,
            "flops_per_device": float(cost.get("flops", float("nan"))),
            "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
            "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
            "output_bytes": getattr(memory, "output_size_in_bytes", None),
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        }
    return out


def _report(result: dict[str, Any]) -> None:
    steps = result["steps"]
    print(
        f"config {steps['config']}: batch {steps['batch']} x {steps['seq_len']} tokens, "
        f"{steps['microbatches']} micro-batches, transport {steps['transport']}, "
        f"compression {steps['compression']!r} (measured here, {steps['devices']}, "
        "16 emulated devices sharing this machine's cores)"
    )
    for name, t in steps["step_time"].items():
        print(
            f"  {name:6s} forward+backward: median {t['median_s'] * 1e3:8.1f} ms "
            f"(min {t['min_s'] * 1e3:.1f}, max {t['max_s'] * 1e3:.1f}, {t['repeats']} runs); "
            f"CPU {t['cpu_median_s'] * 1e3:.0f} ms ({t['cpu_median_s'] / t['median_s']:.2f} "
            f"cores busy); the call returned after {t['dispatch_median_s'] * 1e3:.0f} ms, "
            f"driver thread CPU {t['driver_cpu_median_s'] * 1e3:.0f} ms"
        )
    print(f"  ma / single: {steps['ma_over_single']:.2f}x (target <= 1.3x)")
    for row in result.get("microbatch_sweep", []):
        print(
            f"  {row['microbatches']} micro-batch(es): ma {row['ma_median_s'] * 1e3:.0f} ms "
            f"(CPU {row['ma_cpu_median_s'] * 1e3:.0f} ms, {row['programs_per_step']} programs, "
            f"{row['copies_per_step']} copies), single {row['single_median_s'] * 1e3:.0f} ms "
            f"(CPU {row['single_cpu_median_s'] * 1e3:.0f} ms): ma / single "
            f"{row['ma_median_s'] / row['single_median_s']:.2f}x"
        )
    print(f"  programs dispatched per step: {steps['programs_per_step']}")
    for setting, b in steps["bytes_per_layer"].items():
        print(
            f"  bytes per layer, compression {setting!r}: attention->experts "
            f"{b['attention_to_experts']:,}, experts->attention {b['experts_to_attention']:,} "
            f"(scales {b['scale_bytes_each_way']:,}); backward {b['backward_each_way']:,} each "
            f"way; inside the attention pool (forward) {b['within_attention_pool_forward']:,}"
        )
    print(f"  device-to-device copies per step: {steps['copies_per_step']}")
    print(f"  bytes moved in one step (counted by the runner): {steps['bytes_moved_per_step']}")
    print(
        f"  replication_factor {steps['replication_factor']}: standby copy "
        f"{steps['standby_bytes_per_attention_device'] / 2**20:.1f} MiB per attention device, "
        "refreshed after each training step (its time: python -m maxjax.bench failover)"
    )
    for row in result.get("load", []):
        print(
            f"  expert work per device, router {row['router']!r}, expert_compute "
            f"{row['expert_compute']!r} (per step, {steps['devices']}):"
        )
        for d, t, a, k, b in zip(
            row["expert_devices"],
            row["expert_seconds_per_step"],
            row["assignments_per_step"],
            row["kept_assignments_per_step"],
            row["bytes_received_per_step"],
            strict=True,
        ):
            print(
                f"    device {d:2d}: expert programs {t * 1e3:8.1f} ms, "
                f"{a:8.0f} routed, {k:8.0f} kept assignments (all layers), "
                f"{b:,.0f} bytes received"
            )
    breakdown = result.get("breakdown")
    if breakdown:
        total, single_s = breakdown["ma_serialised_total_s"], breakdown["single_seconds_per_step"]
        print(
            f"  where the ma step's work goes (each program and crossing run alone, per step, "
            f"{breakdown['steps']} steps): {total * 1e3:.1f} ms in all, against single "
            f"{single_s * 1e3:.1f} ms (one program)"
        )
        for name, seconds in breakdown["ma_seconds_per_step"].items():
            calls = breakdown["ma_calls_per_step"][name]
            print(
                f"    {name:20s} {seconds * 1e3:8.1f} ms ({calls} calls, "
                f"{seconds / max(calls, 1) * 1e3:.2f} ms each, {100 * seconds / total:4.1f}%)"
            )
    for row in result.get("trace", []):
        what = (
            "control, two independent programs (one per pool)"
            if row["microbatches"] == "control"
            else f"ma, {row['microbatches']} micro-batch(es)"
        )
        print(
            f"  trace, {what}, {row['steps']} steps: attention pool busy "
            f"{row['attention_busy_s']:.3f} s, expert pool busy {row['experts_busy_s']:.3f} s, "
            f"both at once {row['overlap_s']:.3f} s = "
            f"{100 * row['overlap_fraction_of_experts']:.1f}% of the expert pool's busy time"
        )
    paper = result.get("paper")
    if paper:
        print(
            f"paper config, AOT compile only ({paper['sequences_per_microbatch']} sequences x "
            f"{paper['seq_len']} tokens per micro-batch; per device, from XLA's analyses):"
        )
        for name in ("attention", "experts"):
            s = paper[name]
            gib = lambda n: (n or 0) / 2**30
            print(
                f"  {name:9s} stage: {s['flops_per_device'] / 1e12:9.2f} TFLOP, "
                f"{s['bytes_accessed_per_device'] / 2**30:9.2f} GiB accessed, memory: "
                f"arguments {gib(s['argument_bytes']):.2f} GiB, outputs "
                f"{gib(s['output_bytes']):.2f} GiB, temp {gib(s['temp_bytes']):.2f} GiB "
                f"(compiled in {s['compile_s']:.1f} s)"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    _emulate_devices()
    result: dict[str, Any] = {"steps": measure_steps(args)}
    if args.microbatch_sweep:
        result["microbatch_sweep"] = microbatch_sweep(args)
    if args.breakdown:
        result["breakdown"] = stage_breakdown(args)
    if args.load:
        result["load"] = expert_time_against_load(args)
    if args.trace:
        result["trace"] = trace_overlap(args)
    if not args.skip_paper:
        result["paper"] = compile_paper_stages(args)
    _report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
