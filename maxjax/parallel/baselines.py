"""The Table 1 baselines: tensor (TP), pipeline (PP) and tensor + pipeline parallelism.

All three run one `jax.shard_map` program over the full mesh reshaped to (data, stage, tensor):

- ``tp``: TP x DP over (data, 1, tensor); ``pp``: PP x DP over (data, stage, 1);
  ``tp_pp``: TP x PP x DP over all three. Degrees come from `cfg.baselines`; data parallelism
  takes the remaining devices.
- Tensor parallelism (Megatron style): every device of a tensor group holds an even share of the
  heads (query/key/value columns and output-projection rows); the partial outputs are reduced with
  a psum over 'tensor'.
- Experts are expert-parallel inside the tensor group: each device holds E / tp experts of every
  layer. All devices of the group see the same tokens (the attention psum replicates them), route
  them identically, run their own experts on their buffers, and the combine is a psum over
  'tensor' of each device's partial combine. With replicated tokens this psum moves the same
  bytes as an all_to_all of the buffers there and back, and needs no second routing pass.
- Pipeline parallelism (GPipe): layers are cut into `stage` stages of equal depth. The local batch
  is cut into `baselines.microbatches` micro-batches that enter stage 0 one per tick; activations
  move to the next stage with a ppermute over 'stage'. All forward micro-batches run first, then
  the backward pass (jax.grad through the unrolled schedule) runs them in reverse. Ticks where a
  stage has no micro-batch (the bubble) compute on zeros and are masked out.
- With ``training.gradient_checkpointing`` every decoder layer is a `jax.checkpoint`: the
  backward pass keeps only each layer's input and computes the layer again.
- Embedding and lm_head are vocabulary-parallel over the stage x tensor devices of a data replica
  (rows / columns padded to a multiple of their count): lookups are psum'd, the cross-entropy
  uses a psum'd log-sum-exp. This keeps their memory divided like the layers' rather than holding
  the 50k-row tables whole on the first and last stage.

Parameter layout (the canonical tree, leaves changed): stage s holds layers s*Ls .. s*Ls+Ls-1.
Leaf `layers[j]` for j < Ls is the stack over stages of layers j, Ls + j, ... ([stage, ...],
sharded over 'stage'); the leaves of layers[j] for j >= Ls are empty placeholders (shape (0,)),
so the tree keeps the canonical keys. `to_canonical` / `from_canonical` undo / apply this.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax import model
from maxjax.config import Config
from maxjax.model import Params, decode, ops
from maxjax.model.transformer import compute_dtype, group_capacity
from maxjax.parallel import vocab
from maxjax.parallel.mesh import require_devices
from maxjax.parallel.runner import Runner, Tree, map_with_path

DATA, STAGE, TENSOR = "data", "stage", "tensor"
VOCAB = (STAGE, TENSOR)
BASELINES = ("tp", "pp", "tp_pp")

LAYER_SPECS: dict[tuple[str, ...], P] = {
    ("attention_norm", "scale"): P(STAGE, None),
    ("attention", "query", "kernel"): P(STAGE, None, TENSOR),
    ("attention", "key", "kernel"): P(STAGE, None, TENSOR),
    ("attention", "value", "kernel"): P(STAGE, None, TENSOR),
    ("attention", "out", "kernel"): P(STAGE, TENSOR, None),
    ("moe_norm", "scale"): P(STAGE, None),
    ("moe", "router", "kernel"): P(STAGE, None, None),
    ("moe", "experts", "wi"): P(STAGE, TENSOR, None, None),
    ("moe", "experts", "wo"): P(STAGE, TENSOR, None, None),
}
CACHE_SPEC = P(STAGE, DATA, None, TENSOR, None)


@dataclasses.dataclass(frozen=True)
class Degrees:
    """Parallel degrees: data x stage x tensor = number of devices."""

    data: int
    stage: int
    tensor: int


def degrees_of(cfg: Config, strategy: str) -> Degrees:
    """TP, PP and the data-parallel degree that fills the rest of `hardware.total_gpus`."""
    if strategy not in BASELINES:
        raise ValueError(f"unknown baseline {strategy!r}; choose one of {', '.join(BASELINES)}")
    tp = cfg.baselines.tensor_parallel if "tp" in strategy.split("_") else 1
    pp = cfg.baselines.pipeline_parallel if "pp" in strategy.split("_") else 1
    total = cfg.hardware.total_gpus
    checks = [
        (total % (tp * pp) == 0, f"{tp * pp} (tp x pp) must divide {total} devices"),
        (cfg.model.attention_heads % tp == 0, f"tp={tp} must divide the heads"),
        (cfg.moe.experts_per_layer % tp == 0, f"tp={tp} must divide the experts"),
        (cfg.model.layers % pp == 0, f"pp={pp} must divide the layers"),
    ]
    for ok, rule in checks:
        if not ok:
            raise ValueError(f"strategy {strategy!r}: {rule}")
    return Degrees(total // (tp * pp), pp, tp)


def baseline_mesh(cfg: Config, degrees: Degrees) -> Mesh:
    """The first `total_gpus` devices as a (data, stage, tensor) mesh; tensor groups adjacent."""
    devices = np.array(require_devices(cfg.hardware.total_gpus), dtype=object)
    return Mesh(devices.reshape(degrees.data, degrees.stage, degrees.tensor), (DATA, STAGE, TENSOR))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the per-device program needs to know (static)."""

    cfg: Config
    degrees: Degrees
    microbatches: int
    vocab: int
    padded_vocab: int
    filled_slots_only: bool = False  # decoding: experts compute only the slots in use

    @property
    def layers_per_stage(self) -> int:
        return self.cfg.model.layers // self.degrees.stage


