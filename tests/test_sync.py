"""The time predictor and the balancer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax import sync
from maxjax.config import with_overrides


def synthetic_stage_times(features: np.ndarray) -> np.ndarray:
    """A made-up cost law: expert time ~ tokens * hidden, attention ~ batch * seq^2, plus overhead."""
    tokens, batch, seq = features[:, 0], features[:, 1], features[:, 2]
    expert = 2e-6 * tokens + 0.05
    attention = 1e-8 * batch * seq**2 + 0.02
    return np.stack([attention, expert], axis=1)


def test_predictor_fits_a_cost_law_it_has_not_seen_exactly():
    rng = np.random.default_rng(0)
    grid = np.array(
        list(
            itertools.product([256, 1024, 4096, 16384, 65536], [1, 2, 4, 8, 16], [128, 512, 2048])
        ),
        dtype=np.float32,
    )
    times = synthetic_stage_times(grid).astype(np.float32)
    predictor = sync.init_predictor(jax.random.key(0), num_features=3, num_outputs=2)
    predictor, loss = sync.fit(predictor, jnp.asarray(grid), jnp.asarray(times), steps=800)
    assert float(loss) < 0.02
    held_out = np.stack(
        [rng.uniform(300, 60000, 20), rng.integers(1, 16, 20), rng.uniform(128, 2048, 20)], axis=1
    ).astype(np.float32)
    predicted = np.asarray(sync.predict(predictor, jnp.asarray(held_out)))
    truth = synthetic_stage_times(held_out)
    rel = np.abs(predicted - truth) / truth
    assert np.median(rel) < 0.1, rel


def test_linear_model_recovers_a_linear_law_and_never_predicts_a_negative_time():
    rng = np.random.default_rng(1)
    # Features of very different magnitudes: tokens (up to 1e5), micro-batch size, heads.
    features = np.stack(
        [rng.uniform(1e2, 1e5, 40), rng.integers(1, 16, 40), rng.integers(1, 4, 40)], axis=1
    )
    weights, bias = np.array([[3e-6, 1e-6], [2e-3, 0.0], [5e-3, 1e-2]]), np.array([0.01, 0.02])
    times = features @ weights + bias
    model = sync.fit_linear(features, times)
    np.testing.assert_allclose(model.weights, weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.bias, bias, rtol=1e-9)
    np.testing.assert_allclose(sync.predict_linear(model, features), times, rtol=1e-9)
    below = sync.LinearTimeModel(np.array([[-1.0]]), np.array([0.5]))
    assert sync.predict_linear(below, np.array([[2.0]]))[0, 0] == 0.0


def test_mape():
    assert sync.mape([1.1, 1.8], [1.0, 2.0]) == pytest.approx((0.1 + 0.1) / 2)
    assert sync.mape([[3.0]], [[3.0]]) == 0.0


@pytest.mark.parametrize("law", ["linear", "quadratic in the sequence length"])
def test_held_out_scores_decide_by_the_better_model(law):
    """Fitted on a grid, scored on points off it: on a linear law the linear model is exact and
    decides; on the attention cost law (quadratic in the sequence length) the MLP, which fits in
    log space, is far closer and decides."""
    rng = np.random.default_rng(0)
    grid = np.array(
        list(itertools.product([256, 1024, 4096, 16384], [1, 2, 4, 8, 16], [128, 512, 2048])),
        dtype=np.float64,
    )
    held_out = np.stack(
        [rng.uniform(300, 16000, 30), rng.integers(1, 16, 30), rng.uniform(128, 2048, 30)], axis=1
    )

    def cost(f: np.ndarray) -> np.ndarray:
        if law == "linear":
            return (2e-6 * f[:, 0] + 1e-3 * f[:, 1] + 1e-5 * f[:, 2] + 0.05)[:, None]
        return synthetic_stage_times(f)[:, :1]

    predictor = sync.init_predictor(jax.random.key(0), num_features=3)
    predictor, _ = sync.fit(predictor, jnp.asarray(grid), jnp.asarray(cost(grid)), steps=800)
    linear = sync.fit_linear(grid, cost(grid))
    scores = sync.held_out_scores(predictor, linear, held_out, cost(held_out))
    if law == "linear":
        assert scores["linear_mape"] < 1e-9 < scores["predictor_mape"]
        assert scores["decided_by"] == "linear"
    else:
        assert scores["predictor_mape"] < 0.1 and scores["linear_mape"] > 0.3, scores
        assert scores["decided_by"] == "predictor"


def test_imbalance():
    assert sync.imbalance([1.0, 1.0, 1.0]) == 0.0
    assert sync.imbalance([1.0, 0.9]) == pytest.approx(0.1)


def test_rebalance_evens_out_a_skewed_load_and_stays_a_partition(paper_cfg):
    load = np.array([8, 7, 6, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], np.float64)
    mapping = dict(paper_cfg.ma_separation.moe.expert_mapping)
    order = np.array([[e for experts in mapping.values() for e in experts]])
    before = sync.imbalance(sync.device_load_rows(load[None], order, 4)[0])
    new = sync.rebalance_experts(load, list(mapping), 4)
    new_order = np.array([[e for experts in new.values() for e in experts]])
    after = sync.imbalance(sync.device_load_rows(load[None], new_order, 4)[0])
    assert before > 0.8
    assert after == pytest.approx(3 / 11)  # the optimum: {8,1,1,1} 11 vs {5,1,1,1} 8
    overrides = [f"ma_separation.moe.expert_mapping.{d}={list(e)}" for d, e in new.items()]
    cfg = with_overrides(paper_cfg, overrides)  # the config's partition rules accept it
    assert dict(cfg.ma_separation.moe.expert_mapping) == new


def test_pingpong_layer_time():
    """a/m + e/m for the first micro-batch, then the slower stage's share for each further one."""
    assert sync.pingpong_layer_time(1.0, 1.0, 1) == 2.0
    assert sync.pingpong_layer_time(1.0, 1.0, 4) == pytest.approx(1.25)
    assert sync.pingpong_layer_time(3.0, 1.0, 2) == pytest.approx(1.5 + 0.5 + 1.5)


