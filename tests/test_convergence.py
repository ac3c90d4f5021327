"""The convergence benchmark: its statistics, and float32 MA learning step for step like single."""

import json
import math

import pytest

from maxjax.bench import convergence as cv


def test_paired_t_test_matches_closed_forms():
    # One degree of freedom: p = 1 - (2/pi) atan|t|. d = [1, 3]: mean 2, sd sqrt(2), t = 2.
    one = cv.paired_t_test([1.0, 3.0], [0.0, 0.0])
    assert one["t"] == pytest.approx(2.0)
    assert one["p"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-12)
    # Two degrees of freedom: p = 1 - |t| / sqrt(2 + t^2). d = [1, 2, 4]: t = sqrt(7), p = 1 - sqrt(7)/3.
    two = cv.paired_t_test([2.0, 3.0, 5.0], [1.0, 1.0, 1.0])
    assert two["mean_difference"] == pytest.approx(7 / 3)
    assert two["t"] == pytest.approx(math.sqrt(7))
    assert two["p"] == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-12)
    assert cv.paired_t_test([1.0, 2.0, 4.0], [2.0, 3.0, 5.0])["t"] < 0


def test_paired_t_test_without_spread_and_invalid_input():
    assert cv.paired_t_test([1.0, 2.0], [1.0, 2.0]) == {
        "n": 2,
        "mean_difference": 0.0,
        "t": 0.0,
        "p": 1.0,
    }
    shifted = cv.paired_t_test([2.0, 3.0], [1.0, 2.0])
    assert (shifted["t"], shifted["p"]) == (math.inf, 0.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        cv.paired_t_test([1.0], [2.0])
    with pytest.raises(ValueError, match="equal-length"):
        cv.paired_t_test([1.0, 2.0], [1.0, 2.0, 3.0])


def test_spread_steps_to_reach_and_relative_difference():
    s = cv.spread([1.0, 2.0, 3.0])
    assert (s["n"], s["mean"], s["std"], s["min"], s["max"]) == (3, 2.0, 1.0, 1.0, 3.0)
    assert math.isnan(cv.spread([5.0])["std"])
    assert cv.steps_to_reach([10, 20, 30], [9.0, 7.0, 6.0], 7.0) == 20
    assert cv.steps_to_reach([10, 20], [9.0, 8.0], 7.0) is None
    assert cv.max_relative_difference([1.0, 4.4], [1.0, 4.0]) == pytest.approx(0.1)


def test_summary_target_and_comparisons():
    def runs(finals):
        return [
            {
                "seed": i,
                "train_loss": [3.0, 2.0],
                "val_steps": [1, 2],
                "val_perplexity": [f + 1.0, f],
                "final_val_perplexity": f,
            }
            for i, f in enumerate(finals)
        ]

    result = {
        "variants": {
            "single": {"runs": runs([10.0, 12.0])},
            "ma_int8": {"runs": runs([10.5, 12.5])},
        }
    }
    summary = cv.summarize(result)
    assert summary["target_perplexity"] == pytest.approx(11.5)
    assert summary["variants"]["single"]["steps_to_target"] == [1, None]
    (comparison,) = summary["comparisons"]
    assert (comparison["variant"], comparison["against"]) == ("ma_int8", "single")
    assert comparison["paired_t_test"]["mean_difference"] == pytest.approx(0.5)
    assert comparison["max_relative_loss_difference"] == 0.0


def test_unknown_variant_is_a_one_line_error(capsys):
    assert cv.main(["--variants", "single,ma_fp16"]) == 1
    assert "unknown ['ma_fp16']" in capsys.readouterr().err


# Float32 MA and single compute the same function; only the order of floating-point sums differs
# (each loss sums ~10^7 products, and AdamW's m / sqrt(v) carries every rounding difference into
# the next step). 1e-5 is ~80 float32 ulps (eps 1.19e-7): far below what one int8 round trip of
# the buffers changes (~1e-3 per step measured), far above rounding after 3 steps (~3e-7).
FLOAT32_STEP_RTOL = 1e-5


def test_command_writes_curves_and_float32_ma_tracks_single(tmp_path, capsys):
    path = tmp_path / "convergence.json"
    argv = [
        "--steps", "3", "--seeds", "2", "--variants", "single,ma_float32", "--no-progress",
        "--set", "model.layers=1", "--set", "ma_separation.microbatches=1",
        "--set", "sequence.batch_size=4", "--set", "sequence.total_tokens_per_batch=128",
        "--set", "training.validation_interval=2", "--set", "training.validation_batches=1",
        "--json", str(path),
    ]  # fmt: skip
    assert cv.main(argv) == 0
    printed = capsys.readouterr().out
    assert "float32 MA can differ from single only by the order" in printed
    result = json.loads(path.read_text())
    assert result["command"].startswith("python -m maxjax.bench convergence --steps 3")
    assert result["seeds"] == [0, 1]
    for name in ("single", "ma_float32"):
        for run in result["variants"][name]["runs"]:
            assert len(run["train_loss"]) == 3
            assert run["val_steps"] == [2, 3]
            assert run["final_val_perplexity"] == run["val_perplexity"][-1] > 1
    single, ma = (result["variants"][n]["runs"] for n in ("single", "ma_float32"))
    for a, b in zip(ma, single, strict=True):
        assert a["seed"] == b["seed"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=FLOAT32_STEP_RTOL)
        assert a["val_perplexity"] == pytest.approx(b["val_perplexity"], rel=FLOAT32_STEP_RTOL)
    assert single[0]["train_loss"] != single[1]["train_loss"]  # seeds differ
    summary = result["summary"]
    assert set(summary["variants"]) == {"single", "ma_float32"}
    (comparison,) = summary["comparisons"]
    assert comparison["max_relative_loss_difference"] <= FLOAT32_STEP_RTOL
    assert {"t", "p", "mean_difference"} <= set(comparison["paired_t_test"])
    assert result["seed_section_6"]["ma_perplexity"] == 12.8