# --- per-device pieces (run inside shard_map) ------------------------------------------------


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Embeddings [B, S, M] of tokens from this device's rows of the table, psum'd over VOCAB."""
    return lax.psum(vocab.embed_partial(table, tokens, VOCAB), VOCAB)


def lm_head_logits(plan: Plan, params: Params, x: jax.Array) -> jax.Array:
    """This device's vocabulary columns of the logits [B, S, V/shards] (float32)."""
    dtype = compute_dtype(plan.cfg)
    x = ops.rms_norm(x, params["final_norm"]["scale"])
    return ops.matmul("bsm,mv->bsv", x, params["lm_head"]["kernel"], dtype)


def expert_parallel_moe(
    plan: Plan,
    moe: Params,
    x: jax.Array,
    dropout_key: jax.Array | None,
    sequence_ids: jax.Array,
) -> tuple[jax.Array, ops.Routing]:
    """MoE block on x[B, S, M] with this device's E/tp experts; combine psum'd over 'tensor'."""
    cfg = plan.cfg
    capacity = group_capacity(cfg, x.shape[1])
    r = ops.route(x, moe["router"]["kernel"], cfg.moe.top_k, capacity)
    buffers = ops.dispatch(x, r, capacity)  # [E, B, C, M]
    local_experts = moe["experts"]["wi"].shape[0]
    first = lax.axis_index(TENSOR) * local_experts
    local = lax.dynamic_slice_in_dim(buffers, first, local_experts, axis=0)
    wi, wo = moe["experts"]["wi"], moe["experts"]["wo"]
    if plan.filled_slots_only:
        tile = decode.decode_tile_rows(cfg, x.shape[0] * x.shape[1])
        out = ops.expert_ffn_filled_slots(local, wi, wo, tile, compute_dtype(cfg))
    else:
        out = ops.expert_ffn(
            local,
            wi,
            wo,
            compute_dtype(cfg),
            dropout_key,
            cfg.moe.expert_dropout,
            expert_ids=first + jnp.arange(local_experts),
            sequence_ids=sequence_ids,
        )
    placed = lax.dynamic_update_slice_in_dim(jnp.zeros_like(buffers), out, first, axis=0)
    return lax.psum(ops.combine(placed, r), TENSOR), r


def decoder_layer(
    plan: Plan,
    layer: Params,
    x: jax.Array,
    start: jax.Array | int,
    cache: decode.KVCache | None,
    dropout_key: jax.Array | None,
    sequence_ids: jax.Array,
) -> tuple[jax.Array, ops.Routing, decode.KVCache | None]:
    """One layer on x[B, S, M] at positions start..: this device's heads and experts."""
    dtype = compute_dtype(plan.cfg)
    head_dim = plan.cfg.model.head_dim
    normed = ops.rms_norm(x, layer["attention_norm"]["scale"])
    weights = decode.attention_weights(layer)
    if cache is None:
        positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)
        partial = ops.self_attention(normed, weights, head_dim, positions, dtype)
    else:
        partial, cache = decode.attention_with_cache(normed, weights, head_dim, cache, start, dtype)
    h = x + lax.psum(partial, TENSOR)
    y, r = expert_parallel_moe(
        plan, layer["moe"], ops.rms_norm(h, layer["moe_norm"]["scale"]), dropout_key, sequence_ids
    )
    return h + y, r, cache


