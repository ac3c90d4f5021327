"""Autoregressive decoding with a KV cache, as pure functions.

Inference routes without dropping: the capacity is raised to the group size
(`inference_config`), so a token's expert output never depends on which other tokens share its
group. Only one slot in E/k is then in use, and the experts compute only those
(`ops.expert_ffn_filled_slots`), the work a server does for top-k routing. Then a prefill plus
one-token steps give exactly the logits of re-running the full forward pass at every step,
whatever the strategy.

`attention_with_cache` works for any subset of heads (a strategy's shard of them); `generate_loop`
is the sampling loop every strategy shares, given its own prefill / step functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from maxjax.config import Config, with_overrides
from maxjax.model import ops
from maxjax.model.transformer import Params, compute_dtype, group_capacity


class KVCache(NamedTuple):
    """Keys and values of n heads for positions 0..T-1: [B, T, n, D] each."""

    key: jax.Array
    value: jax.Array


def inference_config(cfg: Config) -> Config:
    """`cfg` with capacity for every assignment (capacity_factor = E / k): dropless routing."""
    factor = cfg.moe.experts_per_layer / cfg.moe.top_k
    if cfg.moe.capacity_factor is None or cfg.moe.capacity_factor >= factor:
        return cfg
    return with_overrides(cfg, [f"moe.capacity_factor={factor}"])


def decode_tile_rows(cfg: Config, tokens: int) -> int:
    """Tile height of the filled-slot expert FFN when `tokens` tokens are routed at once."""
    return ops.filled_tile_rows(tokens, cfg.moe.top_k, cfg.moe.experts_per_layer)


def init_cache(
    batch: int, max_len: int, num_heads: int, head_dim: int, dtype: jnp.dtype = jnp.float32
) -> KVCache:
    zeros = jnp.zeros((batch, max_len, num_heads, head_dim), dtype)
    return KVCache(zeros, zeros)


def attention_with_cache(
    x: jax.Array,
    w: ops.AttentionWeights,
    head_dim: int,
    cache: KVCache,
    start: jax.Array | int,
    dtype: jnp.dtype = jnp.float32,
    head_mask: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Attention of x[B, S, M] at positions start..start+S-1 over the cache and itself.

    Writes this step's keys and values into the cache at `start`. Cache slots beyond the
    current position hold later positions, so the causal mask hides them. Returns the partial
    output [B, S, M] (float32) of the heads in `w`, and the updated cache.
    """
    seq = x.shape[1]
    positions = start + jnp.arange(seq, dtype=jnp.int32)
    q, k, v = ops.project_qkv(x, w, head_dim, positions, dtype)
    index = (0, start, 0, 0)
    cache = KVCache(
        jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), index),
        jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), index),
    )
    kv_positions = jnp.arange(cache.key.shape[1], dtype=jnp.int32)
    context = ops.causal_attention(
        q, cache.key.astype(dtype), cache.value.astype(dtype), positions, kv_positions
    )
    return ops.attention_output(context, w, dtype, head_mask), cache


def attention_weights(layer: Params) -> ops.AttentionWeights:
    a = layer["attention"]
    return ops.AttentionWeights(
        a["query"]["kernel"], a["key"]["kernel"], a["value"]["kernel"], a["out"]["kernel"]
    )


def moe_forward(cfg: Config, layer: Params, x: jax.Array) -> jax.Array:
    """The MoE block of one layer on x[B, S, M] (no dropout), routed within these S tokens;
    the experts compute only the slots in use (`ops.expert_ffn_filled_slots`)."""
    capacity = group_capacity(cfg, x.shape[1])
    moe = layer["moe"]
    r = ops.route(x, moe["router"]["kernel"], cfg.moe.top_k, capacity)
    out = ops.expert_ffn_filled_slots(
        ops.dispatch(x, r, capacity),
        moe["experts"]["wi"],
        moe["experts"]["wo"],
        decode_tile_rows(cfg, x.shape[0] * x.shape[1]),
        compute_dtype(cfg),
    )
    return ops.combine(out, r)


def forward_with_cache(
    cfg: Config, params: Params, tokens: jax.Array, caches: list[KVCache], start: jax.Array | int
) -> tuple[jax.Array, list[KVCache]]:
    """Logits [B, S, V] of tokens[B, S] at positions start.. given caches of earlier positions.

    Single-device reference; `cfg` should be an `inference_config`.
    """
    dtype = compute_dtype(cfg)
    x = params["embed"]["embedding"][tokens].astype(jnp.float32)
    new_caches = []
    for i, cache in enumerate(caches):
        layer = params["layers"][i]
        attn, cache = attention_with_cache(
            ops.rms_norm(x, layer["attention_norm"]["scale"]),
            attention_weights(layer),
            cfg.model.head_dim,
            cache,
            start,
            dtype,
        )
        h = x + attn
        x = h + moe_forward(cfg, layer, ops.rms_norm(h, layer["moe_norm"]["scale"]))
        new_caches.append(cache)
    x = ops.rms_norm(x, params["final_norm"]["scale"])
    return ops.matmul("bsm,mv->bsv", x, params["lm_head"]["kernel"], dtype), new_caches


def sample_token(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """Next token [B] from logits[B, V]: argmax at temperature 0, else a softmax sample."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate_loop(
    step_fn: Callable[[jax.Array, Any, int], tuple[jax.Array, Any]],
    caches: Any,
    prompt: jax.Array,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> jax.Array:
    """Prefill with the prompt, then feed back one sampled token per step.

    `step_fn(tokens[B, S], caches, start) -> (last_logits[B, V], caches)` runs the model on S
    tokens at positions start.. (the prompt once, then single tokens). Returns
    tokens[B, P + max_new_tokens]. Sampling keys are fold_in(key(seed), step), so a seed
    reproduces the same continuation on every strategy.
    """
    key = jax.random.key(seed)
    prompt_len = prompt.shape[1]
    logits, caches = step_fn(prompt, caches, 0)
    out = [prompt]
    for step in range(max_new_tokens):
        token = sample_token(jax.device_get(logits), temperature, jax.random.fold_in(key, step))
        out.append(token[:, None])
        if step + 1 < max_new_tokens:
            logits, caches = step_fn(token[:, None], caches, prompt_len + step)
    return jnp.concatenate([jnp.asarray(t) for t in out], axis=1)


def generate(
    cfg: Config,
    params: Params,
    prompt: jax.Array,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> jax.Array:
    """Single-device generation with a KV cache (the reference for every strategy)."""
    icfg = inference_config(cfg)
    batch, prompt_len = prompt.shape
    caches = [
        init_cache(
            batch, prompt_len + max_new_tokens, cfg.model.attention_heads, cfg.model.head_dim
        )
        for _ in range(cfg.model.layers)
    ]

    @jax.jit
    def step(params, tokens, caches, start):
        logits, caches = forward_with_cache(icfg, params, tokens, caches, start)
        return logits[:, -1], caches

    return generate_loop(
        lambda t, c, s: step(params, t, c, jnp.int32(s)),
        caches,
        prompt,
        max_new_tokens,
        temperature,
        seed,
    )
