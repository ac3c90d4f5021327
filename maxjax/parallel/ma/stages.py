"""The stage programs of MA separation: per-device bodies under `jax.shard_map`, jitted.

One `StagePrograms` exists per `TokenSplit` (per micro-batch size): its attention-pool programs
run on the split's (SEQ, REP) view of the attention devices, its expert programs on the expert
pool. Every program's inputs and outputs are global arrays with these shardings:

=====================  ===========================  ======================  =====================
array                  global shape                 attention pool          expert pool
=====================  ===========================  ======================  =====================
`TokenState` leaves    [b, S, ...]                  P(SEQ)                  -
outgoing piece j       [R, E/J, b, C, M]            P(REP, None, SEQ)       -
expert input shard s   [J, E/J, b/G, C, M]          -                       P('expert')
=====================  ===========================  ======================  =====================

so that a piece (one sequence shard's rows for one expert device) is the same [1, E/J, b/G, C, M]
block on both sides: the transport copies it device to device, unchanged. An outgoing piece is
zero on the replicas that do not send it, and the combine masks incoming pieces the same way and
sums the replicas' partial combines (`psum` over REP), so the gradients are exact whichever
replica carries a piece.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from maxjax import compression, model
from maxjax.config import Config
from maxjax.model import decode, ops
from maxjax.model.transformer import compute_dtype, group_capacity
from maxjax.parallel import vocab
from maxjax.parallel.ma.layout import (
    CACHE,
    INCOMING,
    OUTGOING,
    POOL,
    QKV,
    REP,
    SEQ,
    TOKENS,
    ParamLayout,
    TokenSplit,
)
from maxjax.parallel.mesh import EXPERT_AXIS
from maxjax.parallel.runner import Tree, map_with_path


class TokenState(NamedTuple):
    """What a micro-batch carries from one attention stage to the next (all [b, S, ...], P(SEQ)).

    `h` is the residual stream after attention; the rest is the routing that the next stage's
    combine needs (experts as rows in expert-device order)."""

    h: jax.Array  # [b, S, M] float32
    gates: jax.Array  # [b, S, k] float32
    expert_row: jax.Array  # [b, S, k] int32
    position: jax.Array  # [b, S, k] int32
    keep: jax.Array  # [b, S, k] bool


class LayerConstants(NamedTuple):
    """A layer's attention-stage inputs that are not activations or weights: which head slots
    are real, and where each expert lives (the placement, an argument so that re-placing the
    experts recompiles nothing)."""

    head_mask: jax.Array  # [A * n_max] float32, P(POOL)
    row_of_expert: jax.Array  # [E] int32, replicated: the row (device order) of each expert


CONSTANTS = LayerConstants(P(POOL), P())


class LayerOutputs(NamedTuple):
    """An attention stage's differentiable outputs."""

    h: jax.Array
    pieces: tuple  # one per expert device: float32 [R, E/J, b, C, M]
    gates: jax.Array
    objective: jax.Array  # weighted auxiliary losses of this layer (a scalar)


class LayerExtras(NamedTuple):
    """An attention stage's outputs that carry no gradient."""

    expert_row: jax.Array
    position: jax.Array
    keep: jax.Array
    aux: ops.RoutingAux
    cache: decode.KVCache | None


@jax.tree_util.register_pytree_node_class
class SavedVJP:
    """A stage's VJP without the residuals that are its own parameters.

    `jax.vjp` keeps the weights a stage multiplies by among its residuals; returned from the
    forward program they would be copied out once per layer and micro-batch (for the expert
    stage, all of the device's expert weights: the largest copy of a small-batch step). The
    backward program is handed the parameters again and puts them back (`restore`). Which
    residual is which parameter leaf is found by identity while tracing and kept as static
    data, so it is part of the backward program's signature."""

    def __init__(self, saved: list, treedef: Any, from_params: tuple[int | None, ...]):
        self.saved, self.treedef, self.from_params = saved, treedef, from_params

    @classmethod
    def of(cls, vjp: Callable, params: Tree) -> SavedVJP:
        position = {id(x): n for n, x in enumerate(jax.tree.leaves(params))}
        leaves, treedef = jax.tree.flatten(vjp)
        from_params = tuple(position.get(id(x)) for x in leaves)
        saved = [x for x, n in zip(leaves, from_params, strict=True) if n is None]
        return cls(saved, treedef, from_params)

    def restore(self, params: Tree) -> Callable:
        """The VJP, given the parameters the forward program was called with."""
        param_leaves = jax.tree.leaves(params)
        saved = iter(self.saved)
        leaves = [next(saved) if n is None else param_leaves[n] for n in self.from_params]
        return jax.tree.unflatten(self.treedef, leaves)

    def tree_flatten(self) -> tuple[list, tuple]:
        return self.saved, (self.treedef, self.from_params)

    @classmethod
    def tree_unflatten(cls, aux: tuple, saved: Any) -> SavedVJP:
        return cls(list(saved), *aux)


