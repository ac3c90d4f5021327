"""Top-k routing, expert capacity and token dispatch as pure functions.

Every function here works on one routing group (one sequence) of T tokens; `jax.vmap` lifts
it to a batch of groups. Because the group is a sequence, every execution strategy drops exactly
the same assignments whatever the device layout.

Letters: T tokens of a group, E experts, k choices per token, C capacity, M model width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> int:
    """Slots per expert and group: ceil(num_tokens * top_k * capacity_factor / num_experts);
    `None` (dropless): num_tokens, room for every token (a token picks an expert once)."""
    if capacity_factor is None:
        return num_tokens
    # Round first so that float error in the product cannot add a slot (2048*2*1.0/16 = 256).
    return max(1, math.ceil(round(num_tokens * top_k * capacity_factor / num_experts, 9)))


def top_k_gating(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest logits per token and their softmax weights, in descending order.

    Returns (expert_index[T, k] int32, gates[T, k] float32). The gates equal the softmax over
    all experts renormalised over the chosen k.
    """
    top_logits, expert_index = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    gates = jax.nn.softmax(top_logits, axis=-1)
    return expert_index.astype(jnp.int32), gates


def assign_capacity(
    expert_index: jax.Array, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """Slot of every assignment in its expert's buffer, and whether it fits.

    Every token's first choice takes a slot before any second choice; within a rank, earlier
    tokens first. Returns (position[T, k] int32, keep[T, k] bool) with keep = position < capacity.
    """
    num_tokens, top_k = expert_index.shape
    rank_major = expert_index.T.reshape(-1)  # [k*T]: all first choices, then all second, ...
    one_hot = jax.nn.one_hot(rank_major, num_experts, dtype=jnp.int32)  # [k*T, E]
    earlier = jnp.cumsum(one_hot, axis=0) - one_hot
    position = jnp.take_along_axis(earlier, rank_major[:, None], axis=1)[:, 0]
    position = position.reshape(top_k, num_tokens).T.astype(jnp.int32)
    return position, position < capacity


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array, num_experts: int) -> jax.Array:
    """E * sum_i f_i * P_i; f_i over the T*k assignments before dropping. 1.0 when balanced."""
    counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=(0, 1))
    fraction = counts / expert_index.size
    mean_prob = jnp.mean(probs.astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Mean over tokens of logsumexp(logits)^2: keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


class LoadStats(NamedTuple):
    """Per-expert load of one group: fraction of the T*k assignments routed to each expert, and
    of those kept within its capacity (the slots its FFN computes); the dropped fraction."""

    expert_fraction: jax.Array  # [E], sums to 1
    dropped_fraction: jax.Array  # scalar, assignments past capacity / T*k
    kept_fraction: jax.Array  # [E], sums to 1 - dropped_fraction


def load_statistics(expert_index: jax.Array, keep: jax.Array, num_experts: int) -> LoadStats:
    assigned = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [T, k, E]
    kept = assigned * keep[..., None].astype(jnp.float32)
    return LoadStats(
        expert_fraction=jnp.sum(assigned, axis=(0, 1)) / expert_index.size,
        dropped_fraction=1.0 - jnp.mean(keep.astype(jnp.float32)),
        kept_fraction=jnp.sum(kept, axis=(0, 1)) / expert_index.size,
    )


def _flat_slots(
    expert_index: jax.Array, position: jax.Array, keep: jax.Array, num_experts: int, capacity: int
) -> jax.Array:
    slots = expert_index * capacity + position
    return jnp.where(keep, slots, num_experts * capacity)


def dispatch(
    x: jax.Array,
    expert_index: jax.Array,
    position: jax.Array,
    keep: jax.Array,
    num_experts: int,
    capacity: int,
) -> jax.Array:
    """Gather tokens x[T, M] into per-expert buffers [E, C, M]; empty slots are zero.

    Built as an index gather (slot -> token), never as a dense [T, E, C] one-hot product.
    """
    num_tokens, model_dim = x.shape
    top_k = expert_index.shape[1]
    slots = _flat_slots(expert_index, position, keep, num_experts, capacity).reshape(-1)
    token_of_assignment = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
    token_of_slot = jnp.full((num_experts * capacity,), num_tokens, jnp.int32)
    token_of_slot = token_of_slot.at[slots].set(token_of_assignment, mode="drop")
    x_with_empty = jnp.concatenate([x, jnp.zeros((1, model_dim), x.dtype)], axis=0)
    return x_with_empty[token_of_slot].reshape(num_experts, capacity, model_dim)


def _choices(
    expert_out: jax.Array,
    expert_index: jax.Array,
    position: jax.Array,
    keep: jax.Array,
    gates: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The expert output row of each of a token's choices [T, k, M] (any row where dropped) and
    its weight [T, k] (its gate; zero where dropped)."""
    num_experts, capacity, model_dim = expert_out.shape
    slots = jnp.where(keep, expert_index * capacity + position, 0)
    picked = expert_out.reshape(num_experts * capacity, model_dim)[slots]
    return picked, jnp.where(keep, gates, 0.0).astype(expert_out.dtype)


def combine_terms(
    expert_out: jax.Array,
    expert_index: jax.Array,
    position: jax.Array,
    keep: jax.Array,
    gates: jax.Array,
) -> jax.Array:
    """Each token's gate-weighted expert outputs, one per choice: [T, k, M] (zero where dropped).
    `combine` is their sum over k."""
    picked, weights = _choices(expert_out, expert_index, position, keep, gates)
    return picked * weights[..., None]


def combine(
    expert_out: jax.Array,
    expert_index: jax.Array,
    position: jax.Array,
    keep: jax.Array,
    gates: jax.Array,
) -> jax.Array:
    """Weighted sum over each token's kept assignments of expert_out[E, C, M] -> [T, M]
    (`combine_terms` summed over k, as one product).

    A token whose assignments were all dropped gets zero (it passes through the residual).
    """
    picked, weights = _choices(expert_out, expert_index, position, keep, gates)
    return jnp.einsum("tkm,tk->tm", picked, weights)