def test_rows_of_weight_zero_change_no_fit():
    """Padding the samples with rows of weight 0 (to compile the fit once) fits the same model."""
    rng = np.random.default_rng(3)
    features = rng.uniform(1, 100, (24, 3)).astype(np.float32)
    times = (1e-3 * features[:, :1] + 0.01).astype(np.float32)
    start = sync.init_predictor(jax.random.key(0), 3)
    plain, _ = sync.fit(start, jnp.asarray(features), jnp.asarray(times), steps=200)
    padded_features = np.concatenate([features, rng.uniform(1, 100, (8, 3)).astype(np.float32)])
    padded_times = np.concatenate([times, np.full((8, 1), 5.0, np.float32)])
    weights = np.concatenate([np.ones(24), np.zeros(8)]).astype(np.float32)
    padded, _ = sync.fit(
        start, jnp.asarray(padded_features), jnp.asarray(padded_times), 200, weights=weights
    )
    probe = jnp.asarray(features)
    np.testing.assert_allclose(sync.predict(padded, probe), sync.predict(plain, probe), rtol=1e-4)


def test_features_far_outside_the_fit_give_bounded_times():
    """A feature constant in the fit, or one 100x beyond its range, is clipped to 3 standard
    deviations: the prediction stays within a few times the fitted times, as a linear model's
    extrapolation would, instead of the exponential of an extrapolated network output."""
    rng = np.random.default_rng(5)
    tokens = rng.uniform(50, 70, (32, 1))
    features = np.concatenate([tokens, np.full((32, 1), 8.0)], axis=1).astype(np.float32)
    times = (1e-4 * tokens + 0.01).astype(np.float32)
    predictor, _ = sync.fit(
        sync.init_predictor(jax.random.key(1), 2), jnp.asarray(features), jnp.asarray(times)
    )
    far = jnp.asarray([[6000.0, 8.0], [60.0, 800.0], [0.5, 0.0]], jnp.float32)
    predicted = np.asarray(sync.predict(predictor, far))
    assert np.all(predicted > times.min() / 10) and np.all(predicted < times.max() * 10), predicted


