"""AdamW on a warmup + cosine schedule, and global-norm clipping, as pure pieces.

Clipping is kept out of the optax chain on purpose: under MA separation the parameters live on
two device pools, so the global norm is the sum of per-pool squared norms and each pool applies
the same scale before its own AdamW update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from maxjax.config import Config


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to 0 at schedule.total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.optimizer.learning_rate,
        warmup_steps=cfg.schedule.warmup_steps,
        decay_steps=cfg.schedule.total_steps,
        end_value=0.0,
    )


def takes_weight_decay(path: tuple[Any, ...]) -> bool:
    """Weight decay on every matrix (projections, experts, router, embedding, head); not on norms."""
    return str(path[-1]) != "scale"


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: takes_weight_decay(tuple(_key_name(k) for k in path)), params
    )


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW with the config's learning-rate schedule, betas and weight decay (no clipping)."""
    b1, b2 = cfg.optimizer.betas
    return optax.adamw(
        learning_rate=learning_rate_schedule(cfg),
        b1=b1,
        b2=b2,
        weight_decay=cfg.optimizer.weight_decay,
        mask=_decay_mask,
    )


def squared_norm(tree: Any) -> jax.Array:
    """Sum of squares of every leaf, in float32."""
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0))


def clip_scale(global_norm: jax.Array, max_norm: float) -> jax.Array:
    """Factor that brings gradients of norm `global_norm` down to at most `max_norm`."""
    return jnp.minimum(1.0, max_norm / jnp.maximum(global_norm, 1e-12))
