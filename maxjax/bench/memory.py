"""Memory plan of a strategy, per device and part, before renting the cluster.

`python -m maxjax.bench memory --config PATH --strategy NAME [--set KEY=VALUE ...] [--decode]
[--capacity-gb 80] [--json FILE]`

Nothing is allocated: on 16 emulated CPU devices the parameters, optimizer state, gradients,
saved residuals, pieces, token states and KV caches are sized from abstract shapes with their
shardings, and the temporaries of every program the step runs from `memory_analysis()` of the
program compiled ahead of time (`maxjax.perf.memory`). Each device's total is its largest phase
of the step; the parts shown are those alive in that phase and add up to the total.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from maxjax.bench import measure

SHORT = {
    "parameters": "params",
    "gradients": "grads",
    "optimizer_state": "optimizer",
    "residuals": "residuals",
    "transfer_buffers": "transfers",
    "token_states": "tokens",
    "kv_cache": "kv cache",
    "temporaries": "temp",
    "standby": "standby",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maxjax.bench memory", description=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--strategy", default="ma", help="ma, tp, pp or tp_pp")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--decode", action="store_true", help="plan KV-cache decoding")
    parser.add_argument("--batch", type=int, help="sequences (default: sequence.batch_size)")
    parser.add_argument("--prompt-len", type=int, help="decoding prompt (default: length / 2)")
    parser.add_argument("--max-len", type=int, help="decoding cache (default: sequence.length)")
    parser.add_argument("--capacity-gb", type=float, default=80.0, help="GB (1e9 bytes)")
    parser.add_argument("--json", help="write the plan to this file")
    return parser.parse_args(argv)


def format_table(result: dict[str, Any]) -> str:
    """One row per device: bytes per part at its peak phase, total, % of capacity, '!' where it
    does not fit. In GB (1e9 bytes), or MB (1e6) when every device holds under a GB."""
    parts = result["parts"]
    capacity = result["capacity_bytes"]
    rows = result["per_device"]
    unit, scale = ("GB", 1e9) if max(r["total_bytes"] for r in rows) >= 1e9 else ("MB", 1e6)
    header = (
        f"{'dev':>3s} {'pool':10s} "
        + " ".join(f"{SHORT[p]:>10s}" for p in parts)
        + f" {'total':>10s} {'% cap':>7s}   peak phase"
    )
    lines = [
        f"memory plan: {result['strategy']} {result['mode']}, config {result['config']}, "
        f"{result['settings']}",
        f"{unit} ({scale:.0e} bytes) per device at its peak phase; capacity "
        f"{capacity / 1e9:g} GB; '!' = does not fit",
        header,
    ]
    for row in rows:
        mark = " " if row["fits"] else "!"
        lines.append(
            f"{row['device']:3d} {row['pool']:10s} "
            + " ".join(f"{row[p] / scale:10.3f}" for p in parts)
            + f" {row['total_bytes'] / scale:10.3f} {100 * row['fraction_of_capacity']:6.1f}%"
            + f" {mark} {row['peak_phase']}"
        )
    fits = sum(row["fits"] for row in rows)
    lines.append(f"{fits} of {len(rows)} devices fit {capacity / 1e9:g} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    measure.setup_devices()
    args = parse_args(list(argv or []))
    from maxjax.config import load_config
    from maxjax.perf import memory

    cfg = load_config(args.config, args.set)
    start = time.perf_counter()
    plan = memory.plan(
        cfg,
        args.strategy,
        decode=args.decode,
        capacity_bytes=args.capacity_gb * 1e9,
        batch=args.batch,
        prompt_len=args.prompt_len,
        max_len=args.max_len,
        config_name=args.config,
    )
    result = plan.to_json()
    result["overrides"] = args.set
    result["devices"] = measure.device_label()
    result["plan_seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(f"planned in {result['plan_seconds']:.0f} s on {result['devices']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