StageFn = Callable[[jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def gpipe(plan: Plan, stage_fn: StageFn, inputs: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
    """GPipe forward schedule of micro-batches inputs[m] through the stages.

    At tick t, stage s runs micro-batch m = t - s (stage 0 reads inputs[t], the others what the
    previous stage sent at tick t-1). `stage_fn(x, carry, m, valid) -> (y, carry)`; `valid` is
    False in the bubble. Returns the last stage's outputs [m, ...], on every stage, and the carry.
    """
    stages = plan.degrees.stage
    count = inputs.shape[0]
    stage = lax.axis_index(STAGE)
    received = jnp.zeros_like(inputs[0])
    outputs = []
    for tick in range(count + stages - 1):
        micro = tick - stage
        valid = (micro >= 0) & (micro < count)
        x = jnp.where(stage == 0, inputs[min(tick, count - 1)], received)
        y, carry = stage_fn(x, carry, jnp.clip(micro, 0, count - 1), valid)
        if tick >= stages - 1:
            outputs.append(y)
        if stages > 1:
            received = lax.ppermute(y, STAGE, [(i, i + 1) for i in range(stages - 1)])
    final = jnp.stack(outputs)
    if stages > 1:
        final = lax.psum(jnp.where(stage == stages - 1, final, 0.0), STAGE)
    return final, carry


def local_layers(plan: Plan, params: Params) -> list[Params]:
    """This stage's layers, leading stage axis (size 1 locally) removed."""
    keys = sorted(params["layers"], key=int)[: plan.layers_per_stage]
    return [jax.tree.map(lambda x: x[0], params["layers"][k]) for k in keys]


def layer_key(plan: Plan, rng: jax.Array | None, index: int) -> jax.Array | None:
    """Dropout key of this stage's index-th layer: fold_in(rng, global layer number)."""
    if rng is None:
        return None
    return jax.random.fold_in(rng, lax.axis_index(STAGE) * plan.layers_per_stage + index)


def hidden_states(
    plan: Plan, params: Params, tokens: jax.Array, rng: jax.Array | None
) -> tuple[jax.Array, ops.RoutingAux]:
    """Final hidden states [B, S, M] of the local batch and the routing aux summed over sequences
    and this stage's layers (summing over micro-batches; the bubble masked); the expert
    fractions summed per layer, [L, E] with this stage's rows filled."""
    batch, seq = tokens.shape
    count = plan.microbatches
    size = batch // count
    x = embed_lookup(params["embed"]["embedding"], tokens)
    layers = local_layers(plan, params)
    first_sequence = lax.axis_index(DATA) * batch

    def run_layer(layer, x, key, sequence_ids):
        x, r, _ = decoder_layer(plan, layer, x, 0, None, key, sequence_ids)
        return x, r

    if plan.cfg.training.gradient_checkpointing:
        run_layer = jax.checkpoint(run_layer)

    num_layers, num_experts = plan.cfg.model.layers, plan.cfg.moe.experts_per_layer

    def stage_fn(x, aux_sum, micro, valid):
        sequence_ids = first_sequence + micro * size + jnp.arange(size)
        for i, layer in enumerate(layers):
            x, r = run_layer(layer, x, layer_key(plan, rng, i), sequence_ids)
            aux = ops.routing_aux(r)
            row = jax.nn.one_hot(lax.axis_index(STAGE) * plan.layers_per_stage + i, num_layers)
            aux = aux._replace(
                expert_fraction=row[:, None] * aux.expert_fraction[None, :],
                kept_fraction=row[:, None] * aux.kept_fraction[None, :],
            )
            aux = jax.tree.map(lambda a: jnp.where(valid, a * size, 0.0), aux)
            aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        return x, aux_sum

    per_expert = jnp.zeros((num_layers, num_experts), jnp.float32)
    zero = ops.RoutingAux(0.0, 0.0, per_expert, 0.0, per_expert)
    zero = jax.tree.map(jnp.float32, zero)
    hidden, aux_sum = gpipe(plan, stage_fn, x.reshape(count, size, seq, -1), zero)
    return hidden.reshape(batch, seq, -1), aux_sum


def forward_body(plan: Plan, params: Params, tokens: jax.Array) -> jax.Array:
    hidden, _ = hidden_states(plan, params, tokens, None)
    return lm_head_logits(plan, params, hidden)


def loss_body(
    plan: Plan, params: Params, tokens: jax.Array, rng: jax.Array | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of `model.loss_terms`, reduced over every device."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden, aux_sum = hidden_states(plan, params, inputs, rng)
    logits = lm_head_logits(plan, params, hidden)
    global_tokens = targets.size * plan.degrees.data
    lm = lax.psum(vocab.cross_entropy_sum(logits, targets, plan.vocab, VOCAB), DATA) / global_tokens
    sequences = inputs.shape[0] * plan.degrees.data
    per_sequence = jax.tree.map(lambda a: lax.psum(a, (DATA, STAGE)) / sequences, aux_sum)
    # The scalars were summed over layers too; the expert fractions are per layer already.
    aux = jax.tree.map(lambda a: a / plan.cfg.model.layers if a.ndim == 0 else a, per_sequence)
    return model.loss_from_parts(plan.cfg, lm, aux)


def decode_body(
    plan: Plan,
    params: Params,
    tokens: jax.Array,
    caches: list[decode.KVCache],
    start: jax.Array,
) -> tuple[jax.Array, list[decode.KVCache]]:
    """Last-position logits [B, V/shards] of tokens[B, S] at positions start.., caches updated
    (one micro-batch through the stages; a stage keeps its cache unchanged in the bubble)."""
    batch = tokens.shape[0]
    x = embed_lookup(params["embed"]["embedding"], tokens)
    layers = local_layers(plan, params)
    caches = [jax.tree.map(lambda c: c[0], cache) for cache in caches]
    sequence_ids = jnp.arange(batch)

    def stage_fn(x, caches, micro, valid):
        updated = []
        for layer, cache in zip(layers, caches, strict=True):
            x, _, new = decoder_layer(plan, layer, x, start, cache, None, sequence_ids)
            updated.append(jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, cache))
        return x, updated

    hidden, caches = gpipe(plan, stage_fn, x[None], caches)
    logits = lm_head_logits(plan, params, hidden[0][:, -1:])[:, 0]
    return logits, [jax.tree.map(lambda c: c[None], cache) for cache in caches]


# --- the runner --------------------------------------------------------------------------------

STACKED_STAGES = "stacked_stages"


def unstack_stages(tree: Tree, layers_per_stage: int, vocab_size: int) -> Tree:
    """Stage-stacked layout -> single-device layout (traceable; no devices needed)."""
    layers = tree["layers"]
    keys = sorted(layers, key=int)
    out_layers = {}
    for i, key in enumerate(keys):
        stacked = layers[keys[i % layers_per_stage]]
        out_layers[key] = jax.tree.map(lambda x, s=i // layers_per_stage: x[s], stacked)
    return {
        **tree,
        "embed": {"embedding": tree["embed"]["embedding"][:vocab_size]},
        "layers": out_layers,
        "lm_head": {"kernel": tree["lm_head"]["kernel"][:, :vocab_size]},
    }


class BaselineRunner(Runner):
    """TP, PP or TP+PP (each x DP) on the full mesh; see the module docstring for the layout."""

    def __init__(self, cfg: Config, strategy: str):
        super().__init__(cfg)
        self.name = strategy
        self.degrees = degrees_of(cfg, strategy)
        self.mesh = baseline_mesh(cfg, self.degrees)
        shards = self.degrees.stage * self.degrees.tensor
        size = cfg.training.vocab_size
        self.plan = Plan(
            cfg, self.degrees, cfg.baselines.microbatches, size, vocab.padded_size(size, shards)
        )
        self.specs = self._param_specs()
        self.shardings = jax.tree.map(self._named, self.specs)
        self._from_canonical = jax.jit(self._to_layout, out_shardings=self.shardings)
        self._to_canonical_fn = jax.jit(self._to_canonical)
        self._forward = jax.jit(self._forward_fn)
        self._value_and_grad = jax.jit(jax.value_and_grad(self._loss_fn, has_aux=True))
        self._lm_loss = jax.jit(lambda p, t: self._loss_fn(p, t, None)[1]["lm_loss"])
        self._decode_plan = dataclasses.replace(
            self.plan, cfg=decode.inference_config(cfg), microbatches=1, filled_slots_only=True
        )
        self._decode_step = jax.jit(self._decode_fn, donate_argnums=(2,))

    # --- layout ---

    def _named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _param_specs(self) -> Tree:
        stage_layers = self.plan.layers_per_stage

        def spec(path: tuple[str, ...], _leaf: Any) -> P:
            if path[0] == "embed":
                return P(VOCAB, None)
            if path[0] == "lm_head":
                return P(None, VOCAB)
            if path[0] == "layers":
                return LAYER_SPECS[path[2:]] if int(path[1]) < stage_layers else P()
            return P()

        return map_with_path(spec, model.abstract_params(self.cfg))

    def _to_layout(self, tree: Tree) -> Tree:
        """Canonical tree -> stage-stacked layers, vocabulary padded (traceable)."""
        layers = tree["layers"]
        keys = sorted(layers, key=int)
        per_stage = self.plan.layers_per_stage
        out_layers = {}
        for j, key in enumerate(keys):
            if j < per_stage:
                group = [layers[keys[s * per_stage + j]] for s in range(self.degrees.stage)]
                out_layers[key] = jax.tree.map(lambda *xs: jnp.stack(xs), *group)
            else:
                out_layers[key] = jax.tree.map(lambda x: jnp.zeros((0,), x.dtype), layers[key])
        pad = self.plan.padded_vocab - self.plan.vocab
        return {
            **tree,
            "embed": {"embedding": jnp.pad(tree["embed"]["embedding"], ((0, pad), (0, 0)))},
            "layers": out_layers,
            "lm_head": {"kernel": jnp.pad(tree["lm_head"]["kernel"], ((0, 0), (0, pad)))},
        }

    def _to_canonical(self, tree: Tree) -> Tree:
        return unstack_stages(tree, self.plan.layers_per_stage, self.plan.vocab)

    def storage_layout(self) -> dict:
        """Stage-stacked layers and the padded vocabulary (JSON); the tensor split changes no
        shape, so TP, PP and TP x PP share a stored layout when their stages and padding agree."""
        return {
            "kind": STACKED_STAGES,
            "stages": self.degrees.stage,
            "vocab_size": self.plan.vocab,
            "padded_vocab": self.plan.padded_vocab,
        }

    # --- programs ---

    def _shard_map(self, fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def _forward_fn(self, params: Params, tokens: jax.Array) -> jax.Array:
        body = functools.partial(forward_body, self.plan)
        logits = self._shard_map(body, (self.specs, P(DATA, None)), P(DATA, None, VOCAB))(
            params, tokens
        )
        return logits[..., : self.plan.vocab]

    def _loss_fn(self, params: Params, tokens: jax.Array, rng: jax.Array | None):
        body = functools.partial(loss_body, self.plan)
        if rng is None:
            return self._shard_map(lambda p, t: body(p, t, None), (self.specs, P(DATA, None)), P())(
                params, tokens
            )
        return self._shard_map(body, (self.specs, P(DATA, None), P()), P())(params, tokens, rng)

    def _decode_fn(self, params, tokens, caches, start):
        body = functools.partial(decode_body, self._decode_plan)
        cache_specs = [decode.KVCache(CACHE_SPEC, CACHE_SPEC) for _ in caches]
        logits, caches = self._shard_map(
            body,
            (self.specs, P(DATA, None), cache_specs, P()),
            (P(DATA, VOCAB), cache_specs),
        )(params, tokens, caches, start)
        return logits[:, : self.plan.vocab], caches

    def _check_batch(self, batch: int) -> None:
        if batch % (self.degrees.data * self.plan.microbatches):
            raise ValueError(
                f"strategy {self.name!r}: batch {batch} must be a multiple of data parallelism "
                f"{self.degrees.data} x micro-batches {self.plan.microbatches}"
            )

    # --- Runner interface ---

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs (with shardings) of this layout's parameters; allocates nothing."""
        shapes = jax.eval_shape(self._to_layout, model.abstract_params(self.cfg))
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            shapes,
            self.shardings,
        )

    def init(self, seed: int) -> Params:
        """`init_params(cfg, seed)` in this layout, each device building only its own units
        (`model.InitUnits`: its heads, experts and vocabulary rows) of its stage's layers."""
        return self.init_program(seed)()

    def init_program(self, seed: int) -> jax.stages.Wrapped:
        """The jitted program that builds the parameters (no arguments; for `lower`)."""
        cfg, stages, per_stage = self.cfg, self.degrees.stage, self.plan.layers_per_stage
        keys = sorted(model.abstract_params(cfg)["layers"], key=int)
        ids = {
            "experts": np.arange(cfg.moe.experts_per_layer, dtype=np.int32),
            "heads": np.arange(cfg.model.attention_heads, dtype=np.int32),
            "vocab": np.arange(self.plan.padded_vocab, dtype=np.int32),
        }
        split = {"experts": P(TENSOR), "heads": P(TENSOR), "vocab": P(VOCAB)}

        def build(local: dict[str, jax.Array]) -> Params:
            units = model.InitUnits(**local)

            def layers_of(stage: int) -> list[Params]:
                layers = model.init_params(cfg, seed, units)["layers"]
                return [
                    jax.tree.map(lambda x: x[None], layers[keys[stage * per_stage + j]])
                    for j in range(per_stage)
                ]

            # Only this device's stage is built: lax.switch runs one branch.
            own = lax.switch(
                lax.axis_index(STAGE), [functools.partial(layers_of, s) for s in range(stages)]
            )
            params = model.init_params(cfg, seed, units)
            params["layers"] = {
                key: own[j]
                if j < per_stage
                else jax.tree.map(lambda x: jnp.zeros((0,), x.dtype), params["layers"][key])
                for j, key in enumerate(keys)
            }
            return params

        local = jax.shard_map(build, mesh=self.mesh, in_specs=(split,), out_specs=self.specs)
        return jax.jit(lambda: local(ids))

    def forward(self, params: Params, tokens: jax.Array) -> jax.Array:
        self._check_batch(tokens.shape[0])
        return self._forward(params, tokens)

    def loss(self, params: Params, tokens: jax.Array) -> jax.Array:
        """The LM loss of `loss_body`: vocabulary-parallel cross-entropy, logits never whole."""
        self._check_batch(tokens.shape[0])
        return self._lm_loss(params, tokens)

    def value_and_grad(
        self, params: Params, tokens: jax.Array, rng: jax.Array | None = None
    ) -> tuple[dict[str, jax.Array], Params]:
        self._check_batch(tokens.shape[0])
        (_, metrics), grads = self._value_and_grad(params, tokens, rng)
        return metrics, grads

    def to_canonical(self, tree: Tree) -> Tree:
        return self._to_canonical_fn(tree)

    def from_canonical(self, tree: Tree) -> Tree:
        """The single-device layout placed on this runner's mesh. A leaf committed to other
        devices (a checkpoint read onto the host device) is first copied onto the whole mesh,
        replicated, as the conversion program takes it."""
        replicated = NamedSharding(self.mesh, P())
        devices = set(self.mesh.devices.flat)

        def onto_mesh(x: Any) -> Any:
            if isinstance(x, jax.Array) and x.sharding.device_set != devices:
                return jax.device_put(x, replicated)
            return x

        return self._from_canonical(jax.tree.map(onto_mesh, tree))

    def init_caches(self, batch: int, max_len: int) -> list[decode.KVCache]:
        """Zero KV caches of this stage's layers, [stage, B, T, N, D] sharded like attention."""
        abstract = self.abstract_caches(batch, max_len)[0].key
        zeros = jax.jit(
            lambda: jnp.zeros(abstract.shape, abstract.dtype), out_shardings=abstract.sharding
        )
        return [decode.KVCache(zeros(), zeros()) for _ in range(self.plan.layers_per_stage)]

    def abstract_caches(self, batch: int, max_len: int) -> list[decode.KVCache]:
        """ShapeDtypeStructs (with shardings) of `init_caches(batch, max_len)`."""
        m = self.cfg.model
        shape = (self.degrees.stage, batch, max_len, m.attention_heads, m.head_dim)
        zeros = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._named(CACHE_SPEC))
        return [decode.KVCache(zeros, zeros) for _ in range(self.plan.layers_per_stage)]

    def generate(
        self,
        params: Params,
        prompt: jax.Array,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> jax.Array:
        """KV-cache decoding; a batch that data parallelism does not divide is padded with rows
        of token 0 (then sampling at temperature > 0 draws other noise than an unpadded batch)."""
        batch, prompt_len = prompt.shape
        pad = -batch % self.degrees.data
        padded = jnp.pad(jnp.asarray(prompt, jnp.int32), ((0, pad), (0, 0)))
        caches = self.init_caches(batch + pad, prompt_len + max_new_tokens)
        out = decode.generate_loop(
            lambda t, c, s: self._decode_step(params, jnp.asarray(t), c, jnp.int32(s)),
            caches,
            padded,
            max_new_tokens,
            temperature,
            seed,
        )
        return out[:batch]

    def train_program(self, params: Params, tokens: jax.Array) -> jax.stages.Compiled:
        """The compiled loss-and-gradient program (for `cost_analysis` / `memory_analysis`)."""
        return self._value_and_grad.lower(params, jnp.asarray(tokens), None).compile()
