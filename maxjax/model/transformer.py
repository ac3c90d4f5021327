"""The MoE transformer as Flax NNX modules (the single-device reference of every strategy).

Decoder-only, pre-norm (RMSNorm), rotary positions, causal attention, and an MoE feed-forward
in every layer. The modules hold parameters and call the pure functions of `maxjax.model.ops`.

Initialisation is per *unit*: each expert of wi / wo, each head's columns of the query, key and
value kernels and rows of the output kernel, and each token's row of the embedding and column of
the LM head is drawn from its own key, ``fold_in(leaf key, unit id)``. A unit's values therefore
depend only on the seed and its id, so a strategy builds exactly the units its device holds, in
its own order and with its own padding (`InitUnits`), without generating the rest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxjax import routing
from maxjax.config import Config
from maxjax.model import ops


def compute_dtype(cfg: Config) -> jnp.dtype:
    """Matmul dtype from `training.dtype` (parameters always stay float32)."""
    return jnp.bfloat16 if cfg.training.dtype == "bfloat16" else jnp.float32


def group_capacity(cfg: Config, group_tokens: int) -> int:
    """Expert capacity for one routing group (one sequence of `group_tokens` tokens)."""
    return routing.expert_capacity(
        group_tokens, cfg.moe.experts_per_layer, cfg.moe.top_k, cfg.moe.capacity_factor
    )


class InitUnits(NamedTuple):
    """Which units of the per-unit parameters to build, in which order (None: all, in order).

    experts: the expert id of every row of wi / wo; heads: the head id of every slot of the
    query/key/value columns and output rows (-1: a zero slot); vocab: the token id of every row
    of the embedding and column of the LM head (>= vocab size: a zero row). An empty array builds
    none of them.
    """

    experts: Any = None
    heads: Any = None
    vocab: Any = None


UNIT_BATCH_ELEMENTS = 1 << 18
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def unit_blocks(
    init: Initializer, key: jax.Array, ids: Any, count: int, unit_shape: tuple[int, ...]
) -> jax.Array:
    """[len(ids), *unit_shape]: block i drawn by `init` from fold_in(key, ids[i]); ids outside
    0..count-1 give zero blocks (padding). ids=None means 0..count-1.

    The blocks are drawn in equal batches of at most UNIT_BATCH_ELEMENTS values (or one block),
    written in place, so the temporaries of a draw stay that small however large the leaf."""
    ids = jnp.arange(count, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)

    def draw(i: jax.Array) -> jax.Array:
        block = init(jax.random.fold_in(key, jnp.clip(i, 0, count - 1)), unit_shape, jnp.float32)
        return jnp.where((i >= 0) & (i < count), block, 0.0)

    if ids.shape[0] == 0:
        return jnp.zeros((0, *unit_shape), jnp.float32)
    most = max(1, UNIT_BATCH_ELEMENTS // math.prod(unit_shape))
    batch = max(d for d in range(1, min(most, ids.shape[0]) + 1) if ids.shape[0] % d == 0)
    return jax.lax.map(draw, ids, batch_size=batch)


def head_columns(init: Initializer, ids: Any, heads: int, head_dim: int) -> Initializer:
    """A kernel [M, n*D] whose column block j is the head ids[j] (query, key, value)."""

    def build(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        blocks = unit_blocks(init, key, ids, heads, (shape[0], head_dim))  # [n, M, D]
        return blocks.transpose(1, 0, 2).reshape(shape[0], -1).astype(dtype)

    return build


def head_rows(init: Initializer, ids: Any, heads: int, head_dim: int) -> Initializer:
    """A kernel [n*D, M] whose row block j is the head ids[j] (the output projection)."""

    def build(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        blocks = unit_blocks(init, key, ids, heads, (head_dim, shape[1]))  # [n, D, M]
        return blocks.reshape(-1, shape[1]).astype(dtype)

    return build


def vocab_rows(init: Initializer, ids: Any, vocab: int) -> Initializer:
    """A table [n, M] whose row j is the token ids[j] (the embedding)."""

    def build(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return unit_blocks(init, key, ids, vocab, (shape[1],)).astype(dtype)

    return build


def vocab_columns(init: Initializer, ids: Any, vocab: int) -> Initializer:
    """A kernel [M, n] whose column j is the token ids[j] (the LM head); each column is drawn as
    an [M, 1] block so that fan-in based initializers see the kernel's fan-in M."""

    def build(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        blocks = unit_blocks(init, key, ids, vocab, (shape[0], 1))  # [n, M, 1]
        return blocks[..., 0].T.astype(dtype)

    return build


class RMSNorm(nnx.Module):
    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.rms_norm(x, self.scale[...])


class Attention(nnx.Module):
    """Multi-head causal self-attention; projections [M, N*D] and [N*D, M], no biases."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, units: InitUnits = InitUnits()):
        m = cfg.model
        heads, width = m.attention_heads, m.attention_heads * m.head_dim
        if units.heads is not None:
            width = len(units.heads) * m.head_dim
        lecun = nnx.initializers.lecun_normal()
        columns = head_columns(lecun, units.heads, heads, m.head_dim)
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.query = linear(m.hidden_dim, width, kernel_init=columns)
        self.key = linear(m.hidden_dim, width, kernel_init=columns)
        self.value = linear(m.hidden_dim, width, kernel_init=columns)
        # A head's [D, M] block of rows has 1/heads of the kernel's fan-in N*D.
        rows_init = nnx.initializers.variance_scaling(1.0 / heads, "fan_in", "truncated_normal")
        self.out = linear(
            width, m.hidden_dim, kernel_init=head_rows(rows_init, units.heads, heads, m.head_dim)
        )
        self.head_dim = m.head_dim
        self.dtype = compute_dtype(cfg)

    def weights(self) -> ops.AttentionWeights:
        return ops.AttentionWeights(
            self.query.kernel[...],
            self.key.kernel[...],
            self.value.kernel[...],
            self.out.kernel[...],
        )

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return ops.self_attention(x, self.weights(), self.head_dim, positions, self.dtype)


class Router(nnx.Module):
    """Bias-free linear map hidden -> expert logits (computed in float32)."""

    def __init__(self, hidden_dim: int, num_experts: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.kernel = nnx.Param(init(rngs.params(), (hidden_dim, num_experts), jnp.float32))


class Experts(nnx.Module):
    """E expert FFNs stacked: wi[E, M, H], wo[E, H, M] (the experts `ids`, default all)."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        expert_hidden: int,
        *,
        rngs: nnx.Rngs,
        ids: Any = None,
    ):
        init_in = nnx.initializers.normal(stddev=hidden_dim**-0.5)
        init_out = nnx.initializers.normal(stddev=expert_hidden**-0.5)
        shape_in, shape_out = (hidden_dim, expert_hidden), (expert_hidden, hidden_dim)
        self.wi = nnx.Param(unit_blocks(init_in, rngs.params(), ids, num_experts, shape_in))
        self.wo = nnx.Param(unit_blocks(init_out, rngs.params(), ids, num_experts, shape_out))


