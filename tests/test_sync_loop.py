"""The sync loop in training: stage samples from profiler runs, and the records it writes."""

from __future__ import annotations

import numpy as np
import pytest
from _train_helpers import records, train_argv, train_losses

from maxjax import train
from maxjax.sync import measure
from maxjax.sync.measure import ProgramRun

SYNC_KEYS = (
    "event",
    "step",
    "imbalance_before",
    "pool_imbalance",
    "attention_stage_seconds",
    "expert_stage_seconds",
    "samples",
    "predictor_mape",
    "linear_mape",
    "decided_by",
    "expert_mapping",
    "microbatches",
    "applied",
    "seconds",
)


def synthetic_runs(layers: int, microbatches: int) -> list[ProgramRun]:
    """A step's runs: attention devices 0, 1 and expert devices 2, 3; the forward sweep, then the
    backward sweep (layers in reverse, each stage taking twice its forward time). Expert device
    3 takes twice as long as device 2 in layer 1; attention device 1 is the slower one. As in
    JAX's traces, each executable numbers its executions from its own random base, so the run
    ids say nothing of the order across executables; the start times do. Here the later stages'
    executables count from lower bases, and the expert backward of a layer's first micro-batch
    (no gradient sum to add to yet) is an executable of its own, as in a real step."""
    base = {"first_vjp": 9000, "middle_vjp": 100, "experts_backward/first": 5000}
    runs, clock = [], 0.0

    def run_id(executable: str) -> int:
        base[executable] = base.get(executable, 10 * len(base)) + 1
        return base[executable]

    sweeps = (("vjp", range(layers), 1.0), ("backward", reversed(range(layers)), 2.0))
    for sweep, order, factor in sweeps:
        for layer in order:
            for micro in range(microbatches):
                name = ("first_" if layer == 0 else "middle_") + sweep
                if sweep == "backward" and layer > 0:
                    name = "layer_backward"
                run = run_id(name)
                runs += [
                    ProgramRun(0, name, run, clock, 0.010 * factor),
                    ProgramRun(1, name, run, clock, 0.012 * factor),
                ]
                slow = 2.0 if layer == 1 else 1.0
                first = sweep == "backward" and micro == 0
                run = run_id(f"experts_{sweep}" + ("/first" if first else ""))
                runs += [
                    ProgramRun(2, f"experts_{sweep}", run, clock + 0.5, 0.005 * factor),
                    ProgramRun(3, f"experts_{sweep}", run, clock + 0.5, 0.005 * slow * factor),
                    ProgramRun(2, "summarize", run_id("summarize"), clock + 0.6, 1.0),
                ]
                clock += 1.0
    return runs[::-1]  # in no particular order


