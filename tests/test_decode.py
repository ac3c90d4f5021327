"""KV-cache decoding of the reference model equals re-running the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import full_forward_greedy

from maxjax import model
from maxjax.model import decode, ops


def test_inference_config_is_dropless(tiny_cfg):
    icfg = decode.inference_config(tiny_cfg)
    assert model.group_capacity(icfg, 37) == 37
    assert icfg.model == tiny_cfg.model


def test_cached_logits_equal_full_forward(tiny_cfg):
    icfg = decode.inference_config(tiny_cfg)
    params = model.init_params(tiny_cfg, 0)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 50257)
    full, _ = model.apply(icfg, params, tokens)
    caches = [decode.init_cache(2, 16, 32, tiny_cfg.model.head_dim) for _ in range(4)]
    first, caches = decode.forward_with_cache(icfg, params, tokens[:, :7], caches, 0)
    rest = []
    for t in range(7, 12):
        logits, caches = decode.forward_with_cache(icfg, params, tokens[:, t : t + 1], caches, t)
        rest.append(logits)
    stepped = jnp.concatenate([first, *rest], axis=1)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_full_forward(tiny_cfg):
    params = model.init_params(tiny_cfg, 1)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 50257)
    out = decode.generate(tiny_cfg, params, prompt, max_new_tokens=6)
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(prompt))
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(full_forward_greedy(tiny_cfg, params, prompt, 6))
    )


def test_sampling_is_reproducible_for_a_seed(tiny_cfg):
    params = model.init_params(tiny_cfg, 1)
    prompt = jax.random.randint(jax.random.key(2), (2, 4), 0, 50257)
    a = decode.generate(tiny_cfg, params, prompt, 5, temperature=1.0, seed=3)
    b = decode.generate(tiny_cfg, params, prompt, 5, temperature=1.0, seed=3)
    c = decode.generate(tiny_cfg, params, prompt, 5, temperature=1.0, seed=4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _prefix_filled_buffer(rng, experts, groups, capacity, width):
    """A buffer [E, B, C, M] whose slots in use form a prefix per (expert, group), as
    `routing.assign_capacity` fills them: one expert empty, one group full, and a zero row
    inside a prefix (a token whose normed activation is zero)."""
    counts = rng.integers(0, capacity + 1, size=(experts, groups))
    counts[0] = 0
    counts[1, 0] = capacity
    counts[2, 1] = max(counts[2, 1], 2)
    in_use = np.arange(capacity)[None, None, :] < counts[..., None]
    buffer = rng.normal(size=(experts, groups, capacity, width)).astype(np.float32)
    buffer = buffer * in_use[..., None]
    buffer[2, 1, 0] = 0.0
    return buffer, counts


def _per_row_ffn(buffer, wi, wo):
    """Reference: every non-empty row through its expert's FFN, one row at a time."""
    out = np.zeros_like(buffer)
    for e, b, c in zip(*np.nonzero(np.any(buffer != 0, axis=-1)), strict=True):
        hidden = jax.nn.gelu(jnp.asarray(buffer[e, b, c]) @ wi[e])
        out[e, b, c] = np.asarray(hidden @ wo[e])
    return out


