"""The TP, PP and TP+PP baselines compute the single-device model: init, logits, loss, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import BFLOAT16_STEP, bfloat16_flop_fraction

from maxjax.config import with_overrides
from maxjax.parallel import STRATEGIES, make_runner
from maxjax.parallel.baselines import BASELINES, degrees_of
from maxjax.parallel.runner import tree_paths

BATCH, SEQ = 16, 16


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return with_overrides(tiny_cfg, ["baselines.microbatches=2"])


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, 50257)


@pytest.fixture(scope="module")
def reference(cfg, tokens):
    """Single-device params, logits, metrics and gradients (with dropout)."""
    single = make_runner(cfg, "single")
    params = single.init(0)
    logits = np.asarray(single.forward(params, tokens[:, :SEQ]))
    metrics, grads = single.value_and_grad(params, tokens, jax.random.key(7))
    return {
        "params": single.gather(params),
        "logits": logits,
        "metrics": jax.tree.map(np.asarray, metrics),
        "grads": single.gather(grads),
    }


@pytest.fixture(scope="module", params=BASELINES)
def baseline(request, cfg):
    runner = make_runner(cfg, request.param)
    return runner, runner.init(0)


def relative_error(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-30)


def test_strategies_registered():
    assert set(BASELINES) <= set(STRATEGIES)


def test_degrees_fill_the_mesh(cfg):
    assert [tuple(vars(degrees_of(cfg, s)).values()) for s in BASELINES] == [
        (2, 1, 8),
        (8, 2, 1),
        (1, 2, 8),
    ]
    with pytest.raises(ValueError):
        degrees_of(with_overrides(cfg, ["baselines.tensor_parallel=3"]), "tp")


def test_init_equals_reference_and_round_trips(baseline, reference):
    runner, params = baseline
    gathered = runner.gather(params)
    assert jax.tree.structure(gathered) == jax.tree.structure(reference["params"])
    for (path, a), (_, b) in zip(
        tree_paths(gathered), tree_paths(reference["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=".".join(path))
    again = runner.gather(runner.from_canonical(reference["params"]))
    jax.tree.map(np.testing.assert_array_equal, again, reference["params"])


def test_layout_splits_heads_experts_and_stages(baseline, cfg):
    runner, params = baseline
    deg = runner.degrees
    experts = params["layers"][0]["moe"]["experts"]["wi"]
    shard = experts.addressable_shards[0].data
    assert shard.shape[:2] == (1, cfg.moe.experts_per_layer // deg.tensor)
    query = params["layers"][0]["attention"]["query"]["kernel"]
    heads = query.addressable_shards[0].data.shape[-1] // cfg.model.head_dim
    assert heads == cfg.model.attention_heads // deg.tensor
    report = runner.layout_report(params)
    assert len(report.bytes_per_device) == cfg.hardware.total_gpus
    assert len(set(report.bytes_per_device.values())) == 1


def test_logits_equal_reference(baseline, reference, tokens):
    runner, params = baseline
    logits = runner.forward(params, tokens[:, :SEQ])
    assert logits.shape == reference["logits"].shape
    assert relative_error(logits, reference["logits"]) <= 1e-5


def test_loss_and_gradients_with_dropout_equal_reference(baseline, reference, tokens):
    runner, params = baseline
    metrics, grads = runner.value_and_grad(params, tokens, jax.random.key(7))
    for name, value in reference["metrics"].items():
        assert relative_error(metrics[name], value) <= 1e-5, name
    gathered = runner.gather(grads)
    assert jax.tree.structure(gathered) == jax.tree.structure(reference["grads"])
    for (path, a), (_, b) in zip(tree_paths(gathered), tree_paths(reference["grads"]), strict=True):
        assert relative_error(a, b) <= 1e-4, ".".join(path)


def test_batch_must_divide(baseline, tokens):
    runner, params = baseline
    with pytest.raises(ValueError, match="multiple"):
        runner.forward(params, tokens[:3, :SEQ])


def test_gradient_checkpointing_saves_memory_and_changes_no_gradient(cfg, reference, tokens):
    """Every decoder layer a `jax.checkpoint`: the compiled step needs clearly less temporary
    memory, and loss and gradients stay the single-device model's (float32 bounds above).

    Memory is compared at 256 tokens per sequence, where the layers' activations (attention
    scores grow with its square) outweigh the parameter-sized buffers (gradients, embedding and
    LM head shards); measured on XLA:CPU: 418 MB instead of 534 MB per device (0.78)."""
    remat_cfg = with_overrides(cfg, ["training.gradient_checkpointing=true"])
    long_tokens = jnp.zeros((BATCH, 257), jnp.int32)
    temp = {}
    for name, c in (("plain", cfg), ("remat", remat_cfg)):
        runner = make_runner(c, "tp_pp")
        params = runner.init(0)
        program = runner.train_program(params, long_tokens)
        temp[name] = program.memory_analysis().temp_size_in_bytes
    assert temp["remat"] <= 0.85 * temp["plain"], temp
    metrics, grads = runner.value_and_grad(params, tokens, jax.random.key(7))
    for name, value in reference["metrics"].items():
        assert relative_error(metrics[name], value) <= 1e-5, name
    for (path, a), (_, b) in zip(
        tree_paths(runner.gather(grads)), tree_paths(reference["grads"]), strict=True
    ):
        assert relative_error(a, b) <= 1e-4, ".".join(path)


# bfloat16 parity. Every strategy rounds the same float32 values to bf16 at the same places
# (`ops.matmul`, `ops.round_to`, explicit so XLA cannot skip a rounding in one program only).
# They differ only where a float32 sum runs in another order or split (heads over the tensor
# devices, vocabulary shards, micro-batches, gradient sums over devices): about 1e-7 relative,
# which moves a value across a bf16 rounding boundary with a chance of about 1e-7 / 2^-8 = 3e-5,
# by one bf16 step (2^-8 = 3.9e-3 relative), and may flip a near-tied top-k or capacity choice.
# So logits and metrics stay within one step (a metric is a mean over tokens; one flipped
# choice of the B*S*k = 512 moves an expert fraction by 2e-3); a gradient leaf, a float32 sum
# over all tokens of products with bf16 cotangents in which the flips add up and small leaves
# (norm scales) cancel, within four steps. Measured on a 2-core AMD EPYC: logits 6e-4, metrics
# 1e-5, gradient leaves 4e-3. The float32 model is 20 steps away (tests/test_model.py).
BF16_OVERRIDES = ["training.dtype=bfloat16", "model.layers=2"]


@pytest.fixture(scope="module")
def bf16_reference(cfg, tokens):
    single = make_runner(with_overrides(cfg, BF16_OVERRIDES), "single")
    params = single.init(0)
    metrics, grads = single.value_and_grad(params, tokens, jax.random.key(7))
    return {
        "logits": np.asarray(single.forward(params, tokens[:, :SEQ])),
        "metrics": jax.tree.map(np.asarray, metrics),
        "grads": single.gather(grads),
    }


@pytest.mark.parametrize("strategy", BASELINES)
def test_bfloat16_equals_single_at_bfloat16(strategy, cfg, bf16_reference, tokens):
    runner = make_runner(with_overrides(cfg, BF16_OVERRIDES), strategy)
    params = runner.init(0)
    logits = runner.forward(params, tokens[:, :SEQ])
    assert relative_error(logits, bf16_reference["logits"]) <= BFLOAT16_STEP
    metrics, grads = runner.value_and_grad(params, tokens, jax.random.key(7))
    for name, value in bf16_reference["metrics"].items():
        assert relative_error(metrics[name], value) <= BFLOAT16_STEP, name
    for (path, a), (_, b) in zip(
        tree_paths(runner.gather(grads)), tree_paths(bf16_reference["grads"]), strict=True
    ):
        assert a.dtype == np.float32
        assert relative_error(a, b) <= 4 * BFLOAT16_STEP, ".".join(path)
    # Lowered for a GPU, the products take bf16 operands (router and combine: float32).
    lowered = runner._value_and_grad.trace(params, jnp.asarray(tokens), None)
    assert bfloat16_flop_fraction(lowered.lower(lowering_platforms=("cuda",))) >= 0.98
