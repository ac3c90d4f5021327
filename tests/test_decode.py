"""KV-cache decoding of the reference model equals re-running the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
from _reference import full_forward_greedy

from maxjax import model
from maxjax.model import decode


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