def test_plan_placement_evens_the_layers_out_of_balance_and_moves_little():
    """Layer 0 is balanced and keeps its order; in layer 1 the first device holds the four
    hot experts: each device gets one, and a device whose experts stay keeps its rows."""
    from maxjax.sync.balancer import device_load_rows, imbalance, plan_placement

    order = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    loads = np.full((2, 16), 1 / 16)
    loads[1] = [0.1] * 4 + [0.05] * 12
    new, before, after = plan_placement(loads, order, devices=4, threshold=0.05)
    np.testing.assert_array_equal(new[0], order[0])
    assert before[0] == after[0] == pytest.approx(0.0)
    assert before[1] == pytest.approx(0.5) and after[1] == pytest.approx(0.0, abs=1e-12)
    rows = device_load_rows(loads, new, 4)
    assert imbalance(rows[1]) == pytest.approx(after[1])
    hot_device = new[1].reshape(4, 4)
    assert [len(set(group) & {0, 1, 2, 3}) for group in hot_device] == [1, 1, 1, 1]
    assert sorted(new[1]) == list(range(16))
    # Of the moves that even the devices, one keeping an expert on the first device is chosen.
    assert set(hot_device[0]) & set(range(4))
    # Below the threshold nothing changes.
    same, _, unchanged = plan_placement(loads, order, devices=4, threshold=0.9)
    np.testing.assert_array_equal(same, order)
    np.testing.assert_array_equal(unchanged, before)


def test_plan_placement_judged_by_a_time_model_moves_only_what_the_times_say():
    """With a device-time model the threshold applies to predicted times. Loads as in the test
    above: layer 1's device loads 0.4, 0.2, 0.2, 0.2 (load imbalance 0.5). A model whose time
    does not depend on the load (every slot computed) sees no imbalance and moves nothing; one
    whose time is 1 + load sees (1.4 - 1.2) / 1.4 = 0.14 > 0.05, and the balanced placement
    takes it to 0; with 1 + load / 10, 0.02 / 1.04 < 0.05 and nothing moves."""
    from maxjax.sync.balancer import plan_placement

    order = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    loads = np.full((2, 16), 1 / 16)
    loads[1] = [0.1] * 4 + [0.05] * 12

    def flat(rows):
        return np.ones_like(rows)

    same, before, after = plan_placement(loads, order, 4, 0.05, device_time=flat)
    np.testing.assert_array_equal(same, order)
    np.testing.assert_array_equal(before, [0.0, 0.0])
    new, before, after = plan_placement(loads, order, 4, 0.05, device_time=lambda r: 1 + r)
    assert before[1] == pytest.approx(0.2 / 1.4) and after[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(new[0], order[0])
    assert not np.array_equal(new[1], order[1])
    weak = plan_placement(loads, order, 4, 0.05, device_time=lambda r: 1 + r / 10)
    np.testing.assert_array_equal(weak[0], order)
    assert weak[1][1] == pytest.approx(0.02 / 1.04)


def test_plan_placement_fills_the_surviving_devices_slots_after_an_expert_device_failed():
    """16 experts on 3 devices with 6 slots each (device 13 of 4 failed; -1: an empty slot).
    The hot experts all sit on the first device: the plan spreads them, holds every expert
    once and at most 6 per device, and an empty slot carries no load."""
    from maxjax.sync.balancer import device_load_rows, imbalance, plan_placement

    order = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, 11, 12, 13, 14, 15, -1]], np.int32)
    loads = np.full((1, 16), 0.04)
    loads[0, :4] = [0.2, 0.15, 0.1, 0.07]
    rows = device_load_rows(loads, order, 3)
    np.testing.assert_allclose(rows[0], [loads[0, :6].sum(), loads[0, 6:11].sum(), 0.2])
    new, before, after = plan_placement(loads, order, devices=3, threshold=0.05)
    groups = new[0].reshape(3, 6)
    assert sorted(e for e in new[0] if e >= 0) == list(range(16))
    assert np.sum(new[0] < 0) == 2
    assert [len({0, 1, 2} & set(g)) for g in groups] == [1, 1, 1]
    # The best any placement within 6 slots does: 0.2 + 3 x 0.04, 0.15 + 5 x 0.04, 0.17 + 4 x 0.04.
    assert after[0] == pytest.approx((0.35 - 0.32) / 0.35) and before[0] > 0.6
    assert imbalance(device_load_rows(loads, new, 3)[0]) == pytest.approx(after[0])


def test_rebalance_experts_swaps_what_the_greedy_pass_leaves_uneven():
    """Loads 9, 5, 4, 4, 2, 2 on 2 devices of 3 slots: the greedy pass gives {9, 4, 2} and
    {5, 4, 2} (15 against 11); swapping a 4 for a 2 gives 13 and 13."""
    from maxjax.sync.balancer import imbalance, rebalance_experts

    load = np.array([9.0, 5.0, 4.0, 4.0, 2.0, 2.0])
    placed = rebalance_experts(load, ["a", "b"], 3)
    totals = [load[list(experts)].sum() for experts in placed.values()]
    assert all(len(experts) == 3 for experts in placed.values())
    assert imbalance(totals) == 0.0, placed
