"""The reference model: MoE layer against a per-expert loop, gradients, causality, paper shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import BFLOAT16_STEP, bfloat16_flop_fraction
from flax import nnx

from maxjax import model, routing
from maxjax.config import with_overrides
from maxjax.model import ops
from maxjax.parallel.runner import tree_paths


def loop_moe(x, router_kernel, wi, wo, top_k, capacity_factor):
    """Per-sequence, per-token, per-expert Python loop with the seed's capacity rule."""
    x = np.asarray(x, np.float64)
    batch, seq, _ = x.shape
    num_experts = wi.shape[0]
    capacity = routing.expert_capacity(seq, num_experts, top_k, capacity_factor)
    out = np.zeros_like(x)
    for b in range(batch):
        logits = x[b] @ np.asarray(router_kernel, np.float64)
        fill = [0] * num_experts
        choices = []
        for t in range(seq):
            order = np.argsort(-logits[t], kind="stable")[:top_k]
            w = np.exp(logits[t, order] - logits[t, order].max())
            choices.append((order, w / w.sum()))
        for r in range(top_k):
            for t in range(seq):
                e, g = choices[t][0][r], choices[t][1][r]
                if fill[e] < capacity:
                    h = x[b, t] @ np.asarray(wi[e], np.float64)
                    h = np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
                    out[b, t] += g * (h @ np.asarray(wo[e], np.float64))
                fill[e] += 1
    return out


@pytest.mark.parametrize("top_k,factor,skew", [(2, 1.0, 0.0), (2, 1.0, 3.0), (1, 0.5, 0.0)])
def test_moe_layer_matches_per_expert_loop(tiny_cfg, top_k, factor, skew):
    cfg = with_overrides(
        tiny_cfg,
        [
            f"moe.top_k={top_k}",
            f"moe.capacity_factor={factor}",
            "model.hidden_dim=64",
            "model.head_dim=2",
            "moe.expert_hidden_dim=32",
        ],
    )
    layer = model.transformer.MoE(cfg, rngs=nnx.Rngs(0))
    if skew:
        bias = skew * jnp.linspace(-1, 1, cfg.moe.experts_per_layer)
        layer.router.kernel[...] = layer.router.kernel[...] + bias[None, :] * 0.1
    x = jax.random.normal(jax.random.key(1), (3, 24, cfg.model.hidden_dim))
    if skew:
        x = x + 1.0
    y, aux = layer(x)
    ref = loop_moe(
        x, layer.router.kernel[...], layer.experts.wi[...], layer.experts.wo[...], top_k, factor
    )
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
    assert float(aux.load_balancing_loss) >= 1.0 - 1e-6
    if skew:
        assert float(aux.dropped_fraction) > 0


def test_forward_shapes_and_aux(tiny_cfg):
    params = model.init_params(tiny_cfg, 0)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50257)
    logits, aux = model.apply(tiny_cfg, params, tokens)
    assert logits.shape == (2, 16, tiny_cfg.training.vocab_size)
    assert logits.dtype == jnp.float32
    layers, experts = tiny_cfg.model.layers, tiny_cfg.moe.experts_per_layer
    assert aux.expert_fraction.shape == (layers, experts)  # one row per layer
    np.testing.assert_allclose(jnp.sum(aux.expert_fraction, axis=1), np.ones(layers), rtol=1e-5)


