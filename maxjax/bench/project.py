"""Projected performance from the compiled stage programs, and its checks.

    python -m maxjax.bench project --config paper --hardware a100-80gb [--json FILE]
    python -m maxjax.bench project --measure-cpu      # (re)write configs/hardware/cpu-here.yaml
    python -m maxjax.bench project --validate         # predicted vs measured CPU step times
    python -m maxjax.bench project --measure-gpu [--size tiny|gpu] [--json FILE]

The projection prints Table 1 with the seed's values beside it, the scaling over 8-64 GPUs
(§5.2), communication per kind (§5.3), TPOT by context (§5.7) and energy per token (§5.8), and
the layout planner's best MA layout. Every projected number comes from `maxjax.perf`: per-device
programs compiled ahead of time for their flops and bytes, a roofline per program, and a
simulated schedule. Figures labelled "seed" are the write-up's, transcribed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

# The seed's reported numbers (its Table 1 and §5.2-§5.8), transcribed for side-by-side printing.
SEED_TABLE1 = {
    "tp": {"tpot_ms": 2.84, "tps": 8450, "throughput": 135200, "util": 68.4, "mem_eff": 72.3},
    "pp": {"tpot_ms": 3.12, "tps": 7692, "throughput": 123072, "util": 62.1, "mem_eff": 69.8},
    "tp_pp": {"tpot_ms": 2.76, "tps": 8696, "throughput": 139136, "util": 71.2, "mem_eff": 74.1},
    "ma": {"tpot_ms": 1.82, "tps": 13289, "throughput": 212624, "util": 89.7, "mem_eff": 85.4},
}
SEED_TPOT_BY_CONTEXT = {512: 0.89, 1024: 1.21, 2048: 1.82, 4096: 3.41}
SEED_COMM_SHARE = {
    "total": 18.8,
    "attention_all_reduce": 8.4,
    "moe_all_to_all": 6.2,
    "gradient_sync": 2.9,
    "parameter_broadcast": 1.3,
}
SEED_ENERGY_MJ_PER_TOKEN = {"ma": 0.82, "baseline": 1.24}
STRATEGIES = ("ma", "tp", "pp", "tp_pp")
CONTEXTS = (512, 1024, 2048, 4096)
SCALING_GPUS = (8, 16, 32, 64)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m maxjax.bench project",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="paper")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        help="dotted key=value config override (repeatable)",
    )
    p.add_argument(
        "--hardware",
        default=None,
        help="spec in configs/hardware/ (a100-80gb; h100-80gb for --measure-gpu)",
    )
    p.add_argument("--nics", type=int, default=None, help="override NICs per node")
    p.add_argument(
        "--decode-sequences",
        type=int,
        default=256,
        help="concurrent sequences in the decoding step (TPOT)",
    )
    p.add_argument("--context", type=int, default=2048, help="context length for Table 1's TPOT")
    p.add_argument("--no-scaling", action="store_true", help="skip §5.2 (8-64 GPUs)")
    p.add_argument("--no-planner", action="store_true", help="skip the layout search")
    p.add_argument(
        "--planner-microbatches", default="2,4,8", help="micro-batch counts the planner tries"
    )
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--measure-cpu", action="store_true", help="measure this host into cpu-here")
    p.add_argument("--validate", action="store_true", help="predicted vs measured CPU steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--measure-gpu",
        action="store_true",
        help="time a single-device step and stage programs next to the prediction",
    )
    p.add_argument("--size", choices=("tiny", "gpu"), default="gpu", help="--measure-gpu size")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[project] {msg}", file=sys.stderr, flush=True)


# --- projection ----------------------------------------------------------------------------------
def baseline_layouts(cfg, devices: int) -> dict[str, Any]:
    from maxjax.perf.model import BaselineLayout

    tp, pp, m = (
        cfg.baselines.tensor_parallel,
        cfg.baselines.pipeline_parallel,
        cfg.baselines.microbatches,
    )
    out = {}
    for name, t, p in (("tp", tp, 1), ("pp", 1, pp), ("tp_pp", tp, pp)):
        t = min(t, devices // p)
        if devices % (t * p) == 0:
            out[name] = BaselineLayout(name, t, p, devices // (t * p), m)
    return out


def flop_shares(s) -> dict[str, float]:
    """FLOP and parameter shares of the experts, from per-sequence forward programs."""
    from maxjax.perf import programs as P

    seq, cap = s.seq_len, s.capacity(s.seq_len)
    attn = P.forward_cost("attention", s, s.heads, 1, seq).flops
    route = P.forward_cost("route_dispatch", s, 1, seq).flops
    comb = P.forward_cost("combine", s, 1, seq).flops
    expert = P.forward_cost("experts", s, s.experts, 1, cap, False).flops
    head = P.forward_cost("lm_head", s, s.vocab, 1, seq).flops
    layer = attn + route + comb + expert
    total = s.layers * layer + head
    expert_params = s.layers * s.expert_params(s.experts)
    return {
        "expert_share": s.layers * expert / total,
        "expert_share_of_layer": expert / layer,
        "attention_share_of_layer": attn / layer,
        "lm_head_share": head / total,
        "forward_flops_per_sequence": total,
        "expert_param_share": expert_params / s.total_params(),
        "total_params": s.total_params(),
        "source": "cost_analysis of single-sequence forward programs at the config's shapes",
    }


def project_strategy(s, hw, layout, decode_seqs: int, contexts, context: int) -> dict[str, Any]:
    from maxjax.perf.model import Work, run

    train, timeline = run(s, hw, layout, Work(True, s.batch, s.seq_len))
    by_context = {}
    for ctx in sorted(set(contexts) | {context}):
        dec, _ = run(s, hw, layout, Work(False, decode_seqs, 1, ctx))
        by_context[ctx] = dec
    dec = by_context[context]
    devices = layout.devices
    return {
        "train_tokens_per_s": train["tokens_per_s"],
        "step_time_s": train["time_s"],
        "tpot_ms": 1e3 * dec["time_s"],
        "decode_tokens_per_s": dec["tokens_per_s"],
        "tps_per_device": dec["tokens_per_s"] / devices,
        "tpot_ms_by_context": {str(c): 1e3 * d["time_s"] for c, d in by_context.items()},
        "busy": train["busy_pool"],
        "busy_mean": train["busy_mean"],
        "busy_per_device": train["busy_fraction"],
        "decode_busy": dec["busy_pool"],
        "link_utilisation": train["link_utilisation"],
        "communication": train["communication"],
        "communication_time_share": train["communication_time_share"],
        "memory_bytes_max": train["memory_bytes_max"],
        "memory_efficiency": train["memory_bytes_max"] / hw.memory_capacity_bytes,
        "memory_per_device": {str(d): v for d, v in train["memory"].items()},
        "energy_mj_per_token": train["energy_mj_per_token"],
        "decode_energy_mj_per_token": dec["energy_mj_per_token"],
        "devices": devices,
        "timeline": _layer_timeline(timeline, s.layers),
    }


def _layer_timeline(timeline, layers: int) -> list[dict[str, Any]]:
    """Tasks of the forward pass of the first layer (for the ping-pong chart), in seconds."""
    out = []
    seen_experts = 0
    for t in timeline.tasks:
        if t.name.startswith("experts@"):
            seen_experts += 1
        if t.name.startswith(("experts_bwd", "lm_head")):
            break
        if t.name.startswith("combine"):
            break
        out.append(
            {
                "name": t.name.split("#")[0],
                "resources": list(t.resources),
                "kind": t.kind,
                "start": timeline.start[t.name],
                "end": timeline.end[t.name],
            }
        )
    return out[:400]


def scaling(cfg, s, hw) -> list[dict[str, Any]]:
    """§5.2: the same global batch on 8-64 GPUs, MA (3/4 attention, 1/4 experts) and TP+PP."""
    from maxjax.perf import programs as P
    from maxjax.perf.model import BaselineLayout, MALayout, Work, run

    rows = []
    for n in SCALING_GPUS:
        x = max(1, n // 4)
        if s.experts % x:
            continue
        a = n - x
        groups = 1
        while a // groups > s.heads or a % groups:
            groups += 1
        lay = MALayout(
            tuple(range(a)),
            tuple(P.even_split(s.heads, a // groups)),
            groups,
            tuple(range(a, n)),
            s.experts // x,
            cfg.ma_separation.microbatches,
            cfg.ma_separation.synchronization.communication_compression != "none",
        )
        ma, _ = run(s, hw, lay, Work(True, s.batch, s.seq_len))
        tp = min(cfg.baselines.tensor_parallel, n // cfg.baselines.pipeline_parallel)
        base = BaselineLayout(
            "tp_pp",
            tp,
            cfg.baselines.pipeline_parallel,
            n // (tp * cfg.baselines.pipeline_parallel),
            cfg.baselines.microbatches,
        )
        bl, _ = run(s, hw, base, Work(True, s.batch, s.seq_len))
        rows.append(
            {
                "gpus": n,
                "ma_layout": f"{a}/{x} groups={groups}",
                "ma_tokens_per_s": ma["tokens_per_s"],
                "tp_pp_layout": f"tp={tp} pp={cfg.baselines.pipeline_parallel} dp={base.data}",
                "tp_pp_tokens_per_s": bl["tokens_per_s"],
            }
        )
    if rows:
        first = rows[0]
        for r in rows:
            r["ma_efficiency_vs_first"] = (r["ma_tokens_per_s"] / r["gpus"]) / (
                first["ma_tokens_per_s"] / first["gpus"]
            )
            r["ma_speedup_over_tp_pp"] = r["ma_tokens_per_s"] / r["tp_pp_tokens_per_s"]
    return rows


def project(args: argparse.Namespace) -> dict[str, Any]:
    from maxjax.config import load_config
    from maxjax.perf import programs as P
    from maxjax.perf.hardware import load_hardware
    from maxjax.perf.planner import plan, seed_layout

    start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    hw = load_hardware(args.hardware or "a100-80gb")
    if args.nics:
        hw = hw.with_nics(args.nics)
    s = P.Shapes.of(cfg)
    devices = cfg.hardware.total_gpus
    layouts = {"ma": seed_layout(cfg), **baseline_layouts(cfg, devices)}
    contexts = list(CONTEXTS)
    out: dict[str, Any] = {
        "command": "python -m maxjax.bench project " + " ".join(args.argv),
        "config": args.config,
        "overrides": args.overrides,
        "hardware": dict(vars(hw)),
        "decode_sequences": args.decode_sequences,
        "context": args.context,
        "source": "projected: maxjax.perf (cost_analysis of per-device programs, roofline, simulated schedule)",
    }
    _say("expert FLOP share")
    out["flops"] = flop_shares(s)
    out["strategies"] = []
    for name in STRATEGIES:
        if name not in layouts:
            continue
        _say(f"strategy {name}")
        row = project_strategy(s, hw, layouts[name], args.decode_sequences, contexts, args.context)
        out["strategies"].append({"strategy": name, **row})
    if not args.no_scaling:
        _say("scaling 8-64 GPUs")
        out["scaling"] = scaling(cfg, s, hw)
    if not args.no_planner:
        _say("layout planner")
        micro = tuple(int(x) for x in args.planner_microbatches.split(","))
        out["planner"] = plan(cfg, s, hw, devices, micro)
    out["compiled_programs"] = P.compiles_done()
    out["wall_s"] = time.perf_counter() - start
    return out


def print_projection(out: dict[str, Any]) -> None:
    rows = {r["strategy"]: r for r in out["strategies"]}
    hw = out["hardware"]["name"]
    f = out["flops"]
    print(f"Projected on {hw} ({out['source']}); seed values transcribed from the write-up.")
    print(
        f"Expert FLOP share of a forward pass: {100 * f['expert_share']:.1f}% "
        f"(of a layer: {100 * f['expert_share_of_layer']:.1f}%); expert parameter share "
        f"{100 * f['expert_param_share']:.1f}% of {f['total_params'] / 1e9:.2f}B parameters"
    )
    print(
        f"\nTable 1 (decoding at {out['decode_sequences']} concurrent sequences, context "
        f"{out['context']}; training step of the config's batch)"
    )
    names = [n for n in STRATEGIES if n in rows]
    print(f"{'metric':34s}" + "".join(f"{n:>22s}" for n in names))

    def line(label, seed_key, ours, fmt):
        cells = []
        for n in names:
            seed = SEED_TABLE1[n][seed_key] if seed_key else None
            ours_v = ours(rows[n])
            cells.append(
                f"{(format(seed, fmt) if seed is not None else '-'):>9s} | {format(ours_v, fmt):>9s}"
            )
        print(f"{label:34s}" + "".join(f"{c:>22s}" for c in cells))

    print(f"{'':34s}" + "".join(f"{'seed | projected':>22s}" for _ in names))
    line("TPOT (ms/token)", "tpot_ms", lambda r: r["tpot_ms"], ".2f")
    line("TPS (decode tokens/s per device)", "tps", lambda r: r["tps_per_device"], ".0f")
    line("Throughput (decode tokens/s)", "throughput", lambda r: r["decode_tokens_per_s"], ".0f")
    line("GPU utilisation (%, training)", "util", lambda r: 100 * r["busy_mean"], ".1f")
    line(
        "Memory efficiency (%, training)", "mem_eff", lambda r: 100 * r["memory_efficiency"], ".1f"
    )
    line("Training tokens/s (projected only)", None, lambda r: r["train_tokens_per_s"], ".0f")
    line("Step time (s)", None, lambda r: r["step_time_s"], ".2f")
    line("Energy (mJ/training token)", None, lambda r: r["energy_mj_per_token"], ".3f")
    for n in names:
        busy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in rows[n]["busy"].items())
        print(
            f"  busy {n}: {busy}; communication active {100 * rows[n]['communication_time_share']:.0f}% of the step"
        )

    if out.get("scaling"):
        print("\n§5.2 scaling (same global batch; projected training tokens/s)")
        print(
            f"{'GPUs':>5s} {'MA layout':>18s} {'MA tok/s':>12s} {'eff vs 8':>9s} {'TP+PP':>12s} {'MA/TP+PP':>9s}"
        )
        for r in out["scaling"]:
            print(
                f"{r['gpus']:5d} {r['ma_layout']:>18s} {r['ma_tokens_per_s']:12.0f} "
                f"{r['ma_efficiency_vs_first']:9.2f} {r['tp_pp_tokens_per_s']:12.0f} "
                f"{r['ma_speedup_over_tp_pp']:9.2f}"
            )
        print("  seed: speedup 1.528 at 16 GPUs, scaling efficiency 0.87, break-even 8 GPUs")

    print("\n§5.3 communication per kind (training step; bytes per layer and share of step time)")
    for n in names:
        parts = [
            f"{k} {v['bytes_per_layer'] / 1e9:.2f} GB/layer {100 * v['time_share']:.0f}%"
            for k, v in rows[n]["communication"].items()
        ]
        print(f"  {n:6s}: " + "; ".join(parts))
    print(
        f"  seed: total {SEED_COMM_SHARE['total']}% (attention all-reduce 8.4, MoE all-to-all 6.2, "
        "gradient sync 2.9, broadcast 1.3); 16.8 GB + 16.8 GB per layer"
    )

    print(f"\n§5.7 TPOT (ms) by context, {out['decode_sequences']} concurrent sequences")
    ctxs = sorted(int(c) for c in rows[names[0]]["tpot_ms_by_context"])
    print(f"{'context':>8s}" + "".join(f"{n:>10s}" for n in names) + f"{'seed MA':>10s}")
    for c in ctxs:
        vals = "".join(f"{rows[n]['tpot_ms_by_context'][str(c)]:10.2f}" for n in names)
        seed = SEED_TPOT_BY_CONTEXT.get(c)
        print(f"{c:8d}{vals}{(f'{seed:10.2f}' if seed else '-'):>10s}")

    print("\n§5.8 energy per token (busy devices at TDP, idle ones at idle power)")
    for n in names:
        print(
            f"  {n:6s}: training {rows[n]['energy_mj_per_token']:.3f} mJ/token, decoding "
            f"{rows[n]['decode_energy_mj_per_token']:.3f} mJ/token"
        )
    print(
        f"  seed: MA {SEED_ENERGY_MJ_PER_TOKEN['ma']} mJ/token vs {SEED_ENERGY_MJ_PER_TOKEN['baseline']} baseline"
    )

    pl = out.get("planner")
    if pl:
        print(
            f"\nLayout planner ({pl['searched']} MA layouts; ranked by training tokens/s among "
            "those whose parameter+gradient+AdamW state fits the device)"
        )
        for label, r in (
            ("seed layout", pl["seed"]),
            ("best", pl["best"]),
            ("best the runner runs", pl["best_executable"]),
        ):
            if r is None:
                continue
            busy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["busy"].items())
            print(
                f"  {label:21s} {r['layout']:52s} {r['train_tokens_per_s']:10.0f} tok/s ({busy}); {r['note']}"
            )
        if pl["best_executable"]:
            print(
                "  trainer overrides: "
                + " ".join(f"--set '{o}'" for o in pl["best_executable"]["overrides"])
            )
    print(f"\n{out['compiled_programs']} programs compiled; {out['wall_s']:.0f} s")


# --- validation on this CPU ----------------------------------------------------------------------
def _time(fn, repeats: int) -> float:
    import statistics

    import jax

    jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def single_program_time(cfg, hw) -> float:
    """Roofline time of the single-device loss-and-gradient program, from its cost_analysis."""
    import jax
    import jax.numpy as jnp

    from maxjax import model
    from maxjax.perf.model import program_time
    from maxjax.perf.programs import compiled_cost

    tokens = jax.ShapeDtypeStruct((cfg.sequence.batch_size, cfg.sequence.length + 1), jnp.int32)
    fn = jax.value_and_grad(lambda p, t: model.loss_fn(cfg, p, t)[0])
    cost = compiled_cost(fn, (model.abstract_params(cfg), tokens))
    return program_time(cost, "matmul", hw) + hw.program_overhead_s


def validate(args: argparse.Namespace) -> dict[str, Any]:
    from maxjax.bench.measure import setup_devices

    setup_devices(16)
    import jax
    import numpy as np

    from maxjax import model
    from maxjax.config import load_config
    from maxjax.parallel import make_runner
    from maxjax.perf import programs as P
    from maxjax.perf.hardware import load_hardware
    from maxjax.perf.model import Work, run
    from maxjax.perf.planner import seed_layout

    cfg = load_config(
        args.config if args.config != "paper" else "tiny",
        ["training.dtype=float32", *args.overrides],
    )
    hw = load_hardware("cpu-here")
    s = P.Shapes.of(cfg)
    predicted = {
        "single": single_program_time(cfg, hw),
        "ma": run(s, hw, seed_layout(cfg), Work(True, s.batch, s.seq_len, optimizer=False))[0][
            "time_s"
        ],
    }
    batch, seq = cfg.sequence.batch_size, cfg.sequence.length
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 50257))
    canonical = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(cfg, 0))())
    measured = {}
    for name in ("single", "ma"):
        runner = make_runner(cfg, name)
        params = runner.from_canonical(canonical)
        key = jax.random.key(1)
        measured[name] = _time(
            lambda r=runner, p=params, k=key: r.value_and_grad(p, tokens, k), args.repeats
        )
    rows = {
        n: {
            "predicted_s": predicted[n],
            "measured_s": measured[n],
            "error": predicted[n] / measured[n] - 1.0,
        }
        for n in predicted
    }
    return {
        "config": "tiny" if args.config == "paper" else args.config,
        "hardware": "cpu-here",
        "devices": len(jax.devices()),
        "steps": rows,
        "source": "measured here on CPU (median of value_and_grad calls after a warm-up) vs "
        "projected with configs/hardware/cpu-here.yaml",
    }


def print_validation(out: dict[str, Any]) -> None:
    print(f"CPU validation ({out['source']}), {out['devices']} emulated devices")
    print(f"{'strategy':9s} {'predicted s':>12s} {'measured s':>11s} {'error':>8s}")
    for name, r in out["steps"].items():
        print(
            f"{name:9s} {r['predicted_s']:12.4f} {r['measured_s']:11.4f} {100 * r['error']:+7.1f}%"
        )


# --- one-GPU measurement -------------------------------------------------------------------------
GPU_SIZE_OVERRIDES = {
    # paper widths, 2 layers, 8 sequences of 2048: ~4.8B float32 parameters + gradients fit 80 GB
    "gpu": [
        "model.layers=2",
        "sequence.batch_size=8",
        "sequence.total_tokens_per_batch=16384",
        "training.dtype=bfloat16",
        "training.gradient_checkpointing=false",
    ],
    "tiny": [
        "model.layers=1",
        "sequence.batch_size=2",
        "sequence.total_tokens_per_batch=64",
        "training.dtype=float32",
        "training.gradient_checkpointing=false",
    ],
}


def measure_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Time a single-device training step and each stage program on the default device."""
    import jax
    import numpy as np

    from maxjax.config import load_config
    from maxjax.parallel import make_runner
    from maxjax.perf import programs as P
    from maxjax.perf.hardware import load_hardware
    from maxjax.perf.model import program_time

    base = "paper" if args.size == "gpu" else "tiny"
    cfg = load_config(base, [*GPU_SIZE_OVERRIDES[args.size], *args.overrides])
    hardware = args.hardware or "h100-80gb"
    hw = load_hardware(hardware)
    s = P.Shapes.of(cfg)
    batch, seq = cfg.sequence.batch_size, cfg.sequence.length
    device = jax.devices()[0]
    rows: dict[str, Any] = {}

    runner = make_runner(cfg, "single")
    params = runner.init(0)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 50257))
    step = _time(lambda: runner.value_and_grad(params, tokens, jax.random.key(1)), args.repeats)
    rows["train_step"] = {"measured_s": step, "predicted_s": single_program_time(cfg, hw)}
    params = None

    cap = s.capacity(seq)
    stage_args = {
        "attention": (s, s.heads, batch, seq),
        "route_dispatch": (s, batch, seq),
        "combine": (s, batch, seq),
        "experts": (s, s.experts, batch, cap, True),
        "lm_head": (s, s.vocab, batch, seq),
    }
    rng = np.random.default_rng(0)
    for name, b_args in stage_args.items():
        fn, floats, others = P.BUILDERS[name](*b_args)
        arrays = [
            jax.device_put(rng.standard_normal(a.shape).astype(a.dtype) * 0.02, device)
            for a in floats
        ]
        arrays += [jax.device_put(np.zeros(a.shape, a.dtype), device) for a in others]
        jitted = jax.jit(fn)
        measured = _time(lambda f=jitted, xs=arrays: f(*xs), args.repeats)
        cost = P.forward_cost(name, *b_args)
        rows[name] = {
            "measured_s": measured,
            "predicted_s": program_time(cost, P.KIND[name], hw) + hw.program_overhead_s,
            "flops": cost.flops,
            "bytes_accessed": cost.bytes_accessed,
        }
    for r in rows.values():
        r["error"] = r["predicted_s"] / r["measured_s"] - 1.0
    return {
        "size": args.size,
        "hardware": hardware,
        "device": str(device.device_kind),
        "platform": device.platform,
        "overrides": [*GPU_SIZE_OVERRIDES[args.size], *args.overrides],
        "programs": rows,
        "source": f"measured on {device.device_kind} vs projected with configs/hardware/{hardware}.yaml",
    }


def print_gpu(out: dict[str, Any]) -> None:
    print(f"{out['source']} (size {out['size']}: {' '.join(out['overrides'])})")
    print(f"{'program':16s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>8s}")
    for name, r in out["programs"].items():
        print(
            f"{name:16s} {1e3 * r['measured_s']:12.3f} {1e3 * r['predicted_s']:13.3f} "
            f"{100 * r['error']:+7.1f}%"
        )


def main(argv: list[str]) -> int:
    args = _parse(argv)
    args.argv = list(argv)
    if args.measure_cpu:
        from maxjax.bench.measure import setup_devices

        setup_devices(16)
        from maxjax.perf.hardware import write_cpu_spec

        path = write_cpu_spec()
        print(f"wrote {path}\n{path.read_text()}")
        return 0
    if args.validate:
        out = validate(args)
        print_validation(out)
    elif args.measure_gpu:
        out = measure_gpu(args)
        print_gpu(out)
    else:
        out = project(args)
        print_projection(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
        print(f"wrote {args.json}")
    return 0