def attention_part(layer: Tree) -> Tree:
    """A layer's subtree without its expert weights."""
    return {k: ({"router": v["router"]} if k == "moe" else v) for k, v in layer.items()}


def head_part(params: Tree) -> Tree:
    return {"final_norm": params["final_norm"], "lm_head": params["lm_head"]}


def reduce_to_tokens(partial: jax.Array) -> jax.Array:
    """Sum per-device partials [b, S, M] over the pool onto this device's sequence shard."""
    return lax.psum(lax.psum_scatter(partial, SEQ, scatter_dimension=0, tiled=True), REP)


class StagePrograms:
    """The jitted stage programs of one token split (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        layout: ParamLayout,
        split: TokenSplit,
        attention_mesh: Mesh,
        expert_mesh: Mesh,
        compress: bool,
    ):
        self.cfg = cfg
        self.layout = layout
        self.split = split
        self.mesh = attention_mesh
        self.expert_mesh = expert_mesh
        self.compress = compress
        self.dtype = compute_dtype(cfg)
        self.inference_cfg = decode.inference_config(cfg)
        self.expert_rows = layout.experts.num_rows  # experts and empty slots
        self.experts_per_device = self.expert_rows // split.expert_devices
        self._build()

    # --- wire format -----------------------------------------------------------------------------

    def encode(self, x: jax.Array) -> Any:
        return compression.pack_int8(*compression.quantize_int8(x)) if self.compress else x

    def decode_wire(self, wire: Any) -> jax.Array:
        if not self.compress:
            return wire
        return compression.dequantize_int8(*compression.unpack_int8(wire), jnp.float32)

    # --- per-device bodies -----------------------------------------------------------------------

    def _is_sender(self, expert_device: int) -> jax.Array | bool:
        if self.split.replicas == 1:
            return True
        return lax.axis_index(REP) == self.split.sender(expert_device)

    def _pieces(self, buffer: jax.Array) -> tuple[jax.Array, ...]:
        """Cut this shard's buffer [E, b/G, C, M] into one [1, E/J, ...] piece per expert device,
        zero on the replicas that do not send it."""
        n = self.experts_per_device
        return tuple(
            jnp.where(self._is_sender(j), buffer[j * n : (j + 1) * n], 0.0)[None]
            for j in range(self.split.expert_devices)
        )

    def _combine(self, state: TokenState, received: tuple[jax.Array, ...]) -> jax.Array:
        """h + the gate-weighted expert outputs of this shard's tokens (received pieces, each
        counted on the replica that received it, summed over REP). With replicas, each choice's
        term is summed over REP before the terms are added: every term comes from one replica,
        so the sums are exact and the result does not depend on which replica received which
        expert's piece (the expert placement), at k times the bytes of summing the partial
        combines."""
        out = jnp.concatenate(
            [jnp.where(self._is_sender(j), piece[0], 0.0) for j, piece in enumerate(received)]
        )
        routing = ops.Routing(None, state.expert_row, state.gates, state.position, state.keep)
        if self.split.replicas == 1:
            return state.h + ops.combine(out, routing)
        return state.h + jnp.sum(lax.psum(ops.combine_terms(out, routing), REP), axis=2)

    def _layer(
        self,
        layer: Tree,
        x: jax.Array,
        constants: LayerConstants,
        cache: decode.KVCache | None = None,
        start: jax.Array | None = None,
    ) -> tuple[LayerOutputs, LayerExtras]:
        """Attention of this device's heads over the whole micro-batch, then route and dispatch
        this device's sequence shard. x: [b/G, S, M]. With `cache` (this device's keys and values
        [b, T, n_max, D]) and `start`, x sits at positions start.. (decoding, dropless routing)."""
        seq, head_mask = x.shape[1], constants.head_mask
        att = layer["attention"]
        weights = ops.AttentionWeights(*(att[name]["kernel"] for name in (*QKV, "out")))
        head_dim = self.layout.heads.head_dim
        normed = lax.all_gather(
            ops.rms_norm(ops.varying_over(x, POOL), layer["attention_norm"]["scale"]),
            SEQ,
            axis=0,
            tiled=True,
        )
        if cache is None:
            positions = jnp.arange(seq, dtype=jnp.int32)
            partial = ops.self_attention(
                normed, weights, head_dim, positions, self.dtype, head_mask
            )
            capacity = group_capacity(self.cfg, seq)
        else:
            partial, cache = decode.attention_with_cache(
                normed, weights, head_dim, cache, start, self.dtype, head_mask
            )
            capacity = group_capacity(self.inference_cfg, seq)
        h = x + reduce_to_tokens(partial)
        z = ops.rms_norm(h, layer["moe_norm"]["scale"])
        r = ops.route(z, layer["moe"]["router"]["kernel"], self.cfg.moe.top_k, capacity)
        aux = jax.tree.map(lambda a: lax.pmean(a, SEQ), ops.routing_aux(r))
        rows = constants.row_of_expert[r.expert_index]
        buffer = ops.dispatch(z, r._replace(expert_index=rows), capacity, self.expert_rows)
        objective = (
            self.cfg.moe.load_balancing_loss * aux.load_balancing_loss
            + self.cfg.moe.router_z_loss * aux.router_z_loss
        )
        outputs = LayerOutputs(h, self._pieces(buffer), r.gates, objective)
        return outputs, LayerExtras(rows, r.position, r.keep, aux, cache)

    def _embed(self, embed: Tree, tokens: jax.Array) -> jax.Array:
        partial = vocab.embed_partial(embed["embedding"], tokens, POOL)
        return reduce_to_tokens(partial)

    def _head_logits(self, head: Tree, x: jax.Array) -> jax.Array:
        """This device's vocabulary columns of the logits of the whole micro-batch."""
        z = ops.rms_norm(ops.varying_over(x, POOL), head["final_norm"]["scale"])
        z = lax.all_gather(z, SEQ, axis=0, tiled=True)
        return ops.matmul("bsm,mv->bsv", z, head["lm_head"]["kernel"], self.dtype)

    def _head_loss(self, head: Tree, x: jax.Array, targets: jax.Array) -> jax.Array:
        logits = self._head_logits(head, x)
        total = vocab.cross_entropy_sum(logits, targets, self.layout.vocab_size, POOL)
        return total / targets.size

    def _experts(
        self,
        experts: Tree,
        inputs: tuple[jax.Array, ...],
        expert_ids: jax.Array,
        sequence_ids: jax.Array,
        key: jax.Array | None,
        decoding: bool = False,
    ) -> tuple[jax.Array, ...]:
        """This expert device's FFNs on the pieces of every sequence shard, [1, E/J, b/G, C, M]
        each, returned as pieces of the same shapes. With `ma_separation.expert_compute`
        'filled_slots' only the slots in use are computed (`ops.expert_ffn_filled_slots`,
        tiles of about a quarter of an expert's capacity rows), so the device's work follows
        the tokens its experts serve; 'capacity': every slot (`ops.expert_ffn`). `decoding`
        (dropless routing: capacity = sequence length, no dropout): filled slots, tiles of a
        balanced expert's rows."""
        buffer = jnp.concatenate([x[0] for x in inputs], axis=1)
        _, seqs, capacity, _ = buffer.shape
        wi, wo = experts["wi"], experts["wo"]
        dropout = (key, self.cfg.moe.expert_dropout, expert_ids, sequence_ids)
        if decoding:
            tile = decode.decode_tile_rows(self.cfg, seqs * capacity)
            out = ops.expert_ffn_filled_slots(buffer, wi, wo, tile, self.dtype)
        elif self.cfg.ma_separation.expert_compute == "filled_slots":
            tile = training_tile_rows(seqs * capacity)
            out = ops.expert_ffn_filled_slots(buffer, wi, wo, tile, self.dtype, *dropout)
        else:
            out = ops.expert_ffn(buffer, wi, wo, self.dtype, *dropout)
        return tuple(
            out[None, :, i * x.shape[2] : (i + 1) * x.shape[2]] for i, x in enumerate(inputs)
        )

    # --- stage functions on global arrays --------------------------------------------------------

    def _specs(self, tree: Tree, prefix: tuple[str, ...] = ()) -> Tree:
        return map_with_path(lambda p, _: self.layout.stage_spec_of((*prefix, *p)), tree)

    def _on_pool(self, body: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True
        )

    def _layer_out_specs(self, decoding: bool) -> Any:
        outputs = LayerOutputs(TOKENS, (OUTGOING,) * self.split.expert_devices, TOKENS, P())
        extras = LayerExtras(TOKENS, TOKENS, TOKENS, P(), CACHE if decoding else None)
        return outputs, extras

    def first_stage(self, embed, layer, tokens, constants, cache=None, start=None):
        """Layer 0: embedding lookup (vocabulary-split, reduce-scattered onto the sequence
        shards), attention, route, dispatch. tokens [b, S] are replicated."""

        def body(embed, layer, tokens, constants, cache, start):
            return self._layer(layer, self._embed(embed, tokens), constants, cache, start)

        specs = (
            self._specs(embed, ("embed",)),
            self._specs(layer, ("layers", "0")),
            P(),
            CONSTANTS,
            CACHE,
            P(),
        )
        out_specs = self._layer_out_specs(cache is not None)
        return self._on_pool(body, specs, out_specs)(embed, layer, tokens, constants, cache, start)

    def middle_stage(self, layer, state, received, constants, cache=None, start=None):
        """Layer l > 0: combine layer l-1's expert outputs, then as `first_stage`."""

        def body(layer, state, received, constants, cache, start):
            x = self._combine(state, received)
            return self._layer(layer, x, constants, cache, start)

        specs = (
            self._specs(layer, ("layers", "0")),
            TokenState(*(TOKENS,) * 5),
            (OUTGOING,) * self.split.expert_devices,
            CONSTANTS,
            CACHE,
            P(),
        )
        out_specs = self._layer_out_specs(cache is not None)
        return self._on_pool(body, specs, out_specs)(
            layer, state, received, constants, cache, start
        )

    def head_loss(self, head, state, received, targets):
        """Combine the last layer, final norm, LM head, mean cross-entropy (vocabulary-split)."""

        def body(head, state, received, targets):
            return self._head_loss(head, self._combine(state, received), targets)

        specs = (
            self._specs(head),
            TokenState(*(TOKENS,) * 5),
            (OUTGOING,) * self.split.expert_devices,
            P(),
        )
        return self._on_pool(body, specs, P())(head, state, received, targets)

    def head_logits(self, head, state, received):
        def body(head, state, received):
            return self._head_logits(head, self._combine(state, received))

        specs = (
            self._specs(head),
            TokenState(*(TOKENS,) * 5),
            (OUTGOING,) * self.split.expert_devices,
        )
        logits = self._on_pool(body, specs, P(None, None, POOL))(head, state, received)
        return logits[..., : self.layout.vocab_size]

    def expert_stage(self, experts, inputs, expert_ids, sequence_ids, key, decoding=False):
        specs = (P(EXPERT_AXIS), (INCOMING,) * len(inputs), P(EXPERT_AXIS), P(), P())
        return jax.shard_map(
            functools.partial(self._experts, decoding=decoding),
            mesh=self.expert_mesh,
            in_specs=specs,
            out_specs=(INCOMING,) * len(inputs),
            check_vma=True,
        )(experts, inputs, expert_ids, sequence_ids, key)

    # --- programs --------------------------------------------------------------------------------

    def _build(self) -> None:
        """Forward programs (inference, decoding), forward-with-VJP programs and backward
        programs. Wire pieces are int8 rows with their scales packed in (`compression.pack_int8`)
        when compressing; cotangents stay float32."""
        enc, dec = self.encode, self.decode_wire

        def wire_out(outputs: LayerOutputs) -> LayerOutputs:
            return outputs._replace(pieces=tuple(enc(p) for p in outputs.pieces))

        def received_in(wires: tuple) -> tuple:
            return tuple(dec(w) for w in wires)

        def state_of(outputs: LayerOutputs, extras: LayerExtras) -> TokenState:
            return TokenState(
                outputs.h, outputs.gates, extras.expert_row, extras.position, extras.keep
            )

        def first(embed, layer, tokens, constants, cache=None, start=None):
            outputs, extras = self.first_stage(embed, layer, tokens, constants, cache, start)
            outputs = wire_out(outputs)
            return state_of(outputs, extras), outputs.pieces, extras.aux, extras.cache

        def middle(layer, state, wires, constants, cache=None, start=None):
            outputs, extras = self.middle_stage(
                layer, state, received_in(wires), constants, cache, start
            )
            outputs = wire_out(outputs)
            return state_of(outputs, extras), outputs.pieces, extras.aux, extras.cache

        def experts(params, wires, expert_ids, sequence_ids, rng, depth):
            key = None if rng is None else jax.random.fold_in(rng, depth)
            out = self.expert_stage(params, received_in(wires), expert_ids, sequence_ids, key)
            return tuple(enc(x) for x in out)

        def decode_experts(params, wires, expert_ids, sequence_ids, rng, depth):
            del rng, depth
            inputs = received_in(wires)
            out = self.expert_stage(params, inputs, expert_ids, sequence_ids, None, True)
            return tuple(enc(x) for x in out)

        def logits(head, state, wires):
            return self.head_logits(head, state, received_in(wires))

        def lm_loss(head, state, wires, targets):
            return self.head_loss(head, state, received_in(wires), targets)

        def last_logits(head, state, wires):
            """Logits [b, V] of the last position only (decoding)."""
            last = jax.tree.map(lambda x: x[:, -1:], state)
            return self.head_logits(head, last, received_in(wires))[:, 0]

        def first_vjp(embed, layer, tokens, constants):
            fn = lambda e, lp: self.first_stage(e, lp, tokens, constants)
            outputs, vjp, extras = jax.vjp(fn, embed, layer, has_aux=True)
            outputs = wire_out(outputs)
            saved = SavedVJP.of(vjp, (embed, layer))
            return (state_of(outputs, extras), outputs.pieces, extras.aux), saved

        def middle_vjp(layer, state, wires, constants):
            ints = state._replace(h=None, gates=None)

            def fn(lp, h, gates, received):
                full = ints._replace(h=h, gates=gates)
                return self.middle_stage(lp, full, received, constants)

            outputs, vjp, extras = jax.vjp(
                fn, layer, state.h, state.gates, received_in(wires), has_aux=True
            )
            outputs = wire_out(outputs)
            return (state_of(outputs, extras), outputs.pieces, extras.aux), SavedVJP.of(vjp, layer)

        def experts_vjp(params, wires, expert_ids, sequence_ids, rng, depth):
            key = None if rng is None else jax.random.fold_in(rng, depth)
            fn = lambda p, x: self.expert_stage(p, x, expert_ids, sequence_ids, key)
            out, vjp = jax.vjp(fn, params, received_in(wires))
            return tuple(enc(x) for x in out), SavedVJP.of(vjp, params)

        def head_step(head, state, wires, targets, loss_weight, acc):
            """Head forward and backward in one program (its cotangent is known: the loss
            weight): LM loss, head grads summed into `acc`, cotangents of (h, gates, received)."""
            ints = state._replace(h=None, gates=None)

            def fn(hp, h, gates, received):
                return self.head_loss(hp, ints._replace(h=h, gates=gates), received, targets)

            loss, vjp = jax.vjp(fn, head, state.h, state.gates, received_in(wires))
            grads = vjp(loss_weight)
            return loss, _accumulate(acc, grads[0]), grads[1:]

        def layer_backward(saved, layer, d_h, d_pieces, d_gates, aux_weight, acc):
            outputs = LayerOutputs(d_h, d_pieces, d_gates, aux_weight)
            grads = saved.restore(layer)(outputs)
            return _accumulate(acc, grads[0]), grads[1:]

        def first_backward(saved, params, d_h, d_pieces, d_gates, aux_weight, acc):
            vjp = saved.restore(params)
            return _accumulate(acc, vjp(LayerOutputs(d_h, d_pieces, d_gates, aux_weight)))

        def experts_backward(saved, params, d_out, acc):
            d_params, d_in = saved.restore(params)(d_out)
            return _accumulate(acc, d_params), d_in

        # With gradient checkpointing the forward sweep keeps only each stage's inputs; these
        # programs run the stage's forward again (its VJP) and apply it, in one program.
        def first_recompute(embed, layer, tokens, constants, d_h, d_pieces, d_gates, w, acc):
            _, saved = first_vjp(embed, layer, tokens, constants)
            return first_backward(saved, (embed, layer), d_h, d_pieces, d_gates, w, acc)

        def middle_recompute(layer, state, wires, constants, d_h, d_pieces, d_gates, w, acc):
            _, saved = middle_vjp(layer, state, wires, constants)
            return layer_backward(saved, layer, d_h, d_pieces, d_gates, w, acc)

        def experts_recompute(params, wires, expert_ids, sequence_ids, rng, depth, d_out, acc):
            _, saved = experts_vjp(params, wires, expert_ids, sequence_ids, rng, depth)
            return experts_backward(saved, params, d_out, acc)

        # Decoding hands each layer's KV cache in and takes the updated one back: donated, so
        # the cache is held once, not twice, while a step runs.
        self.first = jax.jit(first, donate_argnums=(4,))
        self.middle = jax.jit(middle, donate_argnums=(4,))
        self.experts = jax.jit(experts)
        self.decode_experts = jax.jit(decode_experts)
        self.logits = jax.jit(logits)
        self.lm_loss = jax.jit(lm_loss)
        self.last_logits = jax.jit(last_logits)
        self.first_vjp = jax.jit(first_vjp)
        self.middle_vjp = jax.jit(middle_vjp)
        self.experts_vjp = jax.jit(experts_vjp)
        self.head_step = jax.jit(head_step, donate_argnums=(5,))
        self.layer_backward = jax.jit(layer_backward, donate_argnums=(6,))
        self.first_backward = jax.jit(first_backward, donate_argnums=(6,))
        self.experts_backward = jax.jit(experts_backward, donate_argnums=(3,))
        self.first_recompute = jax.jit(first_recompute, donate_argnums=(8,))
        self.middle_recompute = jax.jit(middle_recompute, donate_argnums=(8,))
        self.experts_recompute = jax.jit(experts_recompute, donate_argnums=(7,))


def training_tile_rows(capacity_rows: int) -> int:
    """Tile height of the training expert stage for experts of `capacity_rows` slots each: the
    largest power of two up to a quarter of them, in [1, 1024], so that a full expert takes about
    four tiles (few loop iterations), a cold one none or one."""
    quarter = max(1, capacity_rows // 4)
    return int(min(1024, 1 << (quarter.bit_length() - 1)))


def _accumulate(acc: Tree | None, grads: Tree) -> Tree:
    return grads if acc is None else jax.tree.map(jnp.add, acc, grads)


def summarize(
    cfg: Config, lm_losses: list[jax.Array], aux_by_layer: list[list[ops.RoutingAux]]
) -> dict[str, jax.Array]:
    """The metrics of `model.loss_terms` from per-micro-batch LM losses and each layer's aux
    terms (one per micro-batch)."""
    aux = ops.combine_layers([ops.mean_of(terms) for terms in aux_by_layer])
    lm = jnp.mean(jnp.stack(lm_losses))
    return model.loss_from_parts(cfg, lm, aux)[1]