def test_runs_become_stage_samples_by_layer_sweep_and_device():
    layers, microbatches = 2, 2
    assignments = np.array([[10.0, 30.0], [20.0, 20.0]])  # [layers, expert devices]
    samples = measure.stage_samples(
        synthetic_runs(layers, microbatches),
        attention_devices=[0, 1],
        expert_devices=[2, 3],
        layers=layers,
        microbatches=microbatches,
        microbatch_sequences=4,
        sequence_length=8,
        heads_per_attention_device=2.0,
        experts_per_device=4,
        compression=True,
        assignments=assignments,
    )
    column = {name: i for i, name in enumerate(measure.FEATURES)}
    backward = samples.features[:, column["backward"]] == 1
    attention = samples.device == -1
    assert len(samples.times) == 2 * 3 * layers * microbatches and backward.sum() == 12
    np.testing.assert_allclose(samples.times[attention & ~backward], 0.012)  # the slowest device's
    np.testing.assert_allclose(samples.times[attention & backward], 0.024)
    np.testing.assert_array_equal(samples.layer[attention], [0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(samples.features[attention, column["tokens"]], 4 * 8 / 2)
    on_3 = samples.device == 1
    np.testing.assert_array_equal(samples.layer[on_3], [0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(
        samples.times[on_3], [0.005, 0.005, 0.010, 0.010, 0.020, 0.020, 0.010, 0.010]
    )
    np.testing.assert_allclose(
        samples.features[on_3, column["tokens"]], [30, 30, 20, 20, 20, 20, 30, 30]
    )
    assert set(samples.features[:, column["expert_stage"]]) == {0.0, 1.0}
    assert set(samples.features[:, column["compression"]]) == {1.0}
    imbalance = measure.measured_imbalance(samples, 2)
    assert imbalance["experts"] == pytest.approx(0.5)  # layer 1: device 3 twice device 2
    # Attention 4 x 0.012 + 4 x 0.024 = 0.144; the slowest expert device (3) 0.030 + 0.060.
    assert imbalance["pools"] == pytest.approx(1 - 0.090 / 0.144)


def test_stage_samples_need_assignments_for_every_layer():
    with pytest.raises(IndexError):
        measure.stage_samples(
            synthetic_runs(2, 1),
            attention_devices=[0, 1],
            expert_devices=[2, 3],
            layers=2,
            microbatches=1,
            microbatch_sequences=4,
            sequence_length=8,
            heads_per_attention_device=2.0,
            experts_per_device=4,
            compression=False,
            assignments=np.ones((1, 2)),
        )


def test_a_trace_without_stage_runs_gives_a_record_not_an_error():
    """A sync point whose trace holds no stage program runs (here: nothing ran while measuring;
    a backend whose traces name devices otherwise does the same) ends with a record saying so,
    and fits nothing; training goes on."""
    from maxjax.config import load_config
    from maxjax.parallel.ma import MARunner
    from maxjax.sync.loop import SyncLoop

    cfg = load_config("tiny")
    loop = SyncLoop(cfg, MARunner(cfg))
    with loop.measuring():
        pass
    record = loop.observe(5, np.full((cfg.model.layers, cfg.moe.experts_per_layer), 1 / 16))
    assert record["samples"] == 0 and "no stage program runs" in record["error"]
    assert record["step"] == 5 and record["applied"] is False
    assert loop.predictor is None and loop.linear is None


@pytest.mark.slow
def test_training_with_the_sync_loop_writes_records_and_the_same_losses(tmp_path):
    """MA training with sync_interval=3 writes a sync record after steps 3 and 6, the second
    with held-out errors of both time models, and logs the losses of the same run with the
    loop off."""
    steps, on, off = 6, tmp_path / "on", tmp_path / "off"
    for directory, interval in ((on, 3), (off, 0)):
        argv = train_argv(
            directory,
            steps,
            "training.dtype=float32",
            f"ma_separation.synchronization.sync_interval={interval}",
            strategy="ma",
        )
        assert train.main([*argv, "--no-checkpoint"]) == 0
    synced = [r for r in records(on) if r.get("event") == "sync"]
    assert [r["step"] for r in synced] == [3, 6]
    for record in synced:
        assert set(record) == set(SYNC_KEYS), set(record) ^ set(SYNC_KEYS)
        assert record["samples"] == 2 * 4 * 2 * (1 + 4)  # sweeps x layers x micro-batches x (1 + J)
        assert record["applied"] is False and record["microbatches"] == 2
        assert 0 <= record["imbalance_before"] < 1 and 0 <= record["pool_imbalance"] < 1
        assert all(t > 0 for t in record["expert_stage_seconds"])
    assert synced[0]["predictor_mape"] is None  # nothing fitted before the first sync point
    assert synced[1]["predictor_mape"] >= 0 and synced[1]["linear_mape"] >= 0
    assert synced[1]["decided_by"] in ("predictor", "linear")
    assert not [r for r in records(off) if r.get("event") == "sync"]
    got, want = dict(train_losses(on)), dict(train_losses(off))
    assert got.keys() == want.keys() == set(range(1, steps + 1))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), step