def test_filled_slot_ffn_equals_a_per_row_loop():
    """`expert_ffn_filled_slots` against a loop over the rows in use, for tiles smaller than,
    equal to and larger than an expert's rows. Float32 sums of the same M and H terms in another
    order: bound 1e-5 of the output's scale."""
    rng = np.random.default_rng(0)
    experts, groups, capacity, width, hidden = 4, 3, 10, 16, 24
    buffer, counts = _prefix_filled_buffer(rng, experts, groups, capacity, width)
    wi = (rng.normal(size=(experts, width, hidden)) / 4).astype(np.float32)
    wo = (rng.normal(size=(experts, hidden, width)) / 5).astype(np.float32)
    expected = _per_row_ffn(buffer, wi, wo)
    scale = np.max(np.abs(expected))
    np.testing.assert_array_equal(np.asarray(ops.filled_slot_counts(jnp.asarray(buffer))), counts)
    dense = ops.expert_ffn(jnp.asarray(buffer), wi, wo)
    for tile in (1, 3, capacity * groups, 64):
        got = jax.jit(lambda b, t=tile: ops.expert_ffn_filled_slots(b, wi, wo, t))(buffer)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_filled_slot_ffn_with_dropout_has_the_dense_ffns_value_and_gradients(dtype):
    """Training's expert stage (`expert_ffn_filled_slots` with dropout, differentiated through
    its own backward loop) against the dense `expert_ffn`: the same output and the same
    gradients for the weights and every row in use, for several tile heights (the products
    are the same; float32 sums in another order: 1e-5 of the scale)."""
    rng = np.random.default_rng(0)
    experts, groups, capacity, width, hidden = 4, 3, 5, 8, 16
    buffer, _ = _prefix_filled_buffer(rng, experts, groups, capacity, width)
    in_use = jnp.asarray(np.any(buffer != 0, axis=-1, keepdims=True))
    wi = (rng.normal(size=(experts, width, hidden)) / 4).astype(np.float32)
    wo = (rng.normal(size=(experts, hidden, width)) / 5).astype(np.float32)
    weights = jnp.asarray(rng.normal(size=buffer.shape).astype(np.float32)) * in_use
    key, ids, seqs = jax.random.key(3), jnp.array([7, 2, 9, 0]), jnp.array([4, 5, 6])

    def loss(ffn):
        return lambda b, a, c: jnp.sum(ffn(b, a, c) * weights)

    dense = loss(lambda b, a, c: ops.expert_ffn(b, a, c, dtype, key, 0.3, ids, seqs))
    want, want_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(buffer, wi, wo)
    for tile in (1, 3, 64):
        filled = loss(
            lambda b, a, c, t=tile: ops.expert_ffn_filled_slots(
                b, a, c, t, dtype, key, 0.3, ids, seqs
            )
        )
        got, grads = jax.jit(jax.value_and_grad(filled, argnums=(0, 1, 2)))(buffer, wi, wo)
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
        for g, w in zip(grads, want_grads, strict=True):
            if g.shape == buffer.shape:  # rows not in use: dispatch never reads them back
                g, w = g * in_use, w * in_use
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()))


def test_filled_slot_ffn_computes_only_the_tiles_in_use(monkeypatch):
    """The FFN runs once per tile that holds rows (two products each), not once per tile of
    the whole buffer: the work follows the slots in use."""
    rng = np.random.default_rng(1)
    experts, groups, capacity, width, hidden, tile = 4, 3, 10, 8, 8, 4
    buffer, counts = _prefix_filled_buffer(rng, experts, groups, capacity, width)
    wi = rng.normal(size=(experts, width, hidden)).astype(np.float32)
    wo = rng.normal(size=(experts, hidden, width)).astype(np.float32)
    products = []
    plain = ops.matmul

    def counted(spec, x, w, dtype=jnp.float32):
        jax.debug.callback(lambda: products.append(spec))
        return plain(spec, x, w, dtype)

    monkeypatch.setattr(ops, "matmul", counted)
    jax.block_until_ready(jax.jit(lambda b: ops.expert_ffn_filled_slots(b, wi, wo, tile))(buffer))
    jax.effects_barrier()
    per_expert = counts.sum(axis=1)
    tiles_in_use = int(np.sum(-(-per_expert // tile)))
    assert tiles_in_use == int(ops.filled_tiles(jnp.asarray(counts), tile))
    assert tiles_in_use < experts * groups * capacity // tile
    assert len(products) == 2 * tiles_in_use


def test_dropless_filled_slot_ffn_equals_the_dense_buffer(tiny_cfg):
    """Routed as decoding routes (capacity = group size), the filled-slot FFN gives the dense
    FFN's output on every slot; one slot in E/k is in use."""
    icfg = decode.inference_config(tiny_cfg)
    params = model.init_params(tiny_cfg, 0)
    layer = params["layers"][0]
    x = jax.random.normal(jax.random.key(3), (3, 9, tiny_cfg.model.hidden_dim))
    capacity = model.group_capacity(icfg, 9)
    wi, wo = layer["moe"]["experts"]["wi"], layer["moe"]["experts"]["wo"]
    tile = decode.decode_tile_rows(icfg, 27)

    @jax.jit
    def both(x, router, wi, wo):
        r = ops.route(x, router, icfg.moe.top_k, capacity)
        buffer = ops.dispatch(x, r, capacity)
        dense = ops.expert_ffn(buffer, wi, wo)
        filled = ops.expert_ffn_filled_slots(buffer, wi, wo, tile)
        return dense, filled, jnp.sum(ops.filled_slot_counts(buffer))

    dense, filled, in_use = both(x, layer["moe"]["router"]["kernel"], wi, wo)
    scale = float(jnp.max(jnp.abs(dense)))
    np.testing.assert_allclose(np.asarray(filled), np.asarray(dense), rtol=0, atol=1e-5 * scale)
    assert int(in_use) == 27 * icfg.moe.top_k
    assert dense.shape[:3] == (icfg.moe.experts_per_layer, 3, 9)