class MoE(nnx.Module):
    """Top-k routed mixture of expert FFNs with per-sequence capacity."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, units: InitUnits = InitUnits()):
        self.cfg = cfg
        self.router = Router(cfg.model.hidden_dim, cfg.moe.experts_per_layer, rngs=rngs)
        self.experts = Experts(
            cfg.moe.experts_per_layer,
            cfg.model.hidden_dim,
            cfg.moe.expert_hidden_dim,
            rngs=rngs,
            ids=units.experts,
        )

    def __call__(
        self, x: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, ops.RoutingAux]:
        capacity = group_capacity(self.cfg, x.shape[1])
        r = ops.route(x, self.router.kernel[...], self.cfg.moe.top_k, capacity)
        buffers = ops.dispatch(x, r, capacity)
        out = ops.expert_ffn(
            buffers,
            self.experts.wi[...],
            self.experts.wo[...],
            compute_dtype(self.cfg),
            dropout_key,
            self.cfg.moe.expert_dropout,
        )
        return ops.combine(out, r), ops.routing_aux(r)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, units: InitUnits = InitUnits()):
        self.attention_norm = RMSNorm(cfg.model.hidden_dim)
        self.attention = Attention(cfg, rngs=rngs, units=units)
        self.moe_norm = RMSNorm(cfg.model.hidden_dim)
        self.moe = MoE(cfg, rngs=rngs, units=units)

    def __call__(
        self, x: jax.Array, positions: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, ops.RoutingAux]:
        h = x + self.attention(self.attention_norm(x), positions)
        y, aux = self.moe(self.moe_norm(h), dropout_key)
        return h + y, aux


def _call_layer(
    layer: DecoderLayer, x: jax.Array, positions: jax.Array, key: jax.Array | None
) -> tuple[jax.Array, ops.RoutingAux]:
    return layer(x, positions, key)


class MoETransformer(nnx.Module):
    """Decoder-only MoE transformer; `model(tokens[B, S])` -> (logits[B, S, V], aux)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, units: InitUnits = InitUnits()):
        self.cfg = cfg
        m = cfg.model
        vocab = cfg.training.vocab_size
        rows = vocab if units.vocab is None else len(units.vocab)
        self.embed = nnx.Embed(
            rows,
            m.hidden_dim,
            embedding_init=vocab_rows(nnx.initializers.normal(stddev=0.02), units.vocab, vocab),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, units=units) for _ in range(m.layers)])
        self.final_norm = RMSNorm(m.hidden_dim)
        self.lm_head = nnx.Linear(
            m.hidden_dim,
            rows,
            use_bias=False,
            kernel_init=vocab_columns(nnx.initializers.lecun_normal(), units.vocab, vocab),
            rngs=rngs,
        )

    def __call__(
        self,
        tokens: jax.Array,
        deterministic: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, ops.RoutingAux]:
        if not deterministic and dropout_key is None and self.cfg.moe.expert_dropout > 0:
            raise ValueError("training mode (deterministic=False) needs a dropout_key")
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        x = self.embed.embedding[...][tokens].astype(jnp.float32)
        per_layer = []
        run_layer = _call_layer
        if self.cfg.training.gradient_checkpointing:
            run_layer = nnx.remat(_call_layer)
        for i, layer in enumerate(self.layers):
            key = None if deterministic else jax.random.fold_in(dropout_key, i)
            x, aux = run_layer(layer, x, positions, key)
            per_layer.append(aux)
        x = self.final_norm(x)
        logits = ops.matmul("bsm,mv->bsv", x, self.lm_head.kernel[...], compute_dtype(self.cfg))
        return logits, ops.combine_layers(per_layer)


