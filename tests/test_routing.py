"""Routing invariants and dispatch/combine against straightforward references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax import routing


def reference_assign(expert_index: np.ndarray, num_experts: int, capacity: int):
    """Python loop: ranks in order, tokens in order, each takes the next free slot."""
    num_tokens, top_k = expert_index.shape
    fill = [0] * num_experts
    position = np.zeros_like(expert_index)
    for rank in range(top_k):
        for t in range(num_tokens):
            e = expert_index[t, rank]
            position[t, rank] = fill[e]
            fill[e] += 1
    return position, position < capacity


def random_logits(seed, tokens, experts, skew=0.0):
    logits = jax.random.normal(jax.random.key(seed), (tokens, experts))
    if skew:
        logits = logits + skew * jnp.arange(experts)[None, :] / experts
    return logits


@pytest.mark.parametrize(
    "tokens,experts,k,factor,expected",
    [(2048, 16, 2, 1.0, 256), (63, 16, 2, 1.0, 8), (31, 16, 2, 1.0, 4), (10, 4, 1, 1.5, 4)],
)
def test_expert_capacity(tokens, experts, k, factor, expected):
    assert routing.expert_capacity(tokens, experts, k, factor) == expected
    assert expected == math.ceil(tokens * k * factor / experts)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_gating_matches_renormalised_softmax(k):
    logits = random_logits(0, 64, 16)
    index, gates = routing.top_k_gating(logits, k)
    assert index.shape == (64, k) and index.dtype == jnp.int32
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for t in range(64):
        order = np.argsort(-np.asarray(logits[t]), kind="stable")[:k]
        np.testing.assert_array_equal(np.asarray(index[t]), order)
        expected = probs[t, order] / probs[t, order].sum()
        np.testing.assert_allclose(np.asarray(gates[t]), expected, rtol=1e-5)
    assert np.all(np.diff(np.asarray(gates), axis=1) <= 0), "gates must be in descending order"
    np.testing.assert_allclose(np.asarray(gates.sum(-1)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("skew", [0.0, 50.0])
@pytest.mark.parametrize("capacity", [1, 4, 8, 100])
def test_assign_capacity_matches_loop(skew, capacity):
    index, _ = routing.top_k_gating(random_logits(1, 63, 16, skew), 2)
    position, keep = routing.assign_capacity(index, 16, capacity)
    ref_pos, ref_keep = reference_assign(np.asarray(index), 16, capacity)
    np.testing.assert_array_equal(np.asarray(position), ref_pos)
    np.testing.assert_array_equal(np.asarray(keep), ref_keep)
    kept = np.asarray(keep)
    counts = np.bincount(np.asarray(index)[kept], minlength=16)
    assert counts.max() <= capacity


def test_first_choices_fill_before_second_choices():
    # Every token picks expert 0 first and expert 1 second; expert 1 also gets first choices.
    index = jnp.array([[0, 1], [1, 0], [0, 1], [1, 0]], jnp.int32)
    position, keep = routing.assign_capacity(index, 2, capacity=2)
    np.testing.assert_array_equal(np.asarray(position), [[0, 2], [0, 2], [1, 3], [1, 3]])
    np.testing.assert_array_equal(np.asarray(keep), [[1, 0], [1, 0], [1, 0], [1, 0]])


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_skewed():
    experts = 16
    index = jnp.arange(64, dtype=jnp.int32).reshape(32, 2) % experts
    uniform = jnp.full((32, experts), 1.0 / experts)
    np.testing.assert_allclose(routing.load_balancing_loss(uniform, index, experts), 1.0, rtol=1e-6)
    skewed_index = jnp.zeros((32, 2), jnp.int32)
    skewed_probs = jax.nn.one_hot(jnp.zeros(32, jnp.int32), experts)
    assert routing.load_balancing_loss(skewed_probs, skewed_index, experts) == pytest.approx(16.0)


def test_router_z_loss_reference():
    logits = random_logits(2, 20, 16)
    expected = np.mean(np.square(np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1))))
    np.testing.assert_allclose(routing.router_z_loss(logits), expected, rtol=1e-5)


def test_load_statistics():
    index = jnp.array([[0, 1], [0, 2], [0, 3]], jnp.int32)
    position, keep = routing.assign_capacity(index, 4, capacity=2)
    stats = routing.load_statistics(index, keep, 4)
    np.testing.assert_allclose(stats.expert_fraction, [0.5, 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose(stats.dropped_fraction, 1 / 6, rtol=1e-6)
    # Expert 0 has three assignments and two slots: one of its assignments is dropped.
    np.testing.assert_allclose(stats.kept_fraction, [1 / 3, 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)


@pytest.mark.parametrize("skew", [0.0, 50.0])
def test_kept_fraction_counts_the_assignments_within_capacity(skew):
    """Per expert, the kept assignments over T*k, against a loop over the assignments."""
    index, _ = routing.top_k_gating(random_logits(5, 40, 8, skew), 2)
    _, keep = routing.assign_capacity(index, 8, capacity=6)
    stats = routing.load_statistics(index, keep, 8)
    kept = np.zeros(8)
    for e, k in zip(np.asarray(index).ravel(), np.asarray(keep).ravel(), strict=True):
        kept[e] += k
    np.testing.assert_allclose(stats.kept_fraction, kept / index.size, rtol=1e-6)
    np.testing.assert_allclose(np.sum(stats.kept_fraction), 1 - stats.dropped_fraction, rtol=1e-6)


@pytest.mark.parametrize("skew", [0.0, 50.0])
def test_dispatch_and_combine_match_loops(skew):
    tokens, experts, k, capacity, width = 40, 8, 2, 6, 5
    x = jax.random.normal(jax.random.key(3), (tokens, width))
    index, gates = routing.top_k_gating(random_logits(4, tokens, experts, skew), k)
    position, keep = routing.assign_capacity(index, experts, capacity)
    buffer = np.asarray(routing.dispatch(x, index, position, keep, experts, capacity))
    expected = np.zeros((experts, capacity, width), np.float32)
    for t in range(tokens):
        for r in range(k):
            if keep[t, r]:
                expected[index[t, r], position[t, r]] = x[t]
    np.testing.assert_array_equal(buffer, expected)

    expert_out = jax.random.normal(jax.random.key(5), (experts, capacity, width))
    combined = np.asarray(routing.combine(expert_out, index, position, keep, gates))
    ref = np.zeros((tokens, width), np.float32)
    for t in range(tokens):
        for r in range(k):
            if keep[t, r]:
                ref[t] += float(gates[t, r]) * np.asarray(expert_out[index[t, r], position[t, r]])
    np.testing.assert_allclose(combined, ref, rtol=1e-5, atol=1e-6)
    if skew:
        dropped_all = ~np.asarray(keep).any(axis=1)
        assert dropped_all.any(), "the skewed case should drop some tokens entirely"
        np.testing.assert_array_equal(combined[dropped_all], 0.0)


def test_dispatch_is_a_gather_not_a_dense_one_hot():
    tokens, experts, capacity, width = 2048, 16, 256, 8
    x = jnp.zeros((tokens, width))
    index = jnp.zeros((tokens, 2), jnp.int32)
    position, keep = routing.assign_capacity(index, experts, capacity)
    jaxpr = jax.make_jaxpr(lambda x: routing.dispatch(x, index, position, keep, experts, capacity))(
        x
    )
    dense = tokens * experts * capacity
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            assert np.prod(var.aval.shape) < dense, f"{eqn.primitive} builds a T x E x C array"
