"""MoE-Attention separation: attention on one device pool, experts on another.

Layout (which device holds what)
--------------------------------
The config names two disjoint device lists (indices into ``jax.devices()``):

- the *attention pool*, ``ma_separation.attention.devices`` (12 devices, 1-D mesh axis
  ``attention``), holds every non-expert parameter:

  * the query/key/value kernels ``[M, N*D]`` are stored padded as ``[M, A*n_max*D]`` and split
    by columns: attention device ``a`` holds ``head_distribution[a]`` real heads (the next heads
    in order) followed by zero *padded head slots* up to ``n_max = max(head_distribution)``
    (32 heads over [3]*8 + [2]*4: every device holds 3 slots, the last four one of them padded).
    The output kernel ``[N*D, M]`` is padded and split by rows the same way. A head mask zeroes
    the padded slots' context, so they never change a result and their gradient is exactly zero
    (their weights stay zero under AdamW);
  * the embedding ``[V, M]`` and the LM head ``[M, V]`` are padded to a multiple of the pool
    size along the vocabulary and split over it (zero rows/columns, masked in the softmax);
  * the norms and the router are replicated.

- the *expert pool*, ``ma_separation.moe.devices`` (4 devices, axis ``expert``), holds the
  expert weights and nothing else: every layer's ``wi [E, M, H]`` and ``wo [E, H, M]`` are stored
  with the experts permuted into *expert-device order* (the experts of ``expert_mapping['gpu_12']``
  first, then ``gpu_13``, ...) and split along that axis, so expert device j holds exactly the
  4 experts the mapping gives it (any permutation, e.g. ``gpu_12: [15, 3, 7, 0]``).

The parameter tree keeps the single-device model's nested keys; `to_canonical` /
`from_canonical` undo / apply the padding and permutation leaf by leaf.

A layer's step (one micro-batch of b sequences)
-----------------------------------------------
1. *Attention stage* (a jitted ``shard_map`` on the attention pool). Input: the residual stream
   ``h`` of the previous layer and the previous layer's expert outputs (or the tokens, for layer
   0, looked up in the vocabulary-split embedding and summed with ``psum``). It combines the
   expert outputs (``ops.combine``, a gather by slot index) and adds the residual, then each
   device runs attention for its own heads; the partial outputs are summed with ``psum`` over
   the pool and added to the residual. ``moe_norm``, the router and the capacity dispatch
   (``ops.dispatch``, an index gather) run on the resulting replicated activations and produce
   the capacity buffer ``[E, b, C, M]`` with the experts in expert-device order. With
   ``communication_compression: 8-bit quantization`` the buffer is quantised to int8 (one float32
   scale per token row) inside this program.
2. *Transport to the experts* (`maxjax.parallel.transport`): each expert device receives the
   rows of its 4 experts.
3. *Expert stage* (a jitted ``shard_map`` on the expert pool): dequantise, then every device
   runs ``ops.expert_ffn`` on its experts' buffers (dropout drawn per global expert id and global
   sequence id, so the masks equal the single-device model's), and quantises the result.
4. *Transport back*: every attention device receives the whole output buffer; the next
   attention stage (or the final *head stage*: combine, final norm, vocabulary-split LM head and
   cross-entropy) starts from there.

So tokens cross between the pools once each way per layer, as capacity-bucketed buffers.

Micro-batch ping-pong
---------------------
The batch is cut into ``ma_separation.microbatches`` equal micro-batches. The driver issues
the programs layer by layer, and inside a layer micro-batch by micro-batch:
``A(l, 0) -> E(l, 0) -> A(l, 1) -> E(l, 1) -> ...``. JAX dispatches asynchronously and the two
pools are disjoint device sets, so while the expert pool works on micro-batch i the attention pool
already runs micro-batch i+1 (and the next layer's attention of i as soon as its experts return).
Nothing in the loop blocks the host.

Backward
--------
In training every stage program returns, next to its outputs, its ``jax.vjp`` closure (a pytree
holding the saved residuals, which stay on the stage's devices). The head stage's cotangent is
known up front (the loss weight), so it runs forward and backward in one program. After the forward
sweep and the head stage, the driver walks the layers in reverse with the same ping-pong order: the
expert stage's VJP maps the cotangent of its output buffer to the cotangent of its input buffer
(sent back in float32: the quantisation is straight-through, it sits outside the differentiated
function), and the attention stage's VJP maps the cotangents of (residual, buffer, gates, its
auxiliary-loss term) to those of its inputs and its parameters. Parameter gradients are summed over
micro-batches inside the backward programs (the accumulator is donated), so gradients stay on their
pool; the base class then clips by the global norm over both pools and runs AdamW per pool.

Decoding
--------
`MARunner.generate` runs the same forward programs with a KV cache per layer and micro-batch,
laid out like the attention: [B, T, A*n_max, D] split over the ``attention`` axis, so each
attention device keeps the keys and values of its own head slots ([B, T, n_max, D]; the padded
slots stay zero and masked). The prefill and every one-token step go through the attention stages
(routing dropless, `decode.inference_config`), the transport (compressed when configured) and the
expert stages exactly as in training; the head stage computes only the last position's logits.
`decode.generate_loop` samples, so a seed gives the single-device runner's tokens.

Losses are averaged as in the reference: each micro-batch's LM loss is its mean over positions
(equal micro-batches, so the step's loss is the mean of those), and the routing auxiliaries are
per-sequence means, averaged over micro-batches and layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax import compression, model
from maxjax.config import Config
from maxjax.model import decode, ops
from maxjax.model.transformer import Params, compute_dtype, group_capacity
from maxjax.parallel.mesh import ATTENTION_AXIS, EXPERT_AXIS, attention_submesh, expert_submesh
from maxjax.parallel.runner import Path, Runner, Tree, map_with_path, merge, select
from maxjax.parallel.transport import Transport, make_transport

ATTENTION_POOL = "attention"
EXPERT_POOL = "experts"
QKV = ("query", "key", "value")


class HeadLayout(NamedTuple):
    """How the N heads are spread over the A attention devices, padded to n_max slots each."""

    heads_per_device: tuple[int, ...]
    slots_per_device: int  # n_max
    head_dim: int

    @property
    def num_devices(self) -> int:
        return len(self.heads_per_device)

    @property
    def num_heads(self) -> int:
        return sum(self.heads_per_device)

    def slot_heads(self) -> np.ndarray:
        """Canonical head of every slot [A * n_max], -1 for a padded slot."""
        heads, start = [], 0
        for count in self.heads_per_device:
            heads += list(range(start, start + count)) + [-1] * (self.slots_per_device - count)
            start += count
        return np.array(heads, np.int32)

    def head_mask(self) -> np.ndarray:
        """1.0 for a real head slot, 0.0 for a padded one [A * n_max]."""
        return (self.slot_heads() >= 0).astype(np.float32)

    def padded_columns(self) -> np.ndarray:
        """Canonical column of every padded column [A*n_max*D]; N*D (a zero column) for padding."""
        d = self.head_dim
        heads = self.slot_heads()
        cols = heads[:, None] * d + np.arange(d)[None, :]
        return np.where(heads[:, None] >= 0, cols, self.num_heads * d).reshape(-1)

    def real_columns(self) -> np.ndarray:
        """Padded column of every canonical column [N*D]."""
        padded = self.padded_columns()
        return np.argsort(np.where(padded < self.num_heads * self.head_dim, padded, 1 << 30))[
            : self.num_heads * self.head_dim
        ].astype(np.int32)


class ExpertOrder(NamedTuple):
    """Experts in expert-device order (device j's experts are rows 4j..4j+3)."""

    order: np.ndarray  # [E]: canonical expert of each row
    row_of_expert: np.ndarray  # [E]: row of each canonical expert

    @classmethod
    def from_config(cls, cfg: Config) -> ExpertOrder:
        order = np.array(
            [e for d in cfg.expert_devices for e in cfg.experts_of_device(d)], np.int32
        )
        return cls(order, np.argsort(order).astype(np.int32))


CACHE_SPEC = P(None, None, ATTENTION_AXIS, None)  # KV cache [B, T, A*n_max, D]: heads split


class StageRouting(NamedTuple):
    """The integer part of a layer's routing that the next attention stage needs to combine."""

    expert_row: jax.Array  # [b, S, k] row of the chosen expert in expert-device order
    position: jax.Array  # [b, S, k]
    keep: jax.Array  # [b, S, k]


def _is_expert_leaf(path: Path) -> bool:
    return "experts" in path


def _attention_part(layer: Tree) -> Tree:
    """A layer's subtree without its expert weights."""
    return {k: ({"router": v["router"]} if k == "moe" else v) for k, v in layer.items()}


class MARunner(Runner):
    """MoE-Attention separation on two submeshes (see the module docstring for the layout)."""

    name = "ma"

    def __init__(self, cfg: Config, transport: str | None = None):
        super().__init__(cfg)
        self.attention_mesh = attention_submesh(cfg)
        self.expert_mesh = expert_submesh(cfg)
        self.transport: Transport = make_transport(cfg, transport)
        self.heads = HeadLayout(
            tuple(cfg.ma_separation.attention.head_distribution),
            max(cfg.ma_separation.attention.head_distribution),
            cfg.model.head_dim,
        )
        self.experts = ExpertOrder.from_config(cfg)
        pool = len(cfg.attention_devices)
        self.vocab_size = cfg.training.vocab_size
        self.padded_vocab = math.ceil(self.vocab_size / pool) * pool
        self.num_layers = cfg.model.layers
        self.microbatches = cfg.ma_separation.microbatches
        self.compress = (
            cfg.ma_separation.synchronization.communication_compression == "8-bit quantization"
        )
        self.dtype = compute_dtype(cfg)
        self.inference_cfg = decode.inference_config(cfg)
        self._reset_counters()
        self._sequence_id_cache: dict[tuple[int, int], jax.Array] = {}
        self._head_mask = jax.device_put(
            self.heads.head_mask(), NamedSharding(self.attention_mesh, P(ATTENTION_AXIS))
        )
        self._expert_rows = jax.device_put(
            self.experts.order, NamedSharding(self.expert_mesh, P(EXPERT_AXIS))
        )
        self._build_programs()

    # --- layout --------------------------------------------------------------------------------

    def pool_of(self, path: Path) -> str:
        return EXPERT_POOL if _is_expert_leaf(tuple(map(str, path))) else ATTENTION_POOL

    def spec_of(self, path: Path) -> P:
        """PartitionSpec of the MA-layout leaf at `path` on its pool's mesh."""
        path = tuple(map(str, path))
        if _is_expert_leaf(path):
            return P(EXPERT_AXIS)
        if path[-2] in QKV or path[-2] == "lm_head":
            return P(None, ATTENTION_AXIS)
        if path[-2] == "out" or path[-2] == "embed":
            return P(ATTENTION_AXIS, None)
        return P()

    def sharding_of(self, path: Path) -> NamedSharding:
        mesh = self.expert_mesh if _is_expert_leaf(tuple(map(str, path))) else self.attention_mesh
        return NamedSharding(mesh, self.spec_of(path))

    def _to_layout(self, path: Path, x: jax.Array) -> jax.Array:
        """Canonical leaf -> MA layout (pad heads and vocabulary, permute experts)."""
        path = tuple(map(str, path))
        if _is_expert_leaf(path):
            return x[self.experts.order]
        if path[-2] in QKV:
            padded = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
            return padded[:, self.heads.padded_columns()]
        if path[-2] == "out":
            padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
            return padded[self.heads.padded_columns()]
        extra = self.padded_vocab - self.vocab_size
        if path[-2] == "embed":
            return jnp.pad(x, ((0, extra), (0, 0)))
        if path[-2] == "lm_head":
            return jnp.pad(x, ((0, 0), (0, extra)))
        return x

    def _from_layout(self, path: Path, x: jax.Array) -> jax.Array:
        """MA-layout leaf -> canonical."""
        path = tuple(map(str, path))
        if _is_expert_leaf(path):
            return x[self.experts.row_of_expert]
        if path[-2] in QKV:
            return x[:, self.heads.real_columns()]
        if path[-2] == "out":
            return x[self.heads.real_columns()]
        if path[-2] == "embed":
            return x[: self.vocab_size]
        if path[-2] == "lm_head":
            return x[:, : self.vocab_size]
        return x

    def _shardings(self, tree: Tree) -> Tree:
        return map_with_path(lambda p, _: self.sharding_of(p), tree)

    def _specs(self, tree: Tree) -> Tree:
        return map_with_path(lambda p, _: self.spec_of(p), tree)

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs (with shardings) of the MA-layout parameters; allocates nothing."""
        canonical = model.abstract_params(self.cfg)
        shapes = jax.eval_shape(lambda t: map_with_path(self._to_layout, t), canonical)
        return map_with_path(
            lambda p, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.sharding_of(p)),
            shapes,
        )

    def init(self, seed: int) -> Params:
        """`init_params(cfg, seed)` built per pool by a jit whose outputs are already sharded."""
        pools = []
        for pool in (ATTENTION_POOL, EXPERT_POOL):

            def build(pool: str = pool) -> Params:
                params = map_with_path(self._to_layout, model.init_params(self.cfg, seed))
                return select(params, lambda p, pool=pool: self.pool_of(p) == pool)

            shardings = self._shardings(jax.eval_shape(build))
            pools.append(jax.jit(build, out_shardings=shardings)())
        return merge(*pools)

    def to_canonical(self, tree: Tree) -> Tree:
        """Undo padding and permutation per pool; the leaves stay on their pool's devices."""
        out = []
        for pool_tree in self.split_pools(tree).values():
            out.append(jax.jit(lambda t: map_with_path(self._from_layout, t))(pool_tree))
        return merge(*out)

    def from_canonical(self, tree: Tree) -> Tree:
        """Place each canonical leaf on its pool, then pad / permute it into the MA layout there."""
        out = []
        for pool_tree in self.split_pools(tree).values():
            placed = map_with_path(
                lambda p, x: jax.device_put(x, self._canonical_sharding(p)), pool_tree
            )
            target = self._shardings(pool_tree)
            out.append(
                jax.jit(lambda t: map_with_path(self._to_layout, t), out_shardings=target)(placed)
            )
        return merge(*out)

    def _canonical_sharding(self, path: Path) -> NamedSharding:
        """Where a canonical leaf waits before conversion: experts split, the rest replicated."""
        if self.pool_of(path) == EXPERT_POOL:
            return NamedSharding(self.expert_mesh, P(EXPERT_AXIS))
        return NamedSharding(self.attention_mesh, P())

    # --- bytes between the pools ---------------------------------------------------------------

    def transfer_bytes(self, batch_size: int, seq_len: int) -> dict[str, Any]:
        """Bytes that cross between the pools per layer and step (all micro-batches), forward.

        ``attention_to_experts``: what leaves the attention pool (each expert device receives
        its experts' rows once). ``experts_to_attention``: the output buffer, once;
        ``experts_to_attention_delivered`` counts every attention device's copy (each needs all
        tokens). With 8-bit compression a buffer of shape [E, B, C, M] costs E*B*C*M bytes plus
        4 bytes of scale per row (E*B*C rows): (1/4 + 1/M) of float32. The backward pass sends
        float32 cotangents of the same shapes (``backward_each_way``).
        """
        capacity = group_capacity(self.cfg, seq_len)
        shape = (self.cfg.moe.experts_per_layer, batch_size, capacity, self.cfg.model.hidden_dim)
        float_bytes = 4 * math.prod(shape)
        wire = compression.compressed_nbytes(shape) if self.compress else float_bytes
        return {
            "buffer_shape": shape,
            "compressed": self.compress,
            "attention_to_experts": wire,
            "experts_to_attention": wire,
            "experts_to_attention_delivered": wire * len(self.cfg.attention_devices),
            "uncompressed_each_way": float_bytes,
            "scale_bytes_each_way": 4 * math.prod(shape[:-1]) if self.compress else 0,
            "backward_each_way": float_bytes,
        }

    # --- stage bodies (run per device inside shard_map) ------------------------------------------

    def _encode(self, buffer: jax.Array) -> Any:
        return compression.quantize_int8(buffer) if self.compress else buffer

    def _decode(self, wire: Any) -> jax.Array:
        return compression.dequantize_int8(*wire, jnp.float32) if self.compress else wire

    def _vocab_columns(self, local_vocab: int) -> jax.Array:
        return jax.lax.axis_index(ATTENTION_AXIS) * local_vocab + jnp.arange(local_vocab)

    def _embed_body(self, embedding: jax.Array, tokens: jax.Array) -> jax.Array:
        """Lookup in the vocabulary-split table: each device contributes its rows, psum."""
        local_vocab = embedding.shape[0]
        local = tokens - jax.lax.axis_index(ATTENTION_AXIS) * local_vocab
        inside = (local >= 0) & (local < local_vocab)
        rows = embedding[jnp.clip(local, 0, local_vocab - 1)].astype(jnp.float32)
        return jax.lax.psum(jnp.where(inside[..., None], rows, 0.0), ATTENTION_AXIS)

    def _combine_body(
        self, h: jax.Array, expert_out: jax.Array, gates: jax.Array, r: StageRouting
    ) -> jax.Array:
        routing = ops.Routing(None, r.expert_row, gates, r.position, r.keep)
        return h + ops.combine(expert_out, routing)

    def _layer_body(
        self,
        layer: Tree,
        x: jax.Array,
        head_mask: jax.Array,
        cache: decode.KVCache | None = None,
        start: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, ...], tuple[StageRouting, ops.RoutingAux, decode.KVCache | None]]:
        """Attention of this device's heads (psum over the pool), then route and dispatch.

        Training / forward: x holds whole sequences, no cache. Decoding: x holds positions
        start.. and `cache` this device's keys and values [b, T, n_max, D] of the earlier ones
        (updated and returned); routing is then dropless (`decode.inference_config`) so a token's
        expert output does not depend on which tokens share its step.
        """
        seq = x.shape[1]
        att = layer["attention"]
        weights = ops.AttentionWeights(*(att[name]["kernel"] for name in (*QKV, "out")))
        normed = ops.rms_norm(x, layer["attention_norm"]["scale"])
        if cache is None:
            positions = jnp.arange(seq, dtype=jnp.int32)
            partial = ops.self_attention(
                normed, weights, self.heads.head_dim, positions, self.dtype, head_mask
            )
            capacity = group_capacity(self.cfg, seq)
        else:
            partial, cache = decode.attention_with_cache(
                normed, weights, self.heads.head_dim, cache, start, self.dtype, head_mask
            )
            capacity = group_capacity(self.inference_cfg, seq)
        h = x + jax.lax.psum(partial, ATTENTION_AXIS)
        z = ops.rms_norm(h, layer["moe_norm"]["scale"])
        r = ops.route(z, layer["moe"]["router"]["kernel"], self.cfg.moe.top_k, capacity)
        aux = ops.routing_aux(r)
        device_order = r._replace(
            expert_index=jnp.asarray(self.experts.row_of_expert)[r.expert_index]
        )
        buffer = ops.dispatch(z, device_order, capacity)
        objective = (
            self.cfg.moe.load_balancing_loss * aux.load_balancing_loss
            + self.cfg.moe.router_z_loss * aux.router_z_loss
        )
        routing = StageRouting(device_order.expert_index, r.position, r.keep)
        return (h, buffer, r.gates, objective), (routing, aux, cache)

    def _head_logits_body(self, head: Tree, x: jax.Array) -> jax.Array:
        z = ops.rms_norm(x, head["final_norm"]["scale"])
        return jnp.einsum(
            "bsm,mv->bsv", z.astype(self.dtype), head["lm_head"]["kernel"].astype(self.dtype)
        ).astype(jnp.float32)

    def _head_loss_body(self, head: Tree, x: jax.Array, targets: jax.Array) -> jax.Array:
        """Cross-entropy over the vocabulary-split logits (max, sum-exp and pick via the pool)."""
        logits = self._head_logits_body(head, x)
        columns = self._vocab_columns(logits.shape[-1])
        logits = jnp.where(columns < self.vocab_size, logits, jnp.finfo(jnp.float32).min)
        row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), ATTENTION_AXIS)
        # One all-reduce for both sums: a collective costs more than the few floats it moves.
        sum_exp, picked = jax.lax.psum(
            (
                jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1),
                jnp.sum(jnp.where(columns == targets[..., None], logits, 0.0), axis=-1),
            ),
            ATTENTION_AXIS,
        )
        return jnp.mean(jnp.log(sum_exp) + row_max - picked)

    # --- stage functions (global arrays; shard_map on a pool) -----------------------------------

    def _attention_map(self, body: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        return jax.shard_map(
            body, mesh=self.attention_mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True
        )

    @staticmethod
    def _stage_out_specs(cache: decode.KVCache | None) -> Any:
        """Everything a layer stage returns is replicated, except a KV cache (split by heads)."""
        return P() if cache is None else (P(), (P(), P(), CACHE_SPEC))

    def first_stage(
        self,
        embed: Tree,
        layer: Tree,
        tokens: jax.Array,
        head_mask: jax.Array,
        cache: decode.KVCache | None = None,
        start: jax.Array | None = None,
    ) -> tuple:
        """Layer 0 on the attention pool: embedding lookup, attention, route, dispatch.

        With `cache` [b, T, A*n_max, D] (split by heads) and `start`, tokens sit at positions
        start.. (decoding; see `_layer_body`)."""

        def body(embed, layer, tokens, head_mask, cache, start):
            x = self._embed_body(embed["embedding"], tokens)
            return self._layer_body(layer, x, head_mask, cache, start)

        specs = (
            self._specs({"embed": embed})["embed"],
            self._layer_specs(layer),
            P(),
            P(ATTENTION_AXIS),
            CACHE_SPEC,
            P(),
        )
        return self._attention_map(body, specs, self._stage_out_specs(cache))(
            embed, layer, tokens, head_mask, cache, start
        )

    def middle_stage(
        self,
        layer: Tree,
        h: jax.Array,
        expert_out: jax.Array,
        gates: jax.Array,
        routing: StageRouting,
        head_mask: jax.Array,
        cache: decode.KVCache | None = None,
        start: jax.Array | None = None,
    ) -> tuple:
        """Layer l > 0 on the attention pool: combine layer l-1, attention, route, dispatch
        (with `cache` and `start`: decoding, as in `first_stage`)."""

        def body(layer, h, expert_out, gates, routing, head_mask, cache, start):
            x = self._combine_body(h, expert_out, gates, routing)
            return self._layer_body(layer, x, head_mask, cache, start)

        specs = (self._layer_specs(layer), P(), P(), P(), P(), P(ATTENTION_AXIS), CACHE_SPEC, P())
        return self._attention_map(body, specs, self._stage_out_specs(cache))(
            layer, h, expert_out, gates, routing, head_mask, cache, start
        )

    def head_loss(
        self,
        head: Tree,
        h: jax.Array,
        expert_out: jax.Array,
        gates: jax.Array,
        routing: StageRouting,
        targets: jax.Array,
    ) -> jax.Array:
        """Combine the last layer, final norm, LM head and mean cross-entropy (attention pool)."""

        def body(head, h, expert_out, gates, routing, targets):
            x = self._combine_body(h, expert_out, gates, routing)
            return self._head_loss_body(head, x, targets)

        specs = (self._head_specs(head), P(), P(), P(), P(), P())
        return self._attention_map(body, specs, P())(head, h, expert_out, gates, routing, targets)

    def head_logits(
        self,
        head: Tree,
        h: jax.Array,
        expert_out: jax.Array,
        gates: jax.Array,
        routing: StageRouting,
    ) -> jax.Array:
        def body(head, h, expert_out, gates, routing):
            return self._head_logits_body(head, self._combine_body(h, expert_out, gates, routing))

        specs = (self._head_specs(head), P(), P(), P(), P())
        logits = self._attention_map(body, specs, P(None, None, ATTENTION_AXIS))(
            head, h, expert_out, gates, routing
        )
        return logits[..., : self.vocab_size]

    def expert_stage(
        self,
        experts: Tree,
        buffer: jax.Array,
        expert_ids: jax.Array,
        sequence_ids: jax.Array,
        dropout_key: jax.Array | None,
    ) -> jax.Array:
        """Each expert device runs its experts' FFNs on its rows of buffer [E, b, C, M]."""
        rate = self.cfg.moe.expert_dropout

        def body(experts, buffer, expert_ids, sequence_ids, key):
            return ops.expert_ffn(
                buffer,
                experts["wi"],
                experts["wo"],
                self.dtype,
                key,
                rate,
                expert_ids,
                sequence_ids,
            )

        specs = (P(EXPERT_AXIS), P(EXPERT_AXIS), P(EXPERT_AXIS), P(), P())
        return jax.shard_map(
            body, mesh=self.expert_mesh, in_specs=specs, out_specs=P(EXPERT_AXIS), check_vma=True
        )(experts, buffer, expert_ids, sequence_ids, dropout_key)

    def _layer_specs(self, layer: Tree) -> Tree:
        return map_with_path(lambda p, _: self.spec_of(("layers", "0", *p)), layer)

    def _head_specs(self, head: Tree) -> Tree:
        return self._specs(head)

    # --- jitted programs -------------------------------------------------------------------------

    def _build_programs(self) -> None:
        """Forward programs (inference and decoding), forward-with-VJP programs and backward
        programs. `first` / `middle` take an optional KV cache and start position (decoding):
        one jitted program each, traced once per call shape."""
        enc, dec = self._encode, self._decode

        def first(embed, layer, tokens, head_mask, cache=None, start=None):
            (h, buf, gates, _), (routing, aux, cache) = self.first_stage(
                embed, layer, tokens, head_mask, cache, start
            )
            return h, enc(buf), gates, routing, aux, cache

        def middle(layer, h, wire, gates, routing, head_mask, cache=None, start=None):
            (h, buf, gates, _), (routing, aux, cache) = self.middle_stage(
                layer, h, dec(wire), gates, routing, head_mask, cache, start
            )
            return h, enc(buf), gates, routing, aux, cache

        def experts(params, wire, expert_ids, sequence_ids, rng, layer):
            key = None if rng is None else jax.random.fold_in(rng, layer)
            return enc(self.expert_stage(params, dec(wire), expert_ids, sequence_ids, key))

        def logits(head, h, wire, gates, routing):
            return self.head_logits(head, h, dec(wire), gates, routing)

        def last_logits(head, h, wire, gates, routing):
            """Logits [b, V] of the last position only (decoding)."""
            last = lambda x: x[:, -1:]
            routing = jax.tree.map(last, routing)
            return self.head_logits(head, last(h), dec(wire), last(gates), routing)[:, 0]

        def first_vjp(embed, layer, tokens, head_mask):
            fn = lambda e, lp: self.first_stage(e, lp, tokens, head_mask)
            (h, buf, gates, _), vjp, (routing, aux, _) = jax.vjp(fn, embed, layer, has_aux=True)
            return (h, enc(buf), gates, routing, aux), vjp

        def middle_vjp(layer, h, wire, gates, routing, head_mask):
            fn = lambda lp, h, out, g: self.middle_stage(lp, h, out, g, routing, head_mask)
            (h, buf, gates, _), vjp, (routing, aux, _) = jax.vjp(
                fn, layer, h, dec(wire), gates, has_aux=True
            )
            return (h, enc(buf), gates, routing, aux), vjp

        def experts_vjp(params, wire, expert_ids, sequence_ids, rng, layer):
            key = None if rng is None else jax.random.fold_in(rng, layer)
            fn = lambda p, b: self.expert_stage(p, b, expert_ids, sequence_ids, key)
            out, vjp = jax.vjp(fn, params, dec(wire))
            return enc(out), vjp

        loss_weight = 1.0 / self.microbatches

        def head_step(head, h, wire, gates, routing, targets, acc):
            """Head forward and backward in one program (its cotangent is known: the loss
            weight): LM loss, head grads summed into `acc`, cotangents of (h, out, gates)."""
            fn = lambda hp, h, out, g: self.head_loss(hp, h, out, g, routing, targets)
            loss, vjp = jax.vjp(fn, head, h, dec(wire), gates)
            grads = vjp(jnp.float32(loss_weight))
            return loss, _accumulate(acc, grads[0]), grads[1:]

        aux_weight = 1.0 / (self.microbatches * self.num_layers)

        def layer_backward(vjp, d_h, d_buf, d_gates, acc):
            grads = vjp((d_h, d_buf, d_gates, jnp.float32(aux_weight)))
            return _accumulate(acc, grads[0]), grads[1:]

        def first_backward(vjp, d_h, d_buf, d_gates, acc):
            return _accumulate(acc, vjp((d_h, d_buf, d_gates, jnp.float32(aux_weight))))

        def experts_backward(vjp, d_out, acc):
            d_params, d_buf = vjp(d_out)
            return _accumulate(acc, d_params), d_buf

        self._first = jax.jit(first)
        self._middle = jax.jit(middle)
        self._experts = jax.jit(experts)
        self._logits = jax.jit(logits)
        self._last_logits = jax.jit(last_logits)
        self._first_vjp = jax.jit(first_vjp)
        self._middle_vjp = jax.jit(middle_vjp)
        self._experts_vjp = jax.jit(experts_vjp)
        self._head_step = jax.jit(head_step, donate_argnums=(6,))
        self._layer_backward = jax.jit(layer_backward, donate_argnums=(4,))
        self._first_backward = jax.jit(first_backward, donate_argnums=(4,))
        self._experts_backward = jax.jit(experts_backward, donate_argnums=(2,))
        self._summarize = jax.jit(functools.partial(_summarize, self.cfg))

    def _run(self, program: Callable, *args: Any) -> Any:
        self.programs_dispatched += 1
        return program(*args)

    def _reset_counters(self) -> None:
        """Start counting a new call: programs dispatched and bytes handed to the transport."""
        self.programs_dispatched = 0
        self.transport.programs_dispatched = 0
        self.bytes_moved = dict.fromkeys(
            (
                "attention_to_experts",
                "experts_to_attention",
                "backward_to_experts",
                "backward_to_attention",
            ),
            0,
        )

    def _send(self, tree: Tree, counter: str = "attention_to_experts") -> Tree:
        self.bytes_moved[counter] += _nbytes(tree)
        return self.transport.to_experts(tree)

    def _receive(self, tree: Tree, counter: str = "experts_to_attention") -> Tree:
        self.bytes_moved[counter] += _nbytes(tree)
        return self.transport.to_attention(tree)

    # --- driving a step ---------------------------------------------------------------------------

    def _split_batch(self, tokens: Any, parts: int | None = None) -> list[np.ndarray]:
        """Host copies of the `parts` (default: ma_separation.microbatches) micro-batches."""
        parts = parts or self.microbatches
        tokens = np.asarray(jax.device_get(tokens))
        batch = tokens.shape[0]
        if batch % parts:
            raise ValueError(
                f"batch of {batch} sequences does not split into "
                f"ma_separation.microbatches = {parts} equal micro-batches"
            )
        return np.split(tokens, parts)

    def _on_attention(self, x: Any) -> jax.Array:
        return jax.device_put(x, NamedSharding(self.attention_mesh, P()))

    def _on_experts(self, x: Any) -> jax.Array:
        return jax.device_put(x, NamedSharding(self.expert_mesh, P()))

    def _sequence_ids(self, index: int, size: int) -> jax.Array:
        """Global sequence ids of micro-batch `index` on the expert pool (cached: no transfer
        per stage)."""
        key = (index, size)
        if key not in self._sequence_id_cache:
            ids = np.arange(index * size, (index + 1) * size, dtype=np.int32)
            self._sequence_id_cache[key] = self._on_experts(ids)
        return self._sequence_id_cache[key]

    def _forward_sweep(
        self,
        params: Params,
        micro: list[np.ndarray],
        caches: list[list[decode.KVCache]] | None = None,
        start: jax.Array | None = None,
    ) -> tuple[list[tuple], list[list[decode.KVCache]] | None]:
        """All layers over the micro-batches in ping-pong order, no gradients.

        Returns each micro-batch's head-stage input (h, expert output, gates, routing) and, when
        decoding, the updated caches (caches[i][layer] of micro-batch i)."""
        size = micro[0].shape[0]
        states: list[Any] = [None] * len(micro)
        new_caches = None if caches is None else [[] for _ in micro]
        layers = params["layers"]
        for depth, key in enumerate(sorted(layers)):
            layer = layers[key]
            for i, toks in enumerate(micro):
                cache = () if caches is None else (caches[i][depth], start)
                if depth == 0:
                    out = self._run(
                        self._first,
                        params["embed"],
                        _attention_part(layer),
                        self._on_attention(toks),
                        self._head_mask,
                        *cache,
                    )
                else:
                    out = self._run(
                        self._middle, _attention_part(layer), *states[i], self._head_mask, *cache
                    )
                h, wire, gates, routing, _, cache = out
                if new_caches is not None:
                    new_caches[i].append(cache)
                wire = self._send(wire)
                wire = self._run(
                    self._experts,
                    layer["moe"]["experts"],
                    wire,
                    self._expert_rows,
                    self._sequence_ids(i, size),
                    None,
                    depth,
                )
                states[i] = (h, self._receive(wire), gates, routing)
        return states, new_caches

    def forward(self, params: Params, tokens: jax.Array) -> jax.Array:
        self._reset_counters()
        states, _ = self._forward_sweep(params, self._split_batch(tokens))
        head = _head_part(params)
        logits = [self._run(self._logits, head, *state) for state in states]
        return logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=0)

    # --- decoding --------------------------------------------------------------------------------

    def init_caches(self, batch: int, max_len: int) -> list[decode.KVCache]:
        """Zero KV caches of every layer, [batch, max_len, A*n_max, D] split by heads over the
        attention pool like the q/k/v columns (padded slots stay zero: their kernels are)."""
        shape = (batch, max_len, self.heads.num_devices * self.heads.slots_per_device)
        shape = (*shape, self.heads.head_dim)
        sharding = NamedSharding(self.attention_mesh, CACHE_SPEC)
        zeros = jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)
        return [decode.KVCache(zeros(), zeros()) for _ in range(self.num_layers)]

    def _decode_step(
        self, params: Params, tokens: jax.Array, caches: list[list[decode.KVCache]], start: int
    ) -> tuple[jax.Array, list[list[decode.KVCache]]]:
        """tokens[B, S] at positions start.. -> (logits [B, V] of the last one, caches)."""
        micro = self._split_batch(tokens, len(caches))
        states, caches = self._forward_sweep(
            params, micro, caches, self._on_attention(np.int32(start))
        )
        head = _head_part(params)
        logits = [self._run(self._last_logits, head, *state) for state in states]
        return (logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=0)), caches

    def generate(
        self,
        params: Params,
        prompt: jax.Array,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> jax.Array:
        """KV-cache decoding on the MA layout (params stay as they are): the attention pool keeps
        each device's heads' keys and values, the experts stay on the expert pool, buffers cross
        through the transport (compressed when configured). Routing is dropless. The prompt is
        cut into `ma_separation.microbatches` micro-batches (ping-pong) when they divide it,
        else decoded as one."""
        self._reset_counters()
        batch, prompt_len = prompt.shape
        parts = self.microbatches if batch % self.microbatches == 0 else 1
        caches = [
            self.init_caches(batch // parts, prompt_len + max_new_tokens) for _ in range(parts)
        ]
        return decode.generate_loop(
            lambda t, c, s: self._decode_step(params, t, c, s),
            caches,
            prompt,
            max_new_tokens,
            temperature,
            seed,
        )

    def value_and_grad(
        self, params: Params, tokens: jax.Array, rng: jax.Array | None = None
    ) -> tuple[dict[str, jax.Array], Params]:
        self._reset_counters()
        micro = self._split_batch(tokens)
        size = micro[0].shape[0]
        rng = None if rng is None else self._on_experts(rng)
        layers = params["layers"]
        keys = sorted(layers)

        # Forward, layer by layer, micro-batches interleaved; keep every stage's VJP.
        states: list[Any] = [None] * len(micro)
        attention_vjps = [[None] * len(micro) for _ in keys]
        expert_vjps = [[None] * len(micro) for _ in keys]
        aux_terms = []
        for depth, key in enumerate(keys):
            layer = layers[key]
            for i, toks in enumerate(micro):
                if depth == 0:
                    out, attention_vjps[depth][i] = self._run(
                        self._first_vjp,
                        params["embed"],
                        _attention_part(layer),
                        self._on_attention(toks[:, :-1]),
                        self._head_mask,
                    )
                else:
                    out, attention_vjps[depth][i] = self._run(
                        self._middle_vjp, _attention_part(layer), *states[i], self._head_mask
                    )
                h, wire, gates, routing, aux = out
                aux_terms.append(aux)
                wire, expert_vjps[depth][i] = self._run(
                    self._experts_vjp,
                    layer["moe"]["experts"],
                    self._send(wire),
                    self._expert_rows,
                    self._sequence_ids(i, size),
                    rng,
                    depth,
                )
                states[i] = (h, self._receive(wire), gates, routing)
        # The head's forward and backward (one program per micro-batch), then the layers in
        # reverse, the same ping-pong order; gradients summed per stage.
        head = _head_part(params)
        lm_losses, cotangents, head_grads = [], [], None
        for i, toks in enumerate(micro):
            loss, head_grads, (d_h, d_out, d_gates) = self._run(
                self._head_step, head, *states[i], self._on_attention(toks[:, 1:]), head_grads
            )
            lm_losses.append(loss)
            cotangents.append([d_h, d_out, d_gates])
        layer_grads: dict[Any, Any] = {}
        embed_grads = None
        for depth in reversed(range(len(keys))):
            attention_acc, experts_acc = None, None
            for i in range(len(micro)):
                d_h, d_out, d_gates = cotangents[i]
                experts_acc, d_buf = self._run(
                    self._experts_backward,
                    expert_vjps[depth][i],
                    self._send(d_out, "backward_to_experts"),
                    experts_acc,
                )
                d_buf = self._receive(d_buf, "backward_to_attention")
                if depth > 0:
                    attention_acc, cotangents[i] = self._run(
                        self._layer_backward,
                        attention_vjps[depth][i],
                        d_h,
                        d_buf,
                        d_gates,
                        attention_acc,
                    )
                else:
                    acc = None if attention_acc is None else (embed_grads, attention_acc)
                    embed_grads, attention_acc = self._run(
                        self._first_backward, attention_vjps[depth][i], d_h, d_buf, d_gates, acc
                    )
                attention_vjps[depth][i] = expert_vjps[depth][i] = None
            attention_acc["moe"]["experts"] = experts_acc
            layer_grads[keys[depth]] = attention_acc
        grads = {
            "embed": embed_grads,
            "layers": layer_grads,
            "final_norm": head_grads["final_norm"],
            "lm_head": head_grads["lm_head"],
        }
        metrics = self._run(self._summarize, lm_losses, aux_terms)
        return metrics, grads

    # --- ahead-of-time compilation (paper-scale cost and memory without running) ---------------

    def lower_stages(self, batch: int, seq_len: int) -> dict[str, jax.stages.Lowered]:
        """The training attention stage (layer > 0) and expert stage, lowered for abstract
        inputs of one micro-batch of `batch` sequences of `seq_len` tokens."""
        cfg = self.cfg
        capacity = group_capacity(cfg, seq_len)
        experts, top_k = cfg.moe.experts_per_layer, cfg.moe.top_k
        width = cfg.model.hidden_dim
        on_attention = NamedSharding(self.attention_mesh, P())
        on_experts = NamedSharding(self.expert_mesh, P(EXPERT_AXIS))

        def wire(sharding: NamedSharding) -> Any:
            shape = (experts, batch, capacity, width)
            if not self.compress:
                return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
            return (
                jax.ShapeDtypeStruct(shape, jnp.int8, sharding=sharding),
                jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=sharding),
            )

        def like(x: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        params = self.abstract_params()
        layer = params["layers"][sorted(params["layers"])[-1]]
        routing_shape = (batch, seq_len, top_k)
        routing = StageRouting(
            jax.ShapeDtypeStruct(routing_shape, jnp.int32, sharding=on_attention),
            jax.ShapeDtypeStruct(routing_shape, jnp.int32, sharding=on_attention),
            jax.ShapeDtypeStruct(routing_shape, jnp.bool_, sharding=on_attention),
        )
        attention = self._middle_vjp.lower(
            _attention_part(layer),
            jax.ShapeDtypeStruct((batch, seq_len, width), jnp.float32, sharding=on_attention),
            wire(on_attention),
            jax.ShapeDtypeStruct(routing_shape, jnp.float32, sharding=on_attention),
            routing,
            like(self._head_mask, self._head_mask.sharding),
        )
        expert = self._experts_vjp.lower(
            layer["moe"]["experts"],
            wire(on_experts),
            like(self._expert_rows, self._expert_rows.sharding),
            jax.ShapeDtypeStruct(
                (batch,), jnp.int32, sharding=NamedSharding(self.expert_mesh, P())
            ),
            None,
            0,
        )
        return {"attention": attention, "experts": expert}


def _nbytes(tree: Tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _head_part(params: Params) -> Tree:
    return {"final_norm": params["final_norm"], "lm_head": params["lm_head"]}


def _accumulate(acc: Tree | None, grads: Tree) -> Tree:
    return grads if acc is None else jax.tree.map(jnp.add, acc, grads)


def _summarize(
    cfg: Config, lm_losses: list[jax.Array], aux_terms: list[ops.RoutingAux]
) -> dict[str, jax.Array]:
    """The metrics of `model.loss_terms` from per-micro-batch LM losses and per-stage aux."""
    aux = ops.mean_over_layers(aux_terms)
    lm = jnp.mean(jnp.stack(lm_losses))
    return model.loss_from_parts(cfg, lm, aux)[1]


__all__ = ["ExpertOrder", "HeadLayout", "MARunner", "StageRouting"]
