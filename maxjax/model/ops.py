"""The model's math as pure functions of arrays.

The NNX modules in `maxjax.model.transformer` are thin wrappers over these, and every parallel
strategy calls the same functions on its own shards, so there is one definition of the model.

Letters: B batch, S sequence, M model, N heads, D head dim, E experts, C capacity, H expert hidden,
k choices per token, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from maxjax import routing

ROPE_BASE = 10_000.0
NORM_EPS = 1e-6


def round_to(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x rounded to `dtype` (nothing happens if it is x's dtype).

    A narrowing rounds explicitly (`reduce_precision`) before the cast: XLA may drop a
    float32 -> bf16 -> float32 round trip (excess precision) in some programs and keep it in
    others, and strategies that compute the same function would then round differently."""
    dtype = jnp.dtype(dtype)
    if x.dtype == dtype:
        return x
    info = jnp.finfo(dtype)
    if info.bits < jnp.finfo(x.dtype).bits:
        x = jax.lax.reduce_precision(x, info.nexp, info.nmant)
    return x.astype(dtype)


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """einsum(spec, x, w) with both operands rounded to `dtype`, summed in float32; a float32
    result.

    In float32 this is the plain einsum. In a narrower dtype the backward pass rounds the
    cotangent to `dtype` as well (x keeps its own dtype, usually float32, so cotangents add up
    in float32 outside the products), so the forward product and both backward products are `dtype`
    matmuls with float32 accumulation, and w (a float32 parameter) gets a float32 gradient
    that was never rounded to `dtype`. Saved for the backward pass: x in `dtype` and w as given
    (inside one program a parameter is not copied). Every index of one operand must appear in
    the other operand or in the result (true of every product of this model).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=dtype)
    x, w = _same_variance(x, w)
    return _narrow_matmul(spec, dtype, x.dtype, x, w)


def _varying_axes(a: jax.Array) -> frozenset:
    """The manual mesh axes over which `a` varies (empty outside `jax.shard_map`)."""
    return jax.typeof(a).manual_axis_type.varying


def varying_over(a: jax.Array, axes: Iterable[str]) -> jax.Array:
    """`a` marked as varying over the manual mesh `axes` it does not vary over yet (inside
    `jax.shard_map`). Autodiff transposes the marking into a psum of the cotangent over those
    axes: mark a value once, where it is smallest, rather than at each product that uses it."""
    missing = tuple(sorted(frozenset(axes) - _varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _same_variance(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x and w marked as varying over the same manual mesh axes (inside `jax.shard_map`).

    Done outside the custom VJP, so autodiff transposes the marking (a psum over the axes the
    operand did not vary over) and the custom backward rule sees operands of one type."""
    axes = _varying_axes(x) | _varying_axes(w)
    return varying_over(x, axes), varying_over(w, axes)


def _transposed_specs(spec: str) -> tuple[str, str]:
    """The einsum specs of the two backward products of `spec` = 'x,w->out'."""
    operands, out = spec.replace(" ", "").split("->")
    x, w = operands.split(",")
    for name, own, others in (("x", x, w + out), ("w", w, x + out)):
        if not set(own) <= set(others):
            raise ValueError(f"matmul {spec!r}: every index of {name} must appear elsewhere")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


