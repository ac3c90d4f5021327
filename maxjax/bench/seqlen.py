"""TPOT by sequence length (seed §5.7): decode time per token with a KV cache of growing context.

`python -m maxjax.bench seqlen [--config PATH] [--json PATH] [--repeats N] [--lengths 32,64,...]`

The seed measures MA separation at 512, 1024, 2048 and 4096 tokens (0.89, 1.21, 1.82, 3.41 ms);
here the four context lengths double from `sequence.length` (32, 64, 128, 256 for the tiny
config). The prompt fills the context, then `--new-tokens` tokens are decoded; TPOT is the
median wall time of one decode step (prefill excluded). See `maxjax.bench.table1` for what wall times on emulated
devices mean.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from maxjax.bench import measure
from maxjax.bench.table1 import TABLE_STRATEGIES, available_strategies, measure_decode

SEED_TPOT_MS = {512: 0.89, 1024: 1.21, 2048: 1.82, 4096: 3.41}  # MA separation, seed §5.7


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maxjax.bench seqlen", description=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--strategies", default=",".join(TABLE_STRATEGIES))
    parser.add_argument("--lengths", help="comma-separated (default: sequence.length x 1,2,4,8)")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    return parser.parse_args(argv)


def context_lengths(cfg: Any, requested: str | None) -> list[int]:
    if requested:
        return [int(x) for x in requested.split(",")]
    return [cfg.sequence.length * 2**i for i in range(4)]


def format_table(rows: list[dict[str, Any]], lengths: list[int], label: str) -> str:
    seed = " ".join(f"{length}: {ms}" for length, ms in SEED_TPOT_MS.items())
    lines = [
        f"TPOT (ms) by context length, measured on {label} (median, min-max)",
        f"seed (MA separation, 16 x A100): {seed}",
        f"{'strategy':8s} " + " ".join(f"{length:>22d}" for length in lengths),
    ]
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        cells = []
        for length in lengths:
            row = next(r for r in rows if r["strategy"] == strategy and r["context_len"] == length)
            tpot = row.get("tpot_ms")
            cells.append(
                f"{tpot:.3g} ({row['tpot_ms_min']:.3g}-{row['tpot_ms_max']:.3g})" if tpot else "n/a"
            )
        lines.append(f"{strategy:8s} " + " ".join(f"{c:>22s}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    measure.setup_devices()
    args = parse_args(list(argv or []))
    from maxjax.config import load_config
    from maxjax.parallel import make_runner

    cfg = load_config(args.config, args.set)
    lengths = context_lengths(cfg, args.lengths)
    label = measure.device_label()
    rows = []
    for strategy in available_strategies(args.strategies):
        runner = make_runner(cfg, strategy)
        params = runner.init(0)
        for length in lengths:
            measure.progress(f"{strategy}: context {length}")
            row = {"strategy": strategy, "context_len": length}
            row.update(measure_decode(runner, params, args, length))
            rows.append(row)
            if "decode_note" in row:
                print(f"note ({strategy}): {row['decode_note']}")
                break
    shown = [r for r in rows if r.get("tpot_ms")]
    print(format_table(shown, lengths, label))
    if args.json:
        result = {"devices": label, "config": args.config, "overrides": args.set,
                  "seed_tpot_ms": SEED_TPOT_MS, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
