"""`python -m maxjax.bench NAME [options]`: run one benchmark (`--help` after NAME for its options)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "table1": ("maxjax.bench.table1", "Table 1: TPOT, TPS, throughput, utilisation, memory"),
    "seqlen": ("maxjax.bench.seqlen", "TPOT at four sequence lengths (seed section 5.7)"),
    "project": ("maxjax.bench.project", "Projected paper-scale tables, planner, CPU/GPU checks"),
    "memory": ("maxjax.bench.memory", "Memory plan per device and part (no allocation)"),
    "ma-step": ("maxjax.bench.ma_step", "MA separation vs single: step time, bytes, programs"),
    "failover": (
        "maxjax.bench.failover",
        "Seed §5.9: replica cost, in-place failover, throughput with failed devices, restart",
    ),
    "convergence": (
        "maxjax.bench.convergence",
        "Seed §6: convergence of single, MA (float32 / int8 traffic), TP x PP over seeds",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: python -m maxjax.bench NAME [options]\n\nbenchmarks:")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:11s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    try:
        return module.main(argv[1:]) or 0
    except Exception as e:
        # Refused input (a config, a strategy, a hardware spec, a checkpoint...): one line, as
        # maxjax.train ends, unless MAXJAX_DEBUG=1. Imported here, after the benchmark has set
        # up its devices. ValueError covers ConfigError and DataError, the perf modules' own
        # refusals and argument values that the benchmark cannot use.
        from maxjax.evaluate import USER_ERRORS, debugging, one_line

        if debugging() or not isinstance(e, (*USER_ERRORS, ValueError)):
            raise
        print(f"maxjax.bench {argv[0]}: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