def _product_f32(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum of two operands already rounded to a narrow dtype, accumulated in float32.

    XLA's CPU backend lacks a bf16 x bf16 -> f32 dot for some layouts (UNIMPLEMENTED at run
    time), so there the operands are widened to float32 first: the same arithmetic, as the
    product of two bf16 values is exact in float32. Elsewhere the narrow product runs as such
    (tensor cores)."""
    return jax.lax.platform_dependent(
        x,
        w,
        cpu=lambda x, w: jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32)),
        default=lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _narrow_matmul(
    spec: str, dtype: jnp.dtype, x_dtype: jnp.dtype, x: jax.Array, w: jax.Array
) -> jax.Array:
    return _product_f32(spec, round_to(x, dtype), round_to(w, dtype))


def _narrow_matmul_fwd(spec, dtype, x_dtype, x, w):
    x = round_to(x, dtype)
    return _product_f32(spec, x, round_to(w, dtype)), (x, w)


def _narrow_matmul_bwd(spec, dtype, x_dtype, saved, g):
    x, w = saved
    d_x_spec, d_w_spec = _transposed_specs(spec)
    g = round_to(g, dtype)
    d_x = _product_f32(d_x_spec, g, round_to(w, dtype))
    d_w = _product_f32(d_w_spec, x, g)
    return round_to(d_x, x_dtype), d_w.astype(w.dtype)


_narrow_matmul.defvjp(_narrow_matmul_fwd, _narrow_matmul_bwd)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """RMSNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding of x[B, S, N, D] at integer positions[B, S] (or [S])."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(half, dtype=jnp.float32) / half))
    positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)
    angles = positions[..., None] * inv_freq  # [B, S, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


ATTENTION_BLOCK = 256
"""Query rows per block of `causal_attention` when the query is longer than this."""


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    block: int = ATTENTION_BLOCK,
) -> jax.Array:
    """Softmax attention of q[B, S, N, D] over k, v[B, T, N, D], keys at or before the query.

    Positions are integers per batch row ([B, S] and [B, T]) or shared ([S] and [T]); a key whose
    position is later than the query's is masked, so a KV cache marks unfilled slots with a large
    position. A query longer than `block` rows (and a multiple of it) is taken `block` rows at a
    time, each block a full softmax over all keys under `jax.checkpoint`: the float32 scores
    exist for one block [B, N, block, T] at a time, forward and backward (where a block's scores
    are computed again), instead of [B, N, S, T] at once.
    """
    batch, seq = q.shape[:2]
    q_pos = jnp.broadcast_to(q_positions, (batch, seq))
    kv_pos = jnp.broadcast_to(kv_positions, (k.shape[0], k.shape[1]))
    if seq <= block or seq % block:
        return _attention_rows(q, k, v, q_pos, kv_pos)
    blocks = seq // block

    def by_block(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x.reshape(batch, blocks, block, *x.shape[2:]), 1, 0)

    rows = jax.checkpoint(lambda qp: _attention_rows(qp[0], k, v, qp[1], kv_pos))
    out = jax.lax.map(rows, (by_block(q), by_block(q_pos)))  # [blocks, B, block, N, D]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _attention_rows(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, kv_pos: jax.Array
) -> jax.Array:
    """Causal softmax attention of q[B, S, N, D] at q_pos[B, S] over keys at kv_pos[B, T]."""
    head_dim = q.shape[-1]
    scores = matmul("bsnd,btnd->bnst", q, k, q.dtype)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    visible = kv_pos[:, None, None, :] <= q_pos[:, None, :, None]  # [B, 1, S, T]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return round_to(matmul("bnst,btnd->bsnd", weights, v, v.dtype), v.dtype)


class AttentionWeights(NamedTuple):
    """Projections of some number of heads n: query/key/value [M, n*D], out [n*D, M]."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    out: jax.Array


def project_qkv(
    x: jax.Array, w: AttentionWeights, head_dim: int, positions: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotary-embedded q, k and v [B, S, n, D] (in `dtype`) of x[B, S, M] for the heads in `w`."""
    batch, seq, _ = x.shape

    def proj(kernel: jax.Array) -> jax.Array:
        return matmul("bsm,mh->bsh", x, kernel, dtype).reshape(batch, seq, -1, head_dim)

    q = round_to(rotary(proj(w.query), positions), dtype)
    k = round_to(rotary(proj(w.key), positions), dtype)
    return q, k, round_to(proj(w.value), dtype)


def attention_output(
    context: jax.Array, w: AttentionWeights, dtype: jnp.dtype, head_mask: jax.Array | None = None
) -> jax.Array:
    """Output projection of context[B, S, n, D] -> [B, S, M] (a partial sum over these heads).

    `head_mask[n]` zeroes padded head slots so they neither change the output nor get gradient.
    """
    if head_mask is not None:
        context = context * head_mask.astype(context.dtype)[None, None, :, None]
    batch, seq = context.shape[:2]
    return matmul("bsh,hm->bsm", context.reshape(batch, seq, -1), w.out, dtype)


