"""KV-cache decoding of every strategy equals the single-device reference and a full forward."""

import jax
import numpy as np
import pytest
from _reference import full_forward_greedy

from maxjax import model
from maxjax.config import with_overrides
from maxjax.model import decode
from maxjax.parallel import STRATEGIES, make_runner
from maxjax.parallel.runner import Runner

PROMPT_BATCH, PROMPT_LEN, NEW_TOKENS = 8, 5, 6
DECODING = ("single", "tp", "pp", "tp_pp", "ma")


@pytest.fixture(scope="module")
def canonical(tiny_cfg):
    return jax.device_get(model.init_params(tiny_cfg, 1))


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(1), (PROMPT_BATCH, PROMPT_LEN), 0, 50257)


@pytest.fixture(scope="module")
def expected(tiny_cfg, canonical, prompt):
    greedy = full_forward_greedy(tiny_cfg, canonical, prompt, NEW_TOKENS)
    sampled = decode.generate(tiny_cfg, canonical, prompt, NEW_TOKENS, temperature=1.0, seed=3)
    return {"greedy": greedy, "sampled": np.asarray(sampled)}


@pytest.fixture(scope="module", params=DECODING)
def decoder(request, tiny_cfg, canonical):
    name = request.param
    if name not in STRATEGIES:
        pytest.skip(f"strategy {name!r} is not registered")
    # Float32 buffers between the MA pools: exact parity is the point here (8-bit buffers are a
    # different, lossy function; tests/test_ma.py bounds their effect).
    cfg = with_overrides(tiny_cfg, ["ma_separation.synchronization.communication_compression=none"])
    runner = make_runner(cfg, name)
    if type(runner).generate is Runner.generate:
        pytest.skip(f"strategy {name!r} does not implement generate yet")
    return runner, runner.from_canonical(canonical)


def test_greedy_equals_full_forward(decoder, prompt, expected):
    runner, params = decoder
    out = np.asarray(runner.generate(params, prompt, NEW_TOKENS))
    assert out.shape == (PROMPT_BATCH, PROMPT_LEN + NEW_TOKENS)
    np.testing.assert_array_equal(out[:, :PROMPT_LEN], np.asarray(prompt))
    np.testing.assert_array_equal(out, expected["greedy"])
    if hasattr(runner, "degrees"):  # baselines pad a batch that data parallelism does not divide
        odd = runner.generate(params, prompt[:3], NEW_TOKENS)
        np.testing.assert_array_equal(np.asarray(odd), expected["greedy"][:3])


def test_sampling_is_reproducible_and_equals_reference(decoder, prompt, expected):
    runner, params = decoder
    a = np.asarray(runner.generate(params, prompt, NEW_TOKENS, temperature=1.0, seed=3))
    b = np.asarray(runner.generate(params, prompt, NEW_TOKENS, temperature=1.0, seed=3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, expected["sampled"])


def test_ma_decodes_in_its_own_layout(decoder, prompt, tiny_cfg):
    """MA keeps its layout while decoding: experts on the expert pool, caches split by heads."""
    runner, params = decoder
    if runner.name != "ma":
        pytest.skip("MA-specific layout checks")
    from maxjax.parallel.ma.layout import CACHE as CACHE_SPEC

    runner.generate(params, prompt, NEW_TOKENS)
    layers, parts = tiny_cfg.model.layers, runner.decode_parts(PROMPT_BATCH)
    # Counted per call: the prefill and NEW_TOKENS - 1 one-token steps; per micro-batch and layer an attention and
    # an expert program, and one head program.
    assert runner.programs_dispatched == NEW_TOKENS * parts * (2 * layers + 1)
    assert params["layers"][0]["moe"]["experts"]["wi"].sharding.mesh == runner.expert_mesh
    cache = runner.init_caches(1, 4)[0].key
    assert cache.sharding.spec == CACHE_SPEC
    assert cache.addressable_shards[0].data.shape == (
        1,
        4,
        runner.heads.slots_per_device,
        tiny_cfg.model.head_dim,
    )


def test_a_decoding_step_hands_its_caches_over(decoder, prompt):
    """Every strategy donates the caches to the program that updates them: after a step the
    caches it was given are gone, so a step holds one set of caches, not two."""
    runner, params = decoder
    if runner.name == "single":
        pytest.skip("the single-device reference decodes through maxjax.model.decode")
    if runner.name == "ma":
        parts = runner.decode_parts(PROMPT_BATCH)
        caches = [runner.init_caches(PROMPT_BATCH // parts, 8) for _ in range(parts)]
    else:
        caches = runner.init_caches(PROMPT_BATCH, 8)
    _, updated = runner._decode_step(params, jax.numpy.asarray(prompt), caches, 0)
    given = jax.tree.leaves(caches)
    assert given and all(leaf.is_deleted() for leaf in given)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(updated))
