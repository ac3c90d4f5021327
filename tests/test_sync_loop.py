"""The sync loop in training: stage samples from profiler runs, and the records it writes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _train_helpers import FAST, records, train_argv, train_losses

from maxjax import train
from maxjax.sync import balancer, measure
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
    "microbatches_before",
    "microbatches_decided_by",
    "predicted_step_seconds",
    "applied",
    "seconds",
    "load_imbalance_before",
    "imbalance_after",
    "load_imbalance_after",
    "predicted_time_imbalance_before",
    "predicted_time_imbalance_after",
    "previous_load_imbalance_after",
    "layers_moved",
    "moved_bytes",
    "move_seconds",
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
    even = np.full((cfg.model.layers, cfg.moe.experts_per_layer), 1 / 16)
    loop.note_step(even)
    state, record = loop.observe(5, even, state=None)  # even loads: nothing to move
    assert record["samples"] == 0 and "no stage program runs" in record["error"]
    assert record["step"] == 5 and record["applied"] is False and record["moved_bytes"] == 0
    assert loop.predictor is None and loop.linear is None


@pytest.mark.slow
def test_training_with_the_sync_loop_writes_records_and_the_same_losses(tmp_path):
    """MA training with sync_interval=2 writes a sync record after steps 2, 4 and 6 (the second
    with held-out errors of both time models), re-places experts, and logs the losses of the
    same run with the loop off, also across a resume from the checkpoint of step 4, which holds
    the placement of the sync point at step 4 and restores it."""
    from maxjax import model
    from maxjax.checkpoint import CheckpointStore, restore_target
    from maxjax.config import load_config
    from maxjax.parallel.ma import MARunner

    steps, on, off = 6, tmp_path / "on", tmp_path / "off"
    extra = ("training.dtype=float32", "checkpoint.interval_steps=4")
    argv = train_argv(off, steps, *extra, strategy="ma")
    assert train.main([*argv, "--no-checkpoint"]) == 0
    interval = "ma_separation.synchronization.sync_interval=2"
    assert train.main(train_argv(on, 4, *extra, interval, strategy="ma")) == 0
    assert train.main(train_argv(on, steps, *extra, interval, strategy="ma")) == 0

    synced = [r for r in records(on) if r.get("event") == "sync"]
    assert [r["step"] for r in synced] == [2, 4, 6]
    for record in synced:
        assert set(record) == set(SYNC_KEYS), set(record) ^ set(SYNC_KEYS)
        assert record["samples"] == 2 * 4 * 2 * (1 + 4)  # sweeps x layers x micro-batches x (1 + J)
        # The micro-batch count is re-chosen only with rechoose_microbatches (below).
        assert record["microbatches_before"] == record["microbatches"] == 2
        assert record["microbatches_decided_by"] is None
        assert 0 <= record["imbalance_before"] < 1 and 0 <= record["pool_imbalance"] < 1
        assert all(t > 0 for t in record["expert_stage_seconds"])
        assert len(record["expert_mapping"]) == 4 and len(record["load_imbalance_after"]) == 4
    # Nothing fitted before the first sync point: the loads decide there. A random router is
    # out of balance by more than 5%, so the loop moved experts at step 2.
    assert synced[0]["predictor_mape"] is None and synced[0]["decided_by"] == "loads"
    assert synced[0]["predicted_time_imbalance_before"] is None
    assert synced[0]["applied"] and synced[0]["moved_bytes"] > 0
    assert synced[0]["layers_moved"] == [
        layer for layer, value in enumerate(synced[0]["load_imbalance_before"]) if value > 0.05
    ]
    assert synced[1]["predictor_mape"] >= 0 and synced[1]["linear_mape"] >= 0
    # At step 4 the better model's predicted expert-stage times decide: a layer moves only
    # where they differ by more than the threshold and the new placement evens them.
    assert synced[1]["decided_by"] in ("predictor", "linear")
    before, after = (synced[1][f"predicted_time_imbalance_{k}"] for k in ("before", "after"))
    assert len(before) == len(after) == 4
    assert synced[1]["layers_moved"] == [
        layer for layer in range(4) if before[layer] > 0.05 and after[layer] < before[layer]
    ]
    assert synced[1]["applied"] == (synced[1]["moved_bytes"] > 0) == bool(synced[1]["layers_moved"])
    assert synced[1]["previous_load_imbalance_after"]["step"] == 2
    assert synced[2]["previous_load_imbalance_after"] is None  # models and loads: in memory
    # The checkpoint of step 4 holds the placement in use after that sync point (moved at step
    # 2, and at step 4 where the model said so); a fresh runner takes it on restore.
    cfg = load_config("configs/tiny.yaml", [*FAST, *extra, interval])
    runner = MARunner(cfg)
    configured = runner.storage_layout()["expert_order"]
    restore_on = CheckpointStore(on)
    _, _, meta, _ = restore_on.restore(
        model.abstract_params(cfg), step=4, target=restore_target(runner)
    )
    restore_on.close()
    order = [[e for d in mapping.values() for e in d] for mapping in synced[1]["expert_mapping"]]
    assert meta["layout"]["expert_order"] == order != configured
    assert meta["microbatches"] == 2
    assert runner.storage_layout()["expert_order"] == order
    assert not [r for r in records(off) if r.get("event") == "sync"]
    got, want = dict(train_losses(on)), dict(train_losses(off))
    assert got.keys() == want.keys() == set(range(1, steps + 1))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), step


@pytest.mark.slow
def test_training_rechooses_the_microbatch_count_and_resumes_with_it(tmp_path):
    """With rechoose_microbatches, while the pools' measured times differ by more than 5%: at
    step 2 the loop explores the other count the CPU backend runs (1); at step 4, with both
    measured, it keeps the one with the smaller predicted step time, which the checkpoint of
    step 4 holds and the resumed run measures step 6 with. Without int8 traffic the losses stay
    within float rounding (relative 1e-5) of the run without the loop."""
    on, off = tmp_path / "on", tmp_path / "off"
    extra = (
        "training.dtype=float32",
        "checkpoint.interval_steps=4",
        "ma_separation.synchronization.communication_compression=none",
    )
    assert train.main([*train_argv(off, 6, *extra, strategy="ma"), "--no-checkpoint"]) == 0
    loop = (
        "ma_separation.synchronization.sync_interval=2",
        "ma_separation.synchronization.rechoose_microbatches=true",
    )
    assert train.main(train_argv(on, 4, *extra, *loop, strategy="ma")) == 0
    assert train.main(train_argv(on, 6, *extra, *loop, strategy="ma")) == 0

    synced = [r for r in records(on) if r.get("event") == "sync"]
    assert [r["step"] for r in synced] == [2, 4, 6]
    first, second, third = synced
    for record in synced:
        assert record["samples"] == 2 * 4 * record["microbatches_before"] * (1 + 4)
    assert first["microbatches_before"] == 2
    if first["pool_imbalance"] > 0.05:
        assert first["microbatches_decided_by"] == "explore" and first["microbatches"] == 1
        assert first["predicted_step_seconds"] is None
    else:
        assert first["microbatches"] == 2 and first["microbatches_decided_by"] is None
    assert second["microbatches_before"] == first["microbatches"]
    if first["microbatches"] == 1 and second["pool_imbalance"] > 0.05:
        predicted = second["predicted_step_seconds"]
        assert second["microbatches_decided_by"] == second["decided_by"]
        assert sorted(predicted) == ["1", "2"]
        assert second["microbatches"] == int(min(predicted, key=predicted.get))
    # The resumed run measured step 6 with the count in use after step 4 (from the checkpoint).
    assert third["microbatches_before"] == second["microbatches"]
    got, want = dict(train_losses(on)), dict(train_losses(off))
    assert got.keys() == want.keys() == set(range(1, 7))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), step


@pytest.mark.slow
def test_the_balancer_evens_a_skewed_router_without_changing_the_step():
    """A router biased toward the first expert device's experts (`router_biased_toward`: each
    of them fills its capacity in every sequence, no other expert gets a token): the sync
    loop's re-placement brings the expert devices' work (their filled slots, measured over the
    following steps) within the load-balancing threshold, moves each expert with its AdamW
    moments, and leaves the loss and every gradient as they were."""
    from maxjax import model, optim
    from maxjax.bench.ma_step import router_biased_toward
    from maxjax.config import load_config
    from maxjax.data.pipeline import TokenBatches
    from maxjax.parallel.ma import MARunner
    from maxjax.sync import balancer
    from maxjax.sync.loop import SyncLoop

    cfg = load_config(
        "configs/tiny.yaml",
        [
            *FAST,
            "training.dtype=float32",
            "sequence.length=32",  # few sequences without a token of each class
            "sequence.batch_size=64",
            "sequence.total_tokens_per_batch=2048",
            "moe.capacity_factor=0.25",  # one slot per expert and sequence
            "optimizer.learning_rate=1e-6",  # routing stays as it is: this is about placement
            "ma_separation.expert_compute=filled_slots",
        ],
    )
    data = TokenBatches(cfg, "train")
    canonical = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(cfg, 0))())
    first_device = cfg.experts_of_device(cfg.expert_devices[0])
    canonical = router_biased_toward(canonical, first_device, cfg.moe.top_k)
    runner, tx = MARunner(cfg), optim.make_optimizer(cfg)
    state = runner.init_train_state(runner.from_canonical(canonical), tx)
    loop = SyncLoop(cfg, runner)
    devices = len(cfg.expert_devices)

    def device_imbalance(shares):
        rows = balancer.device_load_rows(shares, runner.experts.order, devices)
        return np.array([balancer.imbalance(row) for row in rows])

    for _ in range(2):
        state, metrics = runner.train_step(state, next(data), tx)
        loop.note_step(np.asarray(metrics["expert_kept_fraction_by_layer"]))
    skewed = device_imbalance(loop.interval_loads())
    np.testing.assert_array_equal(skewed, 1.0)  # the other devices compute nothing
    batch = next(data)
    before_metrics, before_grads = runner.value_and_grad(state.params, batch)
    before_norm = float(runner.squared_norm("experts", runner.split_pools(before_grads)["experts"]))
    before_grads = runner.gather(before_grads)
    moments_before = runner.gather(runner.export_train_state(state)["mu"])
    params_before = runner.gather(state.params)
    state, placement = loop.act(state, step=2)

    assert placement["applied"] and placement["layers_moved"] == [0, 1, 2, 3]
    np.testing.assert_allclose(placement["load_imbalance_before"], skewed)
    threshold = cfg.ma_separation.synchronization.load_balancing_threshold
    assert np.all(np.array(placement["load_imbalance_after"]) <= threshold)
    assert runner.storage_layout()["expert_order"] != MARunner(cfg).storage_layout()["expert_order"]
    # Each expert that changed device carries its weights and both moments.
    per_expert = 3 * 4 * 2 * cfg.model.hidden_dim * cfg.moe.expert_hidden_dim
    before_order = np.tile(MARunner(cfg).experts.order[0], (cfg.model.layers, 1))
    changed = (np.argsort(before_order, axis=1) // 4) != (runner.experts.row_of_expert // 4)
    assert placement["moved_bytes"] == per_expert * changed.sum()
    report = runner.layout_report(state.params)
    for mapping, placed in zip(placement["expert_mapping"], report.expert_placement, strict=True):
        assert sorted(e for experts in mapping.values() for e in experts) == list(range(16))
        assert list(mapping.values()) == list(placed.values())
    # What each expert device now holds, read from its own shard: the experts the record names.
    for index, layer in state.params["layers"].items():
        wi = layer["moe"]["experts"]["wi"]
        want = params_before["layers"][index]["moe"]["experts"]["wi"]
        held = {s.device.id: np.asarray(s.data) for s in wi.addressable_shards}
        for device, experts in placement["expert_mapping"][int(index)].items():
            np.testing.assert_array_equal(held[int(device[4:])], want[experts], device)

    # The same function, bit for bit: no sum depends on which device holds an expert.
    after_metrics, after_grads = runner.value_and_grad(state.params, batch)
    assert float(after_metrics["loss"]) == float(before_metrics["loss"])
    for got, want in zip(
        jax.tree.leaves(runner.gather(after_grads)), jax.tree.leaves(before_grads), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    after_norm = runner.squared_norm("experts", runner.split_pools(after_grads)["experts"])
    assert float(after_norm) == before_norm
    moments_after = runner.gather(runner.export_train_state(state)["mu"])
    for got, want in zip(
        jax.tree.leaves(moments_after), jax.tree.leaves(moments_before), strict=True
    ):
        np.testing.assert_array_equal(got, want)

    after = SyncLoop(cfg, runner)
    for _ in range(2):
        state, metrics = runner.train_step(state, next(data), tx)
        after.note_step(np.asarray(metrics["expert_kept_fraction_by_layer"]))
    measured = device_imbalance(after.interval_loads())
    assert np.all(measured <= threshold), measured


def test_microbatch_count_is_explored_then_chosen_by_the_predicted_step_time():
    """With stage times that follow a known law, exactly fitted by the linear model: no change
    while the pools are within the threshold; a neighbouring count without measurements is
    explored first; once both are measured, the count with the smaller step time (per layer,
    attention against the slowest expert device, overlapped as the ping-pong schedule says) is
    chosen: more micro-batches when the stage times are all per token, fewer when each
    micro-batch has a large fixed cost. (On the CPU backend the neighbours of 2 are 1 only:
    `CPU_MAX_MA_MICROBATCHES`.)"""
    from maxjax.config import load_config
    from maxjax.parallel.ma import MARunner
    from maxjax.sync.loop import SyncLoop
    from maxjax.sync.predictor import fit_linear

    # 8 sequences of 128 tokens, 2 micro-batches, 12 + 4 devices
    cfg = load_config("tiny", ["ma_separation.synchronization.rechoose_microbatches=true"])
    layers, devices = cfg.model.layers, len(cfg.expert_devices)
    shares = np.tile([0.4, 0.2, 0.2, 0.2], (layers, 1))  # device 0 the slowest in every layer

    def law(overhead: float):
        def seconds(expert: int, backward: int, tokens: float) -> float:
            return overhead * (1 + backward) + 1e-5 * tokens

        return seconds

    def samples(loop: SyncLoop, microbatches: int, seconds) -> measure.StageSamples:
        fixed = loop._shape(microbatches)
        per_share = fixed.pop("assignments_per_share")
        attention_tokens = fixed["microbatch_sequences"] * fixed["sequence_length"] / 12
        rows, times, device = [], [], []
        for backward in (0, 1):
            rows.append(
                measure.feature_rows([attention_tokens], expert_stage=0, backward=backward, **fixed)
            )
            times.append([seconds(0, backward, attention_tokens)])
            device.append([-1])
            tokens = shares[0] * per_share
            rows.append(measure.feature_rows(tokens, expert_stage=1, backward=backward, **fixed))
            times.append([seconds(1, backward, t) for t in tokens])
            device.append(list(range(devices)))
        n = sum(len(t) for t in times)
        return measure.StageSamples(
            np.concatenate(rows),
            np.concatenate(times),
            np.zeros(n, np.int32),
            np.concatenate(device),
        )

    def expected_step(microbatches: int, seconds) -> float:
        sequences = cfg.sequence.batch_size // microbatches
        tokens = sequences * cfg.sequence.length
        attention = sum(seconds(0, b, tokens / 12) for b in (0, 1))
        expert = sum(seconds(1, b, 0.4 * tokens * cfg.moe.top_k) for b in (0, 1))
        return layers * balancer.pingpong_layer_time(
            microbatches * attention, microbatches * expert, microbatches
        )

    assert jax.default_backend() == "cpu"
    for overhead, best in ((0.0, 2), (0.05, 1)):
        seconds = law(overhead)
        loop = SyncLoop(cfg, MARunner(cfg))
        loop.window = [samples(loop, 2, seconds)]
        loop.linear = fit_linear(loop.window[0].features, loop.window[0].times[:, None])

        kept = loop.rechoose_microbatches("linear", shares, pool_imbalance=0.05)
        assert kept["microbatches"] == 2 and kept["microbatches_decided_by"] is None

        explored = loop.rechoose_microbatches("linear", shares, pool_imbalance=0.5)
        assert explored == {
            "microbatches_before": 2,
            "microbatches_decided_by": "explore",
            "microbatches": 1,
            "predicted_step_seconds": None,
        }
        assert loop.runner.microbatches == 1

        loop.window.append(samples(loop, 1, seconds))
        features = np.concatenate([w.features for w in loop.window])
        loop.linear = fit_linear(features, np.concatenate([w.times for w in loop.window])[:, None])
        chosen = loop.rechoose_microbatches("linear", shares, pool_imbalance=0.5)
        # The one neighbour of 1 is 2, measured: no more exploring; 1 and 2 are compared.
        assert chosen["microbatches_decided_by"] == "linear"
        predicted = chosen["predicted_step_seconds"]
        assert sorted(predicted) == ["1", "2"]
        for m in (1, 2):
            assert predicted[str(m)] == pytest.approx(expected_step(m, seconds), rel=1e-6)
        assert chosen["microbatches"] == loop.runner.microbatches == best