def self_attention(
    x: jax.Array,
    w: AttentionWeights,
    head_dim: int,
    positions: jax.Array,
    dtype: jnp.dtype = jnp.float32,
    head_mask: jax.Array | None = None,
) -> jax.Array:
    """Causal self-attention of x[B, S, M] for the heads in `w`; [B, S, M] float32."""
    q, k, v = project_qkv(x, w, head_dim, positions, dtype)
    context = causal_attention(q, k, v, positions, positions)
    return attention_output(context, w, dtype, head_mask)


class Routing(NamedTuple):
    """Routing decisions for a batch of groups (one group per sequence)."""

    logits: jax.Array  # [B, S, E] float32
    expert_index: jax.Array  # [B, S, k] int32
    gates: jax.Array  # [B, S, k] float32
    position: jax.Array  # [B, S, k] int32
    keep: jax.Array  # [B, S, k] bool


def route(x: jax.Array, router_kernel: jax.Array, top_k: int, capacity: int) -> Routing:
    """Router logits (float32), top-k gates and capacity slots for x[B, S, M]."""
    logits = jnp.einsum("bsm,me->bse", x.astype(jnp.float32), router_kernel.astype(jnp.float32))
    num_experts = router_kernel.shape[-1]
    expert_index, gates = jax.vmap(routing.top_k_gating, in_axes=(0, None))(logits, top_k)
    position, keep = jax.vmap(routing.assign_capacity, in_axes=(0, None, None))(
        expert_index, num_experts, capacity
    )
    return Routing(logits, expert_index, gates, position, keep)


def dispatch(x: jax.Array, r: Routing, capacity: int, rows: int | None = None) -> jax.Array:
    """Token buffers [E, B, C, M] for the experts, gathered by slot index. `rows`: the buffer's
    first dimension when `r.expert_index` holds rows of a layout with empty slots (default E)."""
    num_experts = rows or r.logits.shape[-1]
    per_group = jax.vmap(routing.dispatch, in_axes=(0, 0, 0, 0, None, None))(
        x, r.expert_index, r.position, r.keep, num_experts, capacity
    )  # [B, E, C, M]
    return jnp.swapaxes(per_group, 0, 1)


def combine(expert_out: jax.Array, r: Routing) -> jax.Array:
    """Gate-weighted sum of expert outputs [E, B, C, M] back to tokens [B, S, M]."""
    return jax.vmap(routing.combine, in_axes=(1, 0, 0, 0, 0))(
        expert_out, r.expert_index, r.position, r.keep, r.gates
    )


def combine_terms(expert_out: jax.Array, r: Routing) -> jax.Array:
    """The gate-weighted expert output of every choice [B, S, k, M] (`combine` sums over k)."""
    return jax.vmap(routing.combine_terms, in_axes=(1, 0, 0, 0, 0))(
        expert_out, r.expert_index, r.position, r.keep, r.gates
    )


def expert_dropout_keep_mask(
    key: jax.Array,
    rate: float,
    expert_ids: jax.Array,
    sequence_ids: jax.Array,
    capacity: int,
    hidden: int,
) -> jax.Array:
    """Keep-mask [E, B, C, H] for expert dropout, a function of (key, expert id, sequence id).

    Drawing per (expert, sequence) makes the mask independent of how experts and sequences are
    spread over devices or micro-batches, so every strategy drops the same units.
    """

    def one(e: jax.Array, b: jax.Array) -> jax.Array:
        k = jax.random.fold_in(jax.random.fold_in(key, e), b)
        return jax.random.bernoulli(k, 1.0 - rate, (capacity, hidden))

    return jax.vmap(lambda e: jax.vmap(lambda b: one(e, b))(sequence_ids))(expert_ids)


