"""The Table 1 and sequence-length benchmarks run and write well-formed JSON (no timing asserts)."""

import json
import math

from maxjax.bench import seqlen, table1
from maxjax.bench.measure import Timing

NUMBERS = ("tpot_ms", "tps", "throughput", "utilization", "memory_efficiency")


def positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_timing_reports_median_and_spread():
    t = Timing.of([3.0, 1.0, 2.0])
    assert (t.median, t.low, t.high) == (2.0, 1.0, 3.0)


def test_table1_rows(tmp_path, capsys):
    path = tmp_path / "table1.json"
    argv = ["--repeats", "1", "--new-tokens", "2", "--decode-batch", "2", "--strategies", "tp"]
    assert table1.main([*argv, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Table 1, measured on 16 emulated CPU devices" in printed
    result = json.loads(path.read_text())
    assert result["devices"].startswith("16 emulated CPU devices")
    (row,) = result["rows"]
    assert row["strategy"] == "tp"
    for name in NUMBERS:
        assert positive_finite(row[name]), name
    assert row["seed"]["tpot_ms"] == 2.84


def test_seqlen_rows(tmp_path):
    path = tmp_path / "seqlen.json"
    argv = ["--repeats", "1", "--new-tokens", "2", "--decode-batch", "8", "--strategies", "pp"]
    assert seqlen.main([*argv, "--lengths", "4,8", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["devices"].startswith("16 emulated CPU devices")
    assert [r["context_len"] for r in result["rows"]] == [4, 8]
    assert all(positive_finite(r["tpot_ms"]) for r in result["rows"])


def test_trace_intervals_busy_and_overlap():
    from maxjax.bench.trace import intersection, length, pool_activity, union

    assert union([(3, 4), (0, 2), (1, 2.5)]) == [(0, 2.5), (3, 4)]
    assert length([(0, 1), (0.5, 2)]) == 2
    assert intersection([(0, 2), (3, 5)], [(1, 4)]) == [(1, 2), (3, 4)]
    busy = {0: [(0.0, 2.0)], 1: [(1.0, 3.0)], 12: [(2.5, 4.0)], 13: [(3.5, 5.0)]}
    activity = pool_activity(busy, attention=[0, 1], experts=[12, 13])
    assert activity["attention_busy_s"] == 3.0
    assert activity["experts_busy_s"] == 2.5
    assert activity["overlap_s"] == 0.5
    assert activity["overlap_fraction_of_experts"] == 0.2