def test_layers_combine_into_mean_losses_and_per_layer_expert_shares():
    first = model.RoutingAux(
        jnp.float32(1.0), jnp.float32(0.5), jnp.array([0.75, 0.25]), 0.0, jnp.array([0.75, 0.25])
    )
    second = model.RoutingAux(
        jnp.float32(3.0), jnp.float32(1.5), jnp.array([0.5, 0.5]), 0.5, jnp.array([0.25, 0.25])
    )
    combined = ops.combine_layers([first, second])
    assert float(combined.load_balancing_loss) == 2.0 and float(combined.router_z_loss) == 1.0
    assert float(combined.dropped_fraction) == 0.25
    np.testing.assert_array_equal(combined.expert_fraction, [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_array_equal(combined.kept_fraction, [[0.75, 0.25], [0.25, 0.25]])


def test_module_call_equals_pure_apply(tiny_cfg):
    net = model.MoETransformer(tiny_cfg, rngs=nnx.Rngs(7))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 50257)
    logits, _ = net(tokens, deterministic=True)
    params = model.init_params(tiny_cfg, 7)
    np.testing.assert_array_equal(
        np.asarray(logits), np.asarray(model.apply(tiny_cfg, params, tokens)[0])
    )


def test_gradients_reach_every_parameter(tiny_cfg):
    params = model.init_params(tiny_cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 50257)
    grads, _ = jax.grad(lambda p: model.loss_fn(tiny_cfg, p, tokens), has_aux=True)(params)
    for path, g in tree_paths(grads):
        if path[0] == "embed":
            continue  # only rows of tokens that occur get gradient
        assert np.any(np.asarray(g) != 0), f"no gradient reaches {'.'.join(path)}"
        assert np.all(np.isfinite(np.asarray(g)))
    router = grads["layers"][0]["moe"]["router"]["kernel"]
    assert np.abs(np.asarray(router)).max() > 0


def test_dropout_only_in_training(tiny_cfg):
    params = model.init_params(tiny_cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50257)
    a, _ = model.apply(tiny_cfg, params, tokens)
    b, _ = model.apply(tiny_cfg, params, tokens)
    c, _ = model.apply(tiny_cfg, params, tokens, dropout_key=jax.random.key(3))
    d, _ = model.apply(tiny_cfg, params, tokens, dropout_key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    net = model.bind(tiny_cfg, params)
    with pytest.raises(ValueError, match="dropout_key"):
        net(tokens, deterministic=False)


def test_dropout_mask_does_not_depend_on_layout():
    key = jax.random.key(0)
    full = ops.expert_dropout_keep_mask(key, 0.1, jnp.arange(16), jnp.arange(8), 4, 6)
    part = ops.expert_dropout_keep_mask(key, 0.1, jnp.array([5, 9]), jnp.array([2, 3]), 4, 6)
    np.testing.assert_array_equal(np.asarray(full[jnp.array([5, 9])][:, 2:4]), np.asarray(part))
    assert 0.8 < float(jnp.mean(full)) < 0.97


def test_causality_when_nothing_is_dropped(tiny_cfg):
    """Attention is causal; routing is too as long as no assignment is dropped.

    With a capacity limit, every first choice of a sequence is served before any second choice,
    so a later token's first choice can take the slot an earlier token's second choice needed:
    capacity-limited routing in training is not causal. With capacity for every assignment
    (capacity_factor = E / k) it is, and that is what this checks.
    """
    cfg = with_overrides(tiny_cfg, [f"moe.capacity_factor={tiny_cfg.moe.experts_per_layer / 2}"])
    params = model.init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 50257)
    cut = 11
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 17) % 50257)
    a, aux = model.apply(cfg, params, tokens)
    b, _ = model.apply(cfg, params, changed)
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_allclose(np.asarray(a[:, :cut]), np.asarray(b[:, :cut]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(a[:, cut:]), np.asarray(b[:, cut:]))


def test_paper_model_builds_abstractly_with_seed_shapes(paper_cfg):
    net = nnx.eval_shape(lambda: model.MoETransformer(paper_cfg, rngs=nnx.Rngs(0)))
    assert len(net.layers) == 4
    params = model.abstract_params(paper_cfg)
    for layer in params["layers"].values():
        assert layer["moe"]["experts"]["wi"].shape == (16, 4096, 16384)
        assert layer["moe"]["experts"]["wo"].shape == (16, 16384, 4096)
        assert layer["moe"]["router"]["kernel"].shape == (4096, 16)
        for name in ("query", "key", "value", "out"):
            assert layer["attention"][name]["kernel"].shape == (4096, 4096)
    assert params["embed"]["embedding"].shape == (50265, 4096)
    paths = [".".join(p) for p, _ in tree_paths(params)]
    assert all("expert" in p for p in paths if p.endswith(("wi", "wo")))
    assert sum("attention." in p for p in paths) == 16
    assert sum("router" in p for p in paths) == 4
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    expected_experts = 4 * 16 * 2 * 4096 * 16384
    assert total == expected_experts + 4 * 4 * 4096**2 + 4 * 4096 * 16 + 2 * 50265 * 4096 + 9 * 4096


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_cfg):
    remat_cfg = with_overrides(tiny_cfg, ["training.gradient_checkpointing=true"])
    params = model.init_params(tiny_cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50257)

    def grads(cfg):
        fn = jax.jit(jax.grad(lambda p: model.loss_fn(cfg, p, tokens, jax.random.key(2))[0]))
        return fn(params)

    plain = grads(tiny_cfg)
    remat = grads(remat_cfg)
    for (path, a), (_, b) in zip(tree_paths(plain), tree_paths(remat), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), ".".join(path)
    forward = jax.make_jaxpr(lambda p: model.loss_fn(remat_cfg, p, tokens)[0])(params)
    assert "remat" in str(forward)