Params = dict[str, Any]


def init_params(cfg: Config, seed: int, units: InitUnits = InitUnits()) -> Params:
    """Parameters of `MoETransformer(cfg, rngs=nnx.Rngs(seed))` as a nested dict of arrays.

    With `units`, the per-unit leaves hold only those units (experts, head slots, vocabulary
    rows), with the values they have in the full model: a strategy calls this per device, inside
    its own program, to build only its shards.
    """
    model = MoETransformer(cfg, rngs=nnx.Rngs(seed), units=units)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: Config) -> Params:
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), allocating nothing."""
    return jax.eval_shape(lambda: init_params(cfg, 0))


@functools.lru_cache(maxsize=8)
def _skeleton(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0))))


def bind(cfg: Config, params: Params) -> MoETransformer:
    """A model module whose parameters are the arrays of `params` (nothing is copied)."""
    graphdef, abstract_state = _skeleton(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def apply(
    cfg: Config,
    params: Params,
    tokens: jax.Array,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, ops.RoutingAux]:
    """Pure forward pass: (logits, aux) of the model with `params`; dropout iff a key is given."""
    model = bind(cfg, params)
    return model(tokens, deterministic=dropout_key is None, dropout_key=dropout_key)


def loss_from_parts(
    cfg: Config, lm_loss: jax.Array, aux: ops.RoutingAux
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and the training metrics from the LM loss and the aux terms combined over
    layers (`ops.combine_layers`): `expert_fraction` [E] is the mean over layers,
    `expert_fraction_by_layer` [L, E] each layer's, `expert_kept_fraction_by_layer` [L, E] the
    share of the assignments each expert kept within its capacity (its computed slots).

    Every strategy reports its metrics through this, whatever way it reduced the parts.
    """
    loss = ops.total_loss(lm_loss, aux, cfg.moe.load_balancing_loss, cfg.moe.router_z_loss)
    metrics = {
        "loss": loss,
        "lm_loss": lm_loss,
        "load_balancing_loss": aux.load_balancing_loss,
        "z_loss": aux.router_z_loss,
        "expert_fraction": jnp.mean(aux.expert_fraction, axis=0),
        "expert_fraction_by_layer": aux.expert_fraction,
        "dropped_fraction": aux.dropped_fraction,
        "expert_kept_fraction_by_layer": aux.kept_fraction,
    }
    return loss, metrics


def loss_terms(
    cfg: Config,
    logits: jax.Array,
    aux: ops.RoutingAux,
    targets: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total training loss and its parts from the logits of inputs tokens[:, :-1]."""
    return loss_from_parts(cfg, ops.cross_entropy(logits, targets), aux)


def loss_fn(
    cfg: Config, params: Params, tokens: jax.Array, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token loss (inputs tokens[:, :-1], targets tokens[:, 1:]) plus auxiliary losses."""
    logits, aux = apply(cfg, params, tokens[:, :-1], dropout_key)
    return loss_terms(cfg, logits, aux, tokens[:, 1:])
