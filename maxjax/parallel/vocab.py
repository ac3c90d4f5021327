"""Vocabulary-parallel embedding lookup and cross-entropy, shared by every sharded strategy.

The embedding table [V, M] is split by rows and the LM head [M, V] by columns over some mesh axes
(the vocabulary padded to a multiple of their size). These functions run per device inside
`jax.shard_map`: a lookup returns this device's partial rows (the caller reduces them with the
collective it needs: a psum, or a reduce-scatter onto token shards), and the cross-entropy combines
the per-shard maximum, sum of exponentials and target logit with collectives over the same axes,
so the full logits are never gathered on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Axes = str | tuple[str, ...]


def shard_index(axes: Axes) -> jax.Array:
    """Index of this device's vocabulary shard (row-major over `axes`)."""
    return lax.axis_index(axes)


def embed_partial(table: jax.Array, tokens: jax.Array, axes: Axes) -> jax.Array:
    """This device's contribution [..., M] (float32) to the embeddings of `tokens`.

    `table` holds rows shard_index*R .. shard_index*R + R - 1; tokens outside them contribute
    zeros, so the sum over `axes` is the lookup."""
    rows = table.shape[0]
    local = tokens - shard_index(axes) * rows
    inside = (local >= 0) & (local < rows)
    found = table[jnp.clip(local, 0, rows - 1)].astype(jnp.float32)
    return jnp.where(inside[..., None], found, 0.0)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, vocab: int, axes: Axes) -> jax.Array:
    """Sum over tokens of the cross-entropy; `logits` [..., V/shards] are this device's columns.

    Columns at or past `vocab` (padding) are masked. The maximum is taken without gradient (it
    cancels); one psum carries both the sum of exponentials and the picked target logit."""
    width = logits.shape[-1]
    first = shard_index(axes) * width
    column = first + jnp.arange(width)
    logits = jnp.where(column < vocab, logits, jnp.finfo(jnp.float32).min)
    peak = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=-1)), axes)
    local = targets - first
    inside = (local >= 0) & (local < width)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
    sum_exp, picked = lax.psum(
        (jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1), jnp.where(inside, picked, 0.0)),
        axes,
    )
    return jnp.sum(peak + jnp.log(sum_exp) - picked)


def padded_size(vocab: int, shards: int) -> int:
    """The vocabulary rounded up to a multiple of `shards`."""
    return -(-vocab // shards) * shards