def bfloat16_rounded(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_bfloat16_matmul_rounds_operands_and_sums_in_float32():
    """Forward and both backward products take bf16-rounded operands (the cotangent too) and
    sum in float32: equal to float64 products of the rounded operands up to float32 summation
    (at most 256 terms here: a relative 256 * 2^-24 = 1.5e-5 in the worst case). The weight
    gradient comes back float32, never rounded to bf16."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (4, 16, 256))
    w = jax.random.normal(kw, (256, 64)) * 0.05
    g = jax.random.normal(kg, (4, 16, 64))
    y, vjp = jax.vjp(lambda x, w: ops.matmul("bsm,mh->bsh", x, w, jnp.bfloat16), x, w)
    d_x, d_w = vjp(g)
    assert y.dtype == d_x.dtype == d_w.dtype == jnp.float32
    xr, wr, gr = bfloat16_rounded(x), bfloat16_rounded(w), bfloat16_rounded(g)
    for got, want in (
        (y, np.einsum("bsm,mh->bsh", xr, wr)),
        (d_x, np.einsum("bsh,mh->bsm", gr, wr)),
        (d_w, np.einsum("bsm,bsh->mh", xr, gr)),
    ):
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - want) <= 1.5e-5 * np.linalg.norm(want)
    # The float32 product of unrounded operands is farther away by about a bf16 rounding.
    exact = np.einsum("bsm,mh->bsh", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert np.linalg.norm(np.asarray(y) - exact) > 1e-3 * np.linalg.norm(exact)


def test_bfloat16_training_step_multiplies_in_bfloat16(tiny_cfg):
    """Lowered for a GPU, the loss-and-gradient program of the bf16 model runs its products on
    bf16 operands, forward and backward; only the router logits and the combine (top-k gate
    weighting, k=2 terms) stay float32 by design, a small share of the flops."""
    cfg = with_overrides(tiny_cfg, ["training.dtype=bfloat16", "model.layers=2"])
    params = model.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    step = jax.jit(jax.grad(lambda p, t: model.loss_fn(cfg, p, t, jax.random.key(1))[0]))
    lowered = step.trace(params, tokens).lower(lowering_platforms=("cuda",))
    assert bfloat16_flop_fraction(lowered) >= 0.98
    grads = jax.eval_shape(step, params, tokens)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_model_is_measurably_not_float32(tiny_cfg):
    """The bf16 model's logits differ from the float32 model's by more than a bf16 step (about
    1.6 steps here, from a rounding per product), so a strategy that left out the bf16
    rounding would fail the logits bound of the bf16 parity tests of tests/test_ma.py and
    tests/test_baselines.py, one step."""
    bf16 = with_overrides(tiny_cfg, ["training.dtype=bfloat16", "model.layers=2"])
    f32 = with_overrides(bf16, ["training.dtype=float32"])
    params = model.init_params(f32, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50257)
    logits = {
        name: np.asarray(jax.jit(lambda p, c=c: model.apply(c, p, tokens)[0])(params))
        for name, c in (("bf16", bf16), ("f32", f32))
    }
    difference = np.linalg.norm(logits["bf16"] - logits["f32"]) / np.linalg.norm(logits["f32"])
    assert difference > BFLOAT16_STEP


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_query_blocked_attention_equals_plain_attention(dtype):
    """Blocks of query rows, each a full softmax over every key: the same float32 arithmetic
    row by row as the whole [B, N, S, T] at once, so outputs and gradients agree up to float32
    reordering (and, at bf16, the rare bf16 rounding it flips): 1e-5 in float32, one bf16
    step (2^-8) at bf16. Causal masking and per-row positions (a KV cache's) are kept."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    shape = (2, 64, 4, 8)
    q, k, v, g = (jax.random.normal(key, shape) for key in (kq, kk, kv, kg))
    positions = jnp.stack([jnp.arange(64), jnp.arange(64) + 5])

    def attend(block):
        def fn(q, k, v):
            args = (x.astype(dtype) for x in (q, k, v))
            out = ops.causal_attention(*args, positions, positions, block=block)
            return out.astype(jnp.float32)

        out, vjp = jax.vjp(fn, q, k, v)
        return [out, *vjp(g)]

    plain, blocked = (
        [np.asarray(x, np.float64) for x in jax.jit(lambda b=b: attend(b))()] for b in (64, 16)
    )
    tolerance = 1e-5 if dtype == jnp.float32 else BFLOAT16_STEP
    for got, want in zip(blocked, plain, strict=True):
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
    # Causal: rows before 40 (35 in the second sequence) depend on no key from there on.
    changed = v.at[:, 40:].set(0.0)
    before = ops.causal_attention(q, k, v, positions, positions, block=16)
    after = ops.causal_attention(q, k, changed, positions, positions, block=16)
    np.testing.assert_array_equal(after[:, :40], before[:, :40])
    assert not np.allclose(after[:, 40:], before[:, 40:])


def test_query_blocked_attention_never_holds_all_scores():
    """Compiled forward and backward of 512 rows in blocks of 64: no [B, N, S, T] float32
    array, and a fraction of the plain form's temporary memory."""
    shape = (2, 512, 4, 8)
    q = jax.ShapeDtypeStruct(shape, jnp.float32)
    positions = jnp.arange(512)

    def step(block):
        def loss(q, k, v):
            return jnp.sum(ops.causal_attention(q, k, v, positions, positions, block=block))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()

    plain, blocked = step(512), step(64)
    assert "f32[2,4,512,512]" in plain.as_text()
    assert "f32[2,4,512,512]" not in blocked.as_text()
    temp = {
        n: p.memory_analysis().temp_size_in_bytes for n, p in (("plain", plain), ("b", blocked))
    }
    assert temp["b"] <= temp["plain"] / 2, temp