def _dropped(hidden: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    if keep is None:
        return hidden
    return jnp.where(keep, hidden / (1.0 - rate), 0.0).astype(hidden.dtype)


def expert_ffn(
    buffer: jax.Array,
    wi: jax.Array,
    wo: jax.Array,
    dtype: jnp.dtype = jnp.float32,
    dropout_key: jax.Array | None = None,
    dropout_rate: float = 0.0,
    expert_ids: jax.Array | None = None,
    sequence_ids: jax.Array | None = None,
) -> jax.Array:
    """Each expert's FFN on its buffer: [E, B, C, M] -> [E, B, C, M] (float32).

    wi[E, M, H], wo[E, H, M]; GELU, and dropout when a key is given, on the float32 hidden
    activation, which the second product rounds to `dtype` once.
    """
    num_experts, batch, capacity, _ = buffer.shape
    hidden = jax.nn.gelu(matmul("ebcm,emh->ebch", buffer, wi, dtype))
    if dropout_key is not None and dropout_rate > 0.0:
        if expert_ids is None:
            expert_ids = jnp.arange(num_experts)
        if sequence_ids is None:
            sequence_ids = jnp.arange(batch)
        keep = expert_dropout_keep_mask(
            dropout_key, dropout_rate, expert_ids, sequence_ids, capacity, wi.shape[-1]
        )
        hidden = _dropped(hidden, keep, dropout_rate)
    return matmul("ebch,ehm->ebcm", hidden, wo, dtype)


def filled_slot_counts(buffer: jax.Array) -> jax.Array:
    """Slots in use per expert and group of buffer[E, B, C, M]: 1 + the last non-zero slot.

    Slots are taken in order (`routing.assign_capacity`), so the slots in use are a prefix; an
    expert FFN has no bias, so a zero row's output is zero and leaving it out changes nothing.
    A zero row inside the prefix is counted (and computed) like any other."""
    capacity = buffer.shape[2]
    nonzero = jnp.any(buffer != 0, axis=-1)  # [E, B, C]
    last = jnp.max(jnp.where(nonzero, jnp.arange(1, capacity + 1, dtype=jnp.int32), 0), axis=-1)
    return last.astype(jnp.int32)


def filled_tiles(counts: jax.Array, tile_rows: int) -> jax.Array:
    """Tiles of `tile_rows` rows the filled slots of counts[E, B] take, one expert per tile."""
    return jnp.sum(-(-jnp.sum(counts, axis=1) // tile_rows))


def filled_tile_rows(tokens: int, top_k: int, num_experts: int) -> int:
    """Tile height for `expert_ffn_filled_slots`: an expert's rows at a balanced load
    (tokens * k / E), rounded up to a power of two in [1, 128], so a balanced expert fills one
    or two tiles and a cold one none."""
    balanced = max(1, -(-tokens * top_k // num_experts))
    return int(min(128, 1 << (balanced - 1).bit_length()))


def expert_ffn_filled_slots(
    buffer: jax.Array,
    wi: jax.Array,
    wo: jax.Array,
    tile_rows: int,
    dtype: jnp.dtype = jnp.float32,
    dropout_key: jax.Array | None = None,
    dropout_rate: float = 0.0,
    expert_ids: jax.Array | None = None,
    sequence_ids: jax.Array | None = None,
) -> jax.Array:
    """`expert_ffn` computing only the slots in use: [E, B, C, M] -> [E, B, C, M].

    The filled rows of each expert are packed into tiles of `tile_rows` rows (a tile holds one
    expert's rows), and a loop over the tiles runs the FFN on those that hold rows and skips the
    rest, so the work is that of the filled slots rounded up to whole tiles per expert, whatever
    the capacity: an expert device whose experts are cold does less. Shapes are static (one
    program for every routing). Dropout uses the mask `expert_ffn` uses, drawn whole and
    gathered into the tiles with their rows. Differentiable: the backward pass loops
    over the same tiles, adding each tile's weight gradient into its expert's slice. Empty
    slots come back zero, as in `expert_ffn`.
    """
    num_experts, batch, capacity, model_dim = buffer.shape
    rows = batch * capacity
    num_tiles = -(-num_experts * rows // tile_rows) + num_experts
    counts = jax.lax.stop_gradient(filled_slot_counts(buffer))  # [E, B]
    per_expert = jnp.sum(counts, axis=1)
    padded = -(-per_expert // tile_rows) * tile_rows
    expert_start = jnp.cumsum(padded) - padded
    group_start = jnp.cumsum(counts, axis=1) - counts  # [E, B]
    slot = jnp.arange(capacity, dtype=jnp.int32)
    filled = slot[None, None, :] < counts[..., None]  # [E, B, C]
    packed_row = expert_start[:, None, None] + group_start[..., None] + slot[None, None, :]
    packed_row = jnp.where(filled, packed_row, num_tiles * tile_rows).reshape(-1)
    source = jnp.full((num_tiles * tile_rows,), num_experts * rows, jnp.int32)
    source = source.at[packed_row].set(jnp.arange(num_experts * rows, dtype=jnp.int32), mode="drop")
    flat = buffer.reshape(num_experts * rows, model_dim)
    flat = jnp.concatenate([flat, jnp.zeros((1, model_dim), flat.dtype)])
    tiles = flat[source].reshape(num_tiles, tile_rows, model_dim)
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tile_rows
    expert_end = expert_start + padded
    tile_expert = jnp.minimum(
        jnp.sum(tile_start[:, None] >= expert_end[None, :], axis=1), num_experts - 1
    )
    active = jnp.arange(num_tiles) < filled_tiles(counts, tile_rows)
    tile_keep = None
    if dropout_key is not None and dropout_rate > 0.0:
        if expert_ids is None:
            expert_ids = jnp.arange(num_experts)
        if sequence_ids is None:
            sequence_ids = jnp.arange(batch)
        hidden = wi.shape[-1]
        keep = expert_dropout_keep_mask(
            dropout_key, dropout_rate, expert_ids, sequence_ids, capacity, hidden
        ).reshape(num_experts * rows, hidden)
        keep = jnp.concatenate([keep, jnp.ones((1, hidden), bool)])  # the padding rows'
        tile_keep = keep[source].reshape(num_tiles, tile_rows, hidden)
    out = _tiles_ffn(tiles, wi, wo, tile_expert, active, tile_keep, dropout_rate, dtype)
    out = jnp.concatenate(
        [out.reshape(num_tiles * tile_rows, model_dim), jnp.zeros((1, model_dim))]
    )
    return out[packed_row].reshape(buffer.shape)


def _tile_ffn(
    x: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    keep: jax.Array | None,
    rate: float,
    dtype: jnp.dtype,
) -> jax.Array:
    """One expert's FFN on one tile x[t, M] (dropout keep-mask [t, H]), as `expert_ffn`."""
    hidden = jax.nn.gelu(matmul("tm,mh->th", x, w_in, dtype))
    return matmul("th,hm->tm", _dropped(hidden, keep, rate), w_out, dtype)


def _tile_weights(wi: jax.Array, wo: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (
        jax.lax.dynamic_index_in_dim(wi, e, keepdims=False),
        jax.lax.dynamic_index_in_dim(wo, e, keepdims=False),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _tiles_ffn(tiles, wi, wo, tile_expert, active, tile_keep, rate, dtype):
    """`_tile_ffn` on every active tile [T, t, M] (zeros for the others), one tile at a time."""

    def one(_: None, xs: tuple) -> tuple[None, jax.Array]:
        x, e, on, keep = xs
        compute = lambda x: _tile_ffn(x, *_tile_weights(wi, wo, e), keep, rate, dtype)  # noqa: E731
        return None, jax.lax.cond(on, compute, lambda x: jnp.zeros_like(x, jnp.float32), x)

    return jax.lax.scan(one, None, (tiles, tile_expert, active, tile_keep))[1]


def _tiles_ffn_fwd(tiles, wi, wo, tile_expert, active, tile_keep, rate, dtype):
    out = _tiles_ffn(tiles, wi, wo, tile_expert, active, tile_keep, rate, dtype)
    return out, (tiles, wi, wo, tile_expert, active, tile_keep)


def _tiles_ffn_bwd(rate, dtype, saved, d_out):
    """The active tiles again: each tile's VJP, its weight gradients added into its expert's
    slice of the sums (carried through the loop, so a tile touches only its expert's rows)."""
    tiles, wi, wo, tile_expert, active, tile_keep = saved

    def one(sums: tuple, xs: tuple) -> tuple[tuple, jax.Array]:
        x, e, on, keep, d_y = xs

        def compute(sums: tuple) -> tuple[tuple, jax.Array]:
            w_in, w_out = _tile_weights(wi, wo, e)
            _, vjp = jax.vjp(lambda x, a, b: _tile_ffn(x, a, b, keep, rate, dtype), x, w_in, w_out)
            d_x, d_in, d_w_out = vjp(d_y)
            d_wi, d_wo = sums
            return (d_wi.at[e].add(d_in), d_wo.at[e].add(d_w_out)), d_x

        return jax.lax.cond(on, compute, lambda sums: (sums, jnp.zeros_like(x)), sums)

    zeros = (jnp.zeros_like(wi), jnp.zeros_like(wo))
    (d_wi, d_wo), d_tiles = jax.lax.scan(one, zeros, (tiles, tile_expert, active, tile_keep, d_out))
    return d_tiles, d_wi, d_wo, None, None, None


_tiles_ffn.defvjp(_tiles_ffn_fwd, _tiles_ffn_bwd)


class RoutingAux(NamedTuple):
    """Auxiliary losses and load statistics of one MoE layer, averaged over sequences; of the
    whole model after `combine_layers` (expert_fraction and kept_fraction then [L, E], one row
    per layer)."""

    load_balancing_loss: jax.Array
    router_z_loss: jax.Array
    expert_fraction: jax.Array  # [E]; [L, E] once combined over layers
    dropped_fraction: jax.Array
    kept_fraction: jax.Array  # [E]; [L, E] once combined over layers


def routing_aux(r: Routing) -> RoutingAux:
    """Per-sequence auxiliary losses and load statistics, averaged over the batch."""
    num_experts = r.logits.shape[-1]
    probs = jax.nn.softmax(r.logits, axis=-1)
    lb = jax.vmap(routing.load_balancing_loss, in_axes=(0, 0, None))(
        probs, r.expert_index, num_experts
    )
    z = jax.vmap(routing.router_z_loss)(r.logits)
    stats = jax.vmap(routing.load_statistics, in_axes=(0, 0, None))(
        r.expert_index, r.keep, num_experts
    )
    return RoutingAux(
        load_balancing_loss=jnp.mean(lb),
        router_z_loss=jnp.mean(z),
        expert_fraction=jnp.mean(stats.expert_fraction, axis=0),
        dropped_fraction=jnp.mean(stats.dropped_fraction),
        kept_fraction=jnp.mean(stats.kept_fraction, axis=0),
    )


def mean_of(terms: list[RoutingAux]) -> RoutingAux:
    """The element-wise mean of auxiliary terms (of one layer's micro-batches, say)."""
    return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *terms)


def combine_layers(per_layer: list[RoutingAux]) -> RoutingAux:
    """The model's auxiliary terms from its layers' (in layer order): the losses and the dropped
    fraction averaged over layers (the coefficients apply to this mean), the expert fractions
    (routed and kept) per layer, [L, E]: the utilisation a load balancer acts on."""
    mean = mean_of(per_layer)
    return mean._replace(
        expert_fraction=jnp.stack([a.expert_fraction for a in per_layer]),
        kept_fraction=jnp.stack([a.kept_fraction for a in per_layer]),
    )


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of logits[B, S, V] against integer targets[B, S]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z - picked)


def total_loss(
    lm_loss: jax.Array, aux: RoutingAux, load_balancing_coef: float, z_loss_coef: float
) -> jax.Array:
    """Language-model loss plus the weighted auxiliary losses."""
    return lm_loss + load_balancing_coef * aux.load_balancing_loss + z_loss_coef * aux.router_z_loss
