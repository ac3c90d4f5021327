"""The MA runner: parameters on two pools, and the schedule that drives a step.

Forward sweep: layer by layer, micro-batch by micro-batch (ping-pong order): the attention stage
of (l, i), its pieces to the experts, the expert stage of (l, i), the pieces back; the attention
stage of (l, i+1) is dispatched right after, so it runs while the experts work on (l, i). The
host never waits inside a step: programs and copies are queued and run when their inputs are
ready. Backward sweep: the head's forward and backward in one program per micro-batch, then the
layers in reverse with each stage's VJP (its residuals stay on the stage's devices), the same
order; with `training.gradient_checkpointing` the forward sweep keeps only each stage's inputs
and the backward program runs the stage's forward again before applying its VJP. The byte counters (`bytes_moved`) count what crosses the pool boundary and, separately,
what the attention pool's collectives move inside it.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax import compression, model
from maxjax.config import Config
from maxjax.model import decode
from maxjax.model.transformer import Params, group_capacity
from maxjax.parallel.collectives import abstract, program_collective_bytes
from maxjax.parallel.ma import failover
from maxjax.parallel.ma.layout import (
    ATTENTION_POOL,
    CACHE,
    EXPERT_POOL,
    INCOMING,
    OUTGOING,
    TOKENS,
    ExpertOrder,
    ParamLayout,
    TokenSplit,
    layer_of,
)
from maxjax.parallel.ma.stages import (
    LayerConstants,
    StagePrograms,
    TokenState,
    attention_part,
    head_part,
    summarize,
)
from maxjax.parallel.ma.transport import CollectivePieceTransport, PieceTransport
from maxjax.parallel.mesh import (
    ATTENTION_AXIS,
    EXPERT_AXIS,
    attention_submesh,
    expert_submesh,
    replicate,
    restrict,
)
from maxjax.parallel.runner import (
    LayoutReport,
    Path,
    Runner,
    TrainState,
    Tree,
    map_with_path,
    merge,
    select,
    tree_paths,
)

COUNTERS = (
    "attention_to_experts",
    "experts_to_attention",
    "backward_to_experts",
    "backward_to_attention",
    "within_attention_pool",
)


class StageTimer:
    """Where a step's work goes: while `MARunner.stage_timer` holds one, every stage program
    and every crossing waits for its inputs, runs alone and adds its wall time under its name
    (the program's name, `to_experts`, `to_attention`). This serialises the step (the driver
    waits after each dispatch, nothing overlaps), so it is for measurement only
    (`python -m maxjax.bench ma-step --breakdown`), never set in training."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        jax.block_until_ready([x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)])
        start = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready([x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)])
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1
        return out


# Within one process pieces move by `jax.device_put`; across processes always by the exchange
# programs (`CollectivePieceTransport`).
TRANSPORTS = {"device_put": PieceTransport, "collective": CollectivePieceTransport}


class MARunner(Runner):
    """MoE-Attention separation on two submeshes (see `maxjax.parallel.ma`)."""

    name = "ma"

    def __init__(self, cfg: Config, transport: str | None = None):
        super().__init__(cfg)
        name = transport or cfg.ma_separation.transport
        if name not in TRANSPORTS:
            raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}")
        if jax.process_count() > 1:
            name = "collective"
        self.transport_name = name
        # Called (no arguments) by `value_and_grad` between the forward and the backward sweep,
        # when every stage's saved residuals are alive: a place to measure memory. None: nothing.
        self.between_sweeps: Callable[[], None] | None = None
        # Serialises and times every program and crossing (`StageTimer`). None: nothing.
        self.stage_timer: StageTimer | None = None
        self._build(cfg)

    def _build(self, cfg: Config) -> None:
        """Lay the runner out over `cfg`'s pools (at construction, and again over the surviving
        devices after a failover); every placed constant and compiled program starts afresh."""
        self.cfg = cfg
        self.layout = ParamLayout(cfg)
        self.heads = self.layout.heads
        self.experts = self.layout.experts
        self.attention_mesh = attention_submesh(cfg)
        self.expert_mesh = expert_submesh(cfg)
        self.attention_devices = list(self.attention_mesh.devices.flat)
        self.transport = TRANSPORTS[self.transport_name](self.attention_devices, self.expert_mesh)
        self.vocab_size = self.layout.vocab_size
        self.padded_vocab = self.layout.padded_vocab
        self.num_layers = cfg.model.layers
        self.microbatches = cfg.ma_separation.microbatches
        self.accumulation = cfg.ma_separation.gradient_accumulation
        self.compress = (
            cfg.ma_separation.synchronization.communication_compression == "8-bit quantization"
        )
        self.replicas = cfg.ma_separation.attention.replication_factor
        self.standby: dict[str, Tree] | None = None
        self._standby_program: Any = None
        self._programs: dict[TokenSplit, StagePrograms] = {}
        self._gathers: dict[NamedSharding, Any] = {}
        self._cuts: dict[tuple[int, bool], Any] = {}
        self._constants: dict[tuple, jax.Array] = {}
        self._placed_order: dict[int, tuple[jax.Array, dict]] = {}
        self._summarize = jax.jit(functools.partial(summarize, cfg))
        # Per distinct (program, argument signature): its abstract arguments, and the bytes its
        # collectives move inside the attention pool (read off its HLO when first asked).
        self._signatures: dict[tuple, tuple] = {}
        self._signature_pool_bytes: dict[tuple, int] = {}
        self._reset_counters()

    # --- layout --------------------------------------------------------------------------------

    def pool_of(self, path: Path) -> str:
        return self.layout.pool_of(path)

    def spec_of(self, path: Path) -> P:
        return self.layout.spec_of(path)

    def sharding_of(self, path: Path) -> NamedSharding:
        mesh = self.expert_mesh if self.layout.is_expert(path) else self.attention_mesh
        return NamedSharding(mesh, self.spec_of(path))

    def _shardings(self, tree: Tree) -> Tree:
        return map_with_path(lambda p, _: self.sharding_of(p), tree)

    def storage_layout(self) -> dict[str, Any]:
        return self.layout.describe()

    def adopt_storage_layout(self, layout: dict[str, Any]) -> bool:
        """Take the expert placement of a stored MA layout that differs from this runner's in
        nothing else (a checkpoint written after the sync loop re-placed experts), so that its
        arrays restore as they are. False (nothing changed) for any other layout."""
        mine = self.storage_layout()
        if layout.get("kind") != mine["kind"] or set(layout) != set(mine):
            return False
        if any(layout[k] != mine[k] for k in mine if k != "expert_order"):
            return False
        try:
            order = ExpertOrder.of(layout["expert_order"])
        except ValueError:
            return False
        if order.order.shape != self.experts.order.shape:
            return False
        self.set_expert_order(order.order)
        return True

    def set_expert_order(self, order: np.ndarray) -> None:
        """Use placement `order` ([L, E], canonical expert of each row) from now on. The
        parameters must be in it already (`move_experts` moves them and calls this)."""
        self.layout = self.layout.with_expert_order(order)
        self.experts = self.layout.experts
        self._placed_order = {}

    def set_microbatches(self, microbatches: int) -> None:
        """Cut each step's batch (each round's, with gradient accumulation) into `microbatches`
        micro-batches from now on (the sync loop re-chooses the count). Only the schedule changes:
        the step computes the same function, up to the order in which the micro-batches' losses
        and gradients are summed."""
        if microbatches < 1 or self.cfg.sequence.batch_size % (microbatches * self.accumulation):
            raise ValueError(
                f"{microbatches} micro-batches: a batch of {self.cfg.sequence.batch_size} "
                f"sequences must split into them in each of {self.accumulation} rounds"
            )
        self.microbatches = microbatches

    def layout_report(self, params: Params) -> LayoutReport:
        """Bytes and arrays per device, and each layer's experts on each expert device."""
        report = super().layout_report(params)
        devices = [jax.devices().index(d) for d in self.expert_mesh.devices.flat]
        report.expert_placement = [
            dict(zip(devices, self.expert_mapping(layer).values(), strict=True))
            for layer in range(self.num_layers)
        ]
        return report

    def expert_mapping(self, layer: int) -> dict[str, list[int]]:
        """Layer `layer`'s experts on each expert device (`expert_mapping` keys)."""
        return self.experts.mapping(layer, [f"gpu_{d}" for d in self.cfg.expert_devices])

    def move_experts(self, state: Any, order: np.ndarray) -> tuple[Any, int]:
        """Re-place the experts: every expert leaf of the parameters and of the AdamW moments
        goes to its row of `order` ([L, R]; -1: an empty slot, zeros), device to device on the
        expert pool (one jitted program per tree, gathering along the expert axis, the old
        arrays donated), and the runner uses `order` from then on.
        Returns (state, moved bytes): the bytes of the experts that changed device, each
        expert's weights and both moments counted once."""
        new = ExpertOrder.of(order)
        old = self.experts
        per_device = new.order.shape[1] // len(self.cfg.expert_devices)
        perms, moved_experts = {}, {}
        for layer in range(self.num_layers):
            if np.array_equal(old.rows(layer), new.rows(layer)):
                continue
            perms[layer] = new.source_rows(old, layer)
            before, after = old.row_of(layer) // per_device, new.row_of(layer) // per_device
            moved_experts[layer] = int(np.sum(before != after))
        if not perms:
            return state, 0
        pools = self.split_pools(state.params)
        pools[EXPERT_POOL] = self._permute_experts(pools[EXPERT_POOL], perms)
        params = merge(*pools.values())
        opt_state = dict(state.opt_state)
        opt_state[EXPERT_POOL] = self._permute_experts(opt_state[EXPERT_POOL], perms)
        self.set_expert_order(new.order)
        experts = self.split_pools(params)[EXPERT_POOL]
        moved = 0
        for path, leaf in tree_paths(experts):
            layer = layer_of(path)
            if layer in moved_experts:
                moved += 3 * moved_experts[layer] * leaf.nbytes // leaf.shape[0]
        return state._replace(params=params, opt_state=opt_state), moved

    # --- replicas and failover (`failover.py`) -------------------------------------------------

    def init_train_state(self, params: Params, tx: optax.GradientTransformation) -> TrainState:
        state = super().init_train_state(params, tx)
        failover.refresh_standby(self, state)
        return state

    def import_train_state(self, *args: Any, **kwargs: Any) -> TrainState:
        state = super().import_train_state(*args, **kwargs)
        failover.refresh_standby(self, state)
        return state

    def apply_gradients(
        self, state: TrainState, grads: Params, tx: optax.GradientTransformation
    ) -> tuple[TrainState, jax.Array]:
        """As the base class, then the standby copies of the new attention shards are made
        (with replication_factor 2; dispatched, not waited for)."""
        state, grad_norm = super().apply_gradients(state, grads, tx)
        failover.refresh_standby(self, state)
        return state, grad_norm

    def fail_devices(
        self,
        state: TrainState,
        devices: list[int],
        tx: optax.GradientTransformation,
        lost_experts: Callable | None = None,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Devices `devices` (config numbers) fail together: the runner and `state` are rebuilt
        over the surviving devices, an attention device's shard from its standby copy, an
        expert device's experts on the surviving expert devices from `lost_experts` (default:
        their initial values). Returns (state, failure record). Raises FailoverError when that
        cannot be done (`failover.fail_devices`)."""
        return failover.fail_devices(self, state, devices, tx, lost_experts)

    def fail_device(
        self,
        state: TrainState,
        device: int,
        tx: optax.GradientTransformation,
        lost_experts: Callable | None = None,
    ) -> tuple[TrainState, dict[str, Any]]:
        """`fail_devices` for one device."""
        return self.fail_devices(state, [device], tx, lost_experts)

    def standby_bytes(self) -> int:
        """Bytes of the standby copy on each attention device (0 with replication_factor 1)."""
        return failover.standby_bytes_per_device(self, self.abstract_params())

    def squared_norm(self, pool: str, grads: Tree) -> jax.Array:
        """As the base class; the expert pool's sums of squares are taken per expert and added
        in canonical expert order, so that the global norm (and the clipping it sets) does not
        depend on the expert placement."""
        if pool != EXPERT_POOL:
            return super().squared_norm(pool, grads)
        rows = [self.experts.row_of(layer_of(path)) for path, _ in tree_paths(grads)]
        return _canonical_squared_norm(grads, rows)

    def _permute_experts(self, tree: Tree, perms: dict[int, np.ndarray]) -> Tree:
        """`tree` with each expert leaf of a layer in `perms` reordered along its expert axis
        (row i takes row perms[layer][i], or zeros where that is -1)."""

        def names(path: tuple) -> tuple[str, ...]:
            return tuple(
                str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
            )

        def layer_moved(path: tuple) -> int | None:
            keys = names(path)
            if "layers" not in keys or not self.layout.is_expert(keys):
                return None
            layer = layer_of(keys)
            return layer if layer in perms else None

        def permute(layer: int, x: jax.Array) -> jax.Array:
            perm = perms[layer]
            gathered = x[np.maximum(perm, 0)]
            if np.all(perm >= 0):
                return gathered
            filled = (perm >= 0).reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(filled, gathered, jnp.zeros((), x.dtype))

        # Only the moved leaves enter the program: the others (e.g. an optimizer count that is
        # an uncommitted scalar after a restore) stay as they are, wherever they are.
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        picked = [(i, layer_moved(path)) for i, (path, _) in enumerate(leaves)]
        picked = [(i, layer) for i, layer in picked if layer is not None]
        move = jax.jit(
            lambda xs: [permute(layer, x) for (_, layer), x in zip(picked, xs, strict=True)],
            out_shardings=[leaves[i][1].sharding for i, _ in picked],
            donate_argnums=0,
        )
        out = [x for _, x in leaves]
        for (i, _), x in zip(picked, move([leaves[i][1] for i, _ in picked]), strict=True):
            out[i] = x
        return jax.tree_util.tree_unflatten(treedef, out)

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs (with shardings) of the MA-layout parameters; allocates nothing."""
        canonical = model.abstract_params(self.cfg)
        shapes = jax.eval_shape(lambda t: map_with_path(self.layout.to_layout, t), canonical)
        return map_with_path(
            lambda p, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.sharding_of(p)),
            shapes,
        )

    def init(self, seed: int) -> Params:
        """`init_params(cfg, seed)` in the MA layout, each device building only its own units
        (`model.InitUnits`): an expert device its experts, an attention device its head slots
        (padded slots zero) and vocabulary rows; the norms and the router on every attention
        device. Nothing is generated whole and then cut or permuted (the experts are built in
        the configured placement, and moved on the expert pool if the runner's differs)."""
        params = merge(*(self.init_program(pool, seed)() for pool in (ATTENTION_POOL, EXPERT_POOL)))
        configured = ExpertOrder.from_config(self.cfg)
        if np.array_equal(configured.order, self.experts.order):
            return params
        perms = {
            layer: self.experts.source_rows(configured, layer) for layer in range(self.num_layers)
        }
        pools = self.split_pools(params)
        pools[EXPERT_POOL] = self._permute_experts(pools[EXPERT_POOL], perms)
        return merge(*pools.values())

    def init_program(self, pool: str, seed: int) -> jax.stages.Wrapped:
        """The jitted program that builds `pool`'s parameters (no arguments; for `lower`)."""
        none = np.zeros((0,), np.int32)
        if pool == EXPERT_POOL:
            mesh, axis = self.expert_mesh, EXPERT_AXIS
            # In the configured placement; `init` moves them if this runner's differs.
            configured = ExpertOrder.from_config(self.cfg).rows(0)
            ids = {"experts": configured, "heads": none, "vocab": none}
        else:
            mesh, axis = self.attention_mesh, ATTENTION_AXIS
            slots, vocab = self.heads.slot_heads(), np.arange(self.padded_vocab, dtype=np.int32)
            ids = {"experts": none, "heads": slots, "vocab": vocab}

        def build(local_ids: dict[str, jax.Array]) -> Params:
            params = model.init_params(self.cfg, seed, model.InitUnits(**local_ids))
            return select(params, lambda p: self.pool_of(p) == pool)

        specs = map_with_path(lambda p, _: self.spec_of(p), jax.eval_shape(build, ids))
        local = jax.shard_map(build, mesh=mesh, in_specs=P(axis), out_specs=specs)
        return jax.jit(lambda: local(ids))

    def to_canonical(self, tree: Tree) -> Tree:
        """Undo padding and permutation per pool; the leaves stay on their pool's devices."""
        out = []
        for pool_tree in self.split_pools(tree).values():
            out.append(jax.jit(lambda t: map_with_path(self.layout.from_layout, t))(pool_tree))
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
                jax.jit(lambda t: map_with_path(self.layout.to_layout, t), out_shardings=target)(
                    placed
                )
            )
        return merge(*out)

    def _canonical_sharding(self, path: Path) -> NamedSharding:
        """Where a canonical leaf waits before conversion: experts split, the rest replicated."""
        if self.pool_of(path) == EXPERT_POOL:
            # Split when the experts divide over the pool; else (empty slots) whole on each.
            split = self.experts.num_experts % self.expert_mesh.size == 0
            return NamedSharding(self.expert_mesh, P(EXPERT_AXIS) if split else P())
        return NamedSharding(self.attention_mesh, P())

    # --- token splits and their programs ---------------------------------------------------------

    def token_split(self, batch: int) -> TokenSplit:
        """How a micro-batch of `batch` sequences is split over the attention pool."""
        return TokenSplit.for_batch(
            len(self.attention_devices), batch, len(self.cfg.expert_devices)
        )

    def programs(self, split: TokenSplit) -> StagePrograms:
        if split not in self._programs:
            self._programs[split] = StagePrograms(
                self.cfg,
                self.layout,
                split,
                split.mesh(self.attention_mesh.devices),
                self.expert_mesh,
                self.compress,
            )
        return self._programs[split]

    def _constant(self, key: tuple, make: Any) -> jax.Array:
        """A small array placed once (head mask, sequence ids) and reused by every step."""
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def _head_mask(self, split: TokenSplit) -> jax.Array:
        mesh = self.programs(split).mesh
        return self._constant(
            ("head_mask", split),
            lambda: jax.device_put(self.heads.head_mask(), NamedSharding(mesh, P(mesh.axis_names))),
        )

    def _placement(self, depth: int) -> tuple[jax.Array, dict]:
        """Layer `depth`'s placement on the devices: the canonical expert of each row on the
        expert pool (dropout masks follow the expert, not the row), and the row of each expert
        on each split's view of the attention pool (placed on first use). Replaced when the
        experts move (`set_expert_order`)."""
        if depth not in self._placed_order:
            ids = jax.device_put(
                self.experts.rows(depth), NamedSharding(self.expert_mesh, P(EXPERT_AXIS))
            )
            self._placed_order[depth] = (ids, {})
        return self._placed_order[depth]

    def _expert_ids(self, depth: int) -> jax.Array:
        return self._placement(depth)[0]

    def _layer_constants(self, split: TokenSplit, depth: int) -> LayerConstants:
        rows = self._placement(depth)[1]
        if split not in rows:
            mesh = self.programs(split).mesh
            rows[split] = jax.device_put(self.experts.row_of(depth), NamedSharding(mesh, P()))
        return LayerConstants(self._head_mask(split), rows[split])

    def _sequence_ids(self, index: int, size: int) -> jax.Array:
        """Global sequence ids of micro-batch `index` on the expert pool (dropout masks)."""
        ids = lambda: jax.device_put(
            np.arange(index * size, (index + 1) * size, dtype=np.int32),
            NamedSharding(self.expert_mesh, P()),
        )
        return self._constant(("sequence_ids", index, size), ids)

    # --- bytes -----------------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        """Start counting a new call: programs dispatched, bytes moved, and (`value_and_grad`)
        `saved_bytes`, the bytes the forward sweep keeps for the backward sweep beyond the
        parameters: every stage's VJP residuals, or with `training.gradient_checkpointing`
        only the activations each stage takes as input (summed over the devices holding them)."""
        self.programs_dispatched = 0
        self.saved_bytes = 0
        self.transport.copies_dispatched = 0
        self._crossed = dict.fromkeys(COUNTERS[:-1], 0)
        self._calls: collections.Counter[tuple] = collections.Counter()

    @property
    def bytes_moved(self) -> dict[str, int]:
        """Bytes moved by the last call (`forward`, `value_and_grad`, `train_step`, `generate`):
        across the pool boundary, counted by the transport as each piece is handed over
        (`attention_to_experts`, `experts_to_attention`, `backward_to_*`), and by the
        collectives inside the attention pool's programs (`within_attention_pool`), read off
        each program's HLO (`maxjax.parallel.collectives`), summed over the receiving devices."""
        within = sum(n * self._pool_bytes(signature) for signature, n in self._calls.items())
        return {**self._crossed, "within_attention_pool": within}

    def _pool_bytes(self, signature: tuple) -> int:
        if signature not in self._signature_pool_bytes:
            program, args = signature[0], self._signatures[signature]
            devices = {
                d
                for x in jax.tree.leaves(args)
                if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                for d in x.sharding.device_set
            }
            on_pool = bool(devices) and devices <= set(self.attention_devices)
            self._signature_pool_bytes[signature] = (
                program_collective_bytes(program, args, len(self.attention_devices))
                if on_pool
                else 0
            )
        return self._signature_pool_bytes[signature]

    def _note_call(self, program: Any, args: tuple) -> None:
        leaves, treedef = jax.tree.flatten(args)
        signature = (
            program,
            treedef,
            *(
                (x.shape, x.dtype, x.sharding)
                if isinstance(x, jax.Array)
                else (type(x), getattr(x, "shape", x if isinstance(x, int | float) else None))
                for x in leaves
            ),
        )
        if signature not in self._signatures:
            self._signatures[signature] = abstract(args)
        self._calls[signature] += 1

    def _run(self, program: Any, *args: Any) -> Any:
        self.programs_dispatched += 1
        self._note_call(program, args)
        if self.stage_timer is not None:
            return self.stage_timer.run(getattr(program, "__name__", "program"), program, *args)
        return program(*args)

    def _move(self, name: str, move: Callable[..., Any], *args: Any) -> Any:
        if self.stage_timer is not None:
            return self.stage_timer.run(name, move, *args)
        return move(*args)

    def _to_experts(self, pieces: tuple, split: TokenSplit, counter: str) -> tuple:
        inputs, crossed = self._move("to_experts", self.transport.to_experts, pieces, split)
        self._crossed[counter] += crossed
        return inputs

    def _to_attention(self, outputs: tuple, split: TokenSplit, counter: str) -> tuple:
        mesh = self.programs(split).mesh
        pieces, crossed = self._move(
            "to_attention", self.transport.to_attention, outputs, split, mesh
        )
        self._crossed[counter] += crossed
        return pieces

    def transfer_bytes(self, batch_size: int, seq_len: int) -> dict[str, Any]:
        """Bytes per layer and step (all micro-batches) for a batch of `batch_size` sequences.

        Across the boundary each routed row travels once each way: the capacity buffer
        [E, B, C, M] (int8 + one float32 scale per row when compressing: (1/4 + 1/M) of float32)
        to the experts, the same back. The backward pass sends float32 cotangents of the same
        shapes both ways (quantisation is straight-through; compressing gradients would change
        them). `within_attention_pool_*`: the attention pool's own collectives (see
        `pool_bytes_per_stage`)."""
        capacity = group_capacity(self.cfg, seq_len)
        shape = (self.experts.num_rows, batch_size, capacity, self.cfg.model.hidden_dim)
        float_bytes = 4 * math.prod(shape)
        wire = compression.compressed_nbytes(shape) if self.compress else float_bytes
        parts = self.microbatches * self.accumulation
        micro = batch_size // parts
        split = self.token_split(micro)
        pool = pool_bytes_per_stage(
            split, micro, seq_len, self.cfg.model.hidden_dim, self.cfg.moe.top_k
        )
        return {
            "buffer_shape": shape,
            "compressed": self.compress,
            "token_split": split._asdict(),
            "attention_to_experts": wire,
            "experts_to_attention": wire,
            "uncompressed_each_way": float_bytes,
            "scale_bytes_each_way": 4 * math.prod(shape[:-1]) if self.compress else 0,
            "backward_each_way": float_bytes,
            "within_attention_pool_forward": parts * pool,
        }

    # --- driving a step --------------------------------------------------------------------------

    def _split_batch(
        self, tokens: Any, parts: int | None = None, shifted: bool = False
    ) -> list[Any]:
        """The `parts` (default: the step's, ma_separation.microbatches times
        ma_separation.gradient_accumulation) micro-batches, replicated on the
        attention pool; with `shifted`, each as (inputs [b, S], next-token targets [b, S]) of a
        batch [B, S + 1]. Host tokens are cut on the host and placed there directly; device
        tokens are cut where they are, in one program, and copied device to device."""
        parts = parts or self.microbatches * self.accumulation
        batch = tokens.shape[0]
        if batch % parts:
            raise ValueError(
                f"batch of {batch} sequences does not split into {parts} equal micro-batches "
                f"(ma_separation.microbatches = {self.microbatches} per round times "
                f"ma_separation.gradient_accumulation = {self.accumulation} rounds)"
            )
        size = batch // parts

        def cut(t: Any) -> list[Any]:
            rows = [t[i * size : (i + 1) * size] for i in range(parts)]
            return [(r[:, :-1], r[:, 1:]) for r in rows] if shifted else rows

        if isinstance(tokens, jax.Array):
            if not tokens.sharding.is_fully_replicated:
                tokens = self._gathered(tokens)
            if (parts, shifted) not in self._cuts:
                self._cuts[(parts, shifted)] = jax.jit(cut)
            pieces = self._cuts[(parts, shifted)](tokens)
            return jax.tree.map(lambda p: replicate(p, self.attention_mesh), pieces)
        on_pool = NamedSharding(self.attention_mesh, P())
        return jax.tree.map(
            lambda p: jax.device_put(np.ascontiguousarray(p), on_pool), cut(np.asarray(tokens))
        )

    def _gathered(self, tokens: jax.Array) -> jax.Array:
        """A batch split over devices (each process's rows on its devices: `global_batch`)
        all-gathered in one program and held whole on the attention pool."""
        sharding = tokens.sharding
        devices = set(self.attention_devices)
        if not isinstance(sharding, NamedSharding) or not devices <= sharding.device_set:
            raise ValueError(
                "MA separation takes tokens as host arrays, a device array held whole, or one "
                f"split over a mesh that holds the attention pool; got sharding {sharding}"
            )
        whole = NamedSharding(sharding.mesh, P())
        if whole not in self._gathers:
            self._gathers[whole] = jax.jit(lambda t: t, out_shardings=whole)
        return restrict(self._gathers[whole](tokens), self.attention_mesh)

    def _forward_sweep(
        self,
        params: Params,
        micro: list[jax.Array],
        caches: list[list[decode.KVCache]] | None = None,
        start: jax.Array | None = None,
    ) -> tuple[list[tuple], list[list[decode.KVCache]] | None]:
        """All layers over the micro-batches in ping-pong order, no gradients. Returns each
        micro-batch's head input (state, incoming pieces) and, decoding, the updated caches."""
        size, seq = micro[0].shape
        split = self.token_split(size)
        programs = self.programs(split)
        states: list[Any] = [None] * len(micro)
        new_caches = None if caches is None else [[] for _ in micro]
        layers = params["layers"]
        for depth, key in enumerate(sorted(layers, key=int)):
            layer = layers[key]
            constants = self._layer_constants(split, depth)
            for i, toks in enumerate(micro):
                cache = () if caches is None else (caches[i][depth], start)
                if depth == 0:
                    args = (params["embed"], attention_part(layer), toks, constants, *cache)
                    state, pieces, _, cache = self._run(programs.first, *args)
                else:
                    args = (attention_part(layer), *states[i], constants, *cache)
                    state, pieces, _, cache = self._run(programs.middle, *args)
                if new_caches is not None:
                    new_caches[i].append(cache)
                inputs = self._to_experts(pieces, split, "attention_to_experts")
                outputs = self._run(
                    programs.experts if caches is None else programs.decode_experts,
                    layer["moe"]["experts"],
                    inputs,
                    self._expert_ids(depth),
                    self._sequence_ids(i, size),
                    None,
                    depth,
                )
                states[i] = (state, self._to_attention(outputs, split, "experts_to_attention"))
        return states, new_caches

    def forward(self, params: Params, tokens: jax.Array) -> jax.Array:
        self._reset_counters()
        micro = self._split_batch(tokens)
        states, _ = self._forward_sweep(params, micro)
        programs = self.programs(self.token_split(micro[0].shape[0]))
        head = head_part(params)
        logits = [self._run(programs.logits, head, *state) for state in states]
        return logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=0)

    def loss(self, params: Params, tokens: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy: the forward sweep, then per micro-batch the head's
        vocabulary-split cross-entropy (`StagePrograms.lm_loss`); logits are never gathered."""
        self._reset_counters()
        micro = self._split_batch(tokens, shifted=True)
        states, _ = self._forward_sweep(params, [inputs for inputs, _ in micro])
        programs = self.programs(self.token_split(micro[0][0].shape[0]))
        head = head_part(params)
        losses = [
            self._run(programs.lm_loss, head, *state, targets)
            for state, (_, targets) in zip(states, micro, strict=True)
        ]
        return self._run(_mean, losses)

    # --- decoding --------------------------------------------------------------------------------

    def init_caches(self, batch: int, max_len: int) -> list[decode.KVCache]:
        """Zero KV caches of every layer, [batch, max_len, A*n_max, D] split by head slots over
        the attention pool like the q/k/v columns (padded slots stay zero: their kernels are)."""
        abstract = self.abstract_caches(batch, max_len)[0].key
        zeros = jax.jit(
            lambda: jnp.zeros(abstract.shape, abstract.dtype), out_shardings=abstract.sharding
        )
        return [decode.KVCache(zeros(), zeros()) for _ in range(self.num_layers)]

    def decode_parts(self, batch: int) -> int:
        """Micro-batches `generate` cuts `batch` prompts into: as many as a training step has
        (microbatches x gradient_accumulation), else `ma_separation.microbatches`, when they
        divide the batch; else one."""
        for parts in (self.microbatches * self.accumulation, self.microbatches):
            if batch % parts == 0:
                return parts
        return 1

    def _decode_step(
        self, params: Params, tokens: jax.Array, caches: list[list[decode.KVCache]], start: int
    ) -> tuple[jax.Array, list[list[decode.KVCache]]]:
        """tokens[B, S] at positions start.. -> (logits [B, V] of the last one, caches)."""
        micro = self._split_batch(tokens, len(caches))
        on_pool = NamedSharding(self.attention_mesh, P())
        states, caches = self._forward_sweep(
            params, micro, caches, jax.device_put(np.int32(start), on_pool)
        )
        programs = self.programs(self.token_split(micro[0].shape[0]))
        head = head_part(params)
        logits = [self._run(programs.last_logits, head, *state) for state in states]
        return (logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=0)), caches

    def generate(
        self,
        params: Params,
        prompt: jax.Array,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> jax.Array:
        """KV-cache decoding on the MA layout: the attention pool keeps each device's heads' keys
        and values, the experts stay on the expert pool, pieces cross as in training
        (compressed when configured). Routing is dropless. The prompts are cut into micro-batches
        (ping-pong) of the training step's size where they can be (`decode_parts`)."""
        self._reset_counters()
        batch, prompt_len = prompt.shape
        parts = self.decode_parts(batch)
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

    # --- training --------------------------------------------------------------------------------

    def value_and_grad(
        self, params: Params, tokens: jax.Array, rng: jax.Array | None = None
    ) -> tuple[dict[str, jax.Array], Params]:
        """The step's loss and gradients in `ma_separation.gradient_accumulation` rounds of
        `ma_separation.microbatches` micro-batches each. A round runs its forward sweep and its
        backward sweep before the next begins, so only one round's activations are ever alive;
        its gradients add into the sums the previous rounds left (the same donated sums the
        micro-batches of a round add into)."""
        self._reset_counters()
        rounds = self.accumulation
        micro = self._split_batch(tokens, self.microbatches * rounds, shifted=True)
        size = micro[0][0].shape[0]
        split = self.token_split(size)
        rng = None if rng is None else replicate(rng, self.expert_mesh)
        on_pool = NamedSharding(self.attention_mesh, P())
        loss_weight = self._constant(
            ("loss_weight", len(micro)),
            lambda: jax.device_put(np.float32(1.0 / len(micro)), on_pool),
        )
        aux_weight = self._constant(
            ("aux_weight", len(micro)),
            lambda: jax.device_put(np.float32(1.0 / (len(micro) * self.num_layers)), on_pool),
        )
        grads, lm_losses = None, []
        aux_by_layer: list[list] = [[] for _ in params["layers"]]
        for first in range(0, len(micro), self.microbatches):
            grads = self._round(
                params,
                micro[first : first + self.microbatches],
                first,
                split,
                rng,
                (loss_weight, aux_weight),
                grads,
                lm_losses,
                aux_by_layer,
            )
        metrics = self._run(self._summarize, lm_losses, aux_by_layer)
        return metrics, grads

    def _round(
        self,
        params: Params,
        micro: list[jax.Array],
        first: int,
        split: TokenSplit,
        rng: jax.Array | None,
        weights: tuple[jax.Array, jax.Array],
        grads: Params | None,
        lm_losses: list,
        aux_by_layer: list[list],
    ) -> Params:
        """One round of `value_and_grad`: micro-batches `first`, `first + 1`, ... (`micro`)
        forward and backward, their gradients added into `grads` (None: the first round).
        Appends the round's LM losses, and each layer's auxiliary terms to its list."""
        size = micro[0][0].shape[0]
        programs = self.programs(split)
        loss_weight, aux_weight = weights
        layers = params["layers"]
        keys = sorted(layers, key=int)
        # Forward, layer by layer, micro-batches interleaved. Kept for the backward sweep: each
        # stage's VJP (its residuals) or, with gradient checkpointing, only its inputs.
        remat = self.cfg.training.gradient_checkpointing
        states: list[Any] = [None] * len(micro)
        attention_kept = [[None] * len(micro) for _ in keys]
        expert_kept = [[None] * len(micro) for _ in keys]
        for depth, key in enumerate(keys):
            layer = layers[key]
            constants = self._layer_constants(split, depth)
            for i, (toks, _) in enumerate(micro):
                if depth == 0:
                    args = (params["embed"], attention_part(layer), toks, constants)
                else:
                    args = (attention_part(layer), *states[i], constants)
                    if remat:
                        self.saved_bytes += device_bytes(states[i])
                if remat:
                    program = programs.first if depth == 0 else programs.middle
                    state, pieces, aux, _ = self._run(program, *args)
                    attention_kept[depth][i] = args
                else:
                    program = programs.first_vjp if depth == 0 else programs.middle_vjp
                    (state, pieces, aux), attention_kept[depth][i] = self._run(program, *args)
                    self.saved_bytes += device_bytes(attention_kept[depth][i])
                aux_by_layer[depth].append(aux)
                inputs = self._to_experts(pieces, split, "attention_to_experts")
                args = (
                    layer["moe"]["experts"],
                    inputs,
                    self._expert_ids(depth),
                    self._sequence_ids(first + i, size),
                    rng,
                    depth,
                )
                if remat:
                    outputs = self._run(programs.experts, *args)
                    expert_kept[depth][i] = args
                    self.saved_bytes += device_bytes(inputs)
                else:
                    outputs, expert_kept[depth][i] = self._run(programs.experts_vjp, *args)
                    self.saved_bytes += device_bytes(expert_kept[depth][i])
                states[i] = (state, self._to_attention(outputs, split, "experts_to_attention"))
        if self.between_sweeps is not None:
            self.between_sweeps()

        # The head's forward and backward (one program per micro-batch), then the layers in
        # reverse, the same ping-pong order; gradients summed per stage.
        head = head_part(params)
        cotangents = []
        head_grads = None if grads is None else head_part(grads)
        for i, (_, targets) in enumerate(micro):
            state, received = states[i]
            loss, head_grads, (d_h, d_gates, d_received) = self._run(
                programs.head_step, head, state, received, targets, loss_weight, head_grads
            )
            lm_losses.append(loss)
            cotangents.append((d_h, d_gates, d_received))
        states = None
        layer_grads: dict[Any, Any] = {}
        embed_grads = None if grads is None else grads["embed"]
        for depth in reversed(range(len(keys))):
            attention_acc, experts_acc = None, None
            if grads is not None:
                summed = grads["layers"][keys[depth]]
                attention_acc, experts_acc = attention_part(summed), summed["moe"]["experts"]
            for i in range(len(micro)):
                d_h, d_gates, d_received = cotangents[i]
                d_out = self._to_experts(d_received, split, "backward_to_experts")
                kept = expert_kept[depth][i]
                if not remat:
                    kept = (kept, layers[keys[depth]]["moe"]["experts"])
                program = programs.experts_recompute if remat else programs.experts_backward
                experts_acc, d_inputs = self._run(program, *kept, d_out, experts_acc)
                d_pieces = self._to_attention(d_inputs, split, "backward_to_attention")
                kept = attention_kept[depth][i]
                if not remat:
                    layer = attention_part(layers[keys[depth]])
                    kept = (kept, (params["embed"], layer) if depth == 0 else layer)
                d_layer = (d_h, d_pieces, d_gates, aux_weight)
                if depth > 0:
                    program = programs.middle_recompute if remat else programs.layer_backward
                    attention_acc, cotangents[i] = self._run(
                        program, *kept, *d_layer, attention_acc
                    )
                else:
                    program = programs.first_recompute if remat else programs.first_backward
                    acc = None if attention_acc is None else (embed_grads, attention_acc)
                    embed_grads, attention_acc = self._run(program, *kept, *d_layer, acc)
                attention_kept[depth][i] = expert_kept[depth][i] = None
            attention_acc["moe"]["experts"] = experts_acc
            layer_grads[keys[depth]] = attention_acc
        return {
            "embed": embed_grads,
            "layers": layer_grads,
            "final_norm": head_grads["final_norm"],
            "lm_head": head_grads["lm_head"],
        }

    # --- ahead-of-time compilation (paper-scale cost and memory without running) ---------------

    def abstract_stage_inputs(
        self, batch: int, seq_len: int, capacity: int | None = None
    ) -> StageInputs:
        """Abstract inputs (ShapeDtypeStructs with the shardings a step gives them) of the stage
        programs for one micro-batch of `batch` sequences of `seq_len` tokens; `capacity`
        defaults to the training capacity of a sequence."""
        cfg = self.cfg
        split = self.token_split(batch)
        mesh = self.programs(split).mesh
        capacity = capacity or group_capacity(cfg, seq_len)
        per_device = self.experts.num_rows // split.expert_devices
        width, top_k = cfg.model.hidden_dim, cfg.moe.top_k
        tokens = NamedSharding(mesh, TOKENS)
        rows = (batch, seq_len, top_k)
        state = TokenState(
            jax.ShapeDtypeStruct((batch, seq_len, width), jnp.float32, sharding=tokens),
            jax.ShapeDtypeStruct(rows, jnp.float32, sharding=tokens),
            jax.ShapeDtypeStruct(rows, jnp.int32, sharding=tokens),
            jax.ShapeDtypeStruct(rows, jnp.int32, sharding=tokens),
            jax.ShapeDtypeStruct(rows, jnp.bool_, sharding=tokens),
        )
        outgoing = (split.replicas, per_device, batch, capacity, width)
        incoming = (
            split.expert_devices,
            per_device,
            batch // split.sequence_shards,
            capacity,
            width,
        )
        on_pool = NamedSharding(mesh, OUTGOING)
        on_experts = NamedSharding(self.expert_mesh, INCOMING)
        return StageInputs(
            split=split,
            params=self.abstract_params(),
            tokens=jax.ShapeDtypeStruct(
                (batch, seq_len), jnp.int32, sharding=NamedSharding(self.attention_mesh, P())
            ),
            state=state,
            received=tuple(
                _wire(outgoing, on_pool, self.compress) for _ in range(split.expert_devices)
            ),
            expert_inputs=tuple(
                _wire(incoming, on_experts, self.compress) for _ in range(split.sequence_shards)
            ),
            received_cotangents=tuple(
                _wire(outgoing, on_pool, False) for _ in range(split.expert_devices)
            ),
            expert_cotangents=tuple(
                _wire(incoming, on_experts, False) for _ in range(split.sequence_shards)
            ),
            constants=jax.tree.map(_like, self._layer_constants(split, 0)),
            expert_rows=_like(self._expert_ids(0)),
            sequence_ids=jax.ShapeDtypeStruct(
                (batch,), jnp.int32, sharding=NamedSharding(self.expert_mesh, P())
            ),
        )

    def lower_stages(
        self, batch: int, seq_len: int, platforms: tuple[str, ...] | None = None
    ) -> dict[str, jax.stages.Lowered]:
        """The training attention stage (layer > 0) and expert stage, lowered for abstract
        inputs of one micro-batch of `batch` sequences of `seq_len` tokens (for `platforms`,
        e.g. ("cuda",), instead of this machine's backend if given)."""
        x = self.abstract_stage_inputs(batch, seq_len)
        programs = self.programs(x.split)
        layer = x.params["layers"][sorted(x.params["layers"], key=int)[-1]]
        attention = programs.middle_vjp.trace(
            attention_part(layer), x.state, x.received, x.constants
        ).lower(lowering_platforms=platforms)
        expert = programs.experts_vjp.trace(
            layer["moe"]["experts"], x.expert_inputs, x.expert_rows, x.sequence_ids, None, 0
        ).lower(lowering_platforms=platforms)
        return {"attention": attention, "experts": expert}

    def compile_training_programs(self, batch: int, seq_len: int) -> dict[str, jax.stages.Compiled]:
        """Every stage program `value_and_grad` runs, compiled ahead of time for one micro-batch
        of `batch` sequences of `seq_len` tokens (targets one more), nothing allocated.

        Without gradient checkpointing the forward programs are the VJPs (`first_vjp`,
        `middle_vjp`, `experts_vjp`) and the backward programs take their abstract outputs
        (`out_info`: the VJPs with the saved residuals). With it the forward programs are the
        plain stages (`first`, `middle`, `experts`) and the backward programs recompute from
        the stage inputs (`..._recompute`). With several micro-batches the accumulating
        variants (the gradient sums donated) are compiled too, named `..._acc`."""
        x = self.abstract_stage_inputs(batch, seq_len)
        programs = self.programs(x.split)
        params = x.params
        keys = sorted(params["layers"], key=int)
        first_layer, layer = params["layers"][keys[0]], params["layers"][keys[-1]]
        on_pool = NamedSharding(self.attention_mesh, P())
        weight = jax.ShapeDtypeStruct((), jnp.float32, sharding=on_pool)
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(
            key.shape, key.dtype, sharding=NamedSharding(self.expert_mesh, P())
        )
        stage_args = {
            "first": (params["embed"], attention_part(first_layer), x.tokens, x.constants),
            "experts": (
                layer["moe"]["experts"],
                x.expert_inputs,
                x.expert_rows,
                x.sequence_ids,
                key,
                0,
            ),
        }
        if len(keys) > 1:
            stage_args["middle"] = (attention_part(layer), x.state, x.received, x.constants)
        d_state = (x.state.h, x.received_cotangents, x.state.gates, weight)
        cotangents = {"first": d_state, "middle": d_state, "experts": (x.expert_cotangents,)}
        out = {
            "head_step": programs.head_step.lower(
                head_part(params), x.state, x.received, x.tokens, weight, None
            ).compile()
        }
        if self.microbatches * self.accumulation > 1:
            # Micro-batches after the first add into the donated sums of the first.
            out["head_step_acc"] = programs.head_step.lower(
                head_part(params),
                x.state,
                x.received,
                x.tokens,
                weight,
                out["head_step"].out_info[1],
            ).compile()
        remat = self.cfg.training.gradient_checkpointing
        backward_of = {"first": "first_backward", "middle": "layer_backward"}
        backward_of["experts"] = "experts_backward"
        for stage, args in stage_args.items():
            if remat:
                out[stage] = getattr(programs, stage).lower(*args).compile()
                name, kept = f"{stage}_recompute", args
            else:
                out[f"{stage}_vjp"] = getattr(programs, f"{stage}_vjp").lower(*args).compile()
                stage_params = args[0] if stage != "first" else args[:2]
                name, kept = backward_of[stage], (out[f"{stage}_vjp"].out_info[1], stage_params)
            backward = getattr(programs, name)
            out[name] = backward.lower(*kept, *cotangents[stage], None).compile()
            if self.microbatches * self.accumulation > 1:
                # The sums: the whole output of `first`'s backward (embedding and layer
                # gradients), the parameter gradients of the others.
                sums = out[name].out_info if stage == "first" else out[name].out_info[0]
                out[f"{name}_acc"] = backward.lower(*kept, *cotangents[stage], sums).compile()
        return out

    def compile_decode_programs(
        self, batch: int, seq_len: int, max_len: int
    ) -> dict[str, jax.stages.Compiled]:
        """The programs of one decoding call (`_decode_step`) on a micro-batch of `batch`
        sequences: `seq_len` new tokens (the prompt, or 1) against KV caches of `max_len`
        positions, dropless routing; compiled ahead of time, nothing allocated."""
        split = self.token_split(batch)
        programs = self.programs(split)
        capacity = group_capacity(programs.inference_cfg, seq_len)
        x = self.abstract_stage_inputs(batch, seq_len, capacity)
        cache = self.abstract_caches(batch, max_len)[0]
        start = jax.ShapeDtypeStruct(
            (), jnp.int32, sharding=NamedSharding(self.attention_mesh, P())
        )
        params = x.params
        keys = sorted(params["layers"], key=int)
        first_layer, layer = params["layers"][keys[0]], params["layers"][keys[-1]]
        out = {
            "first": programs.first.lower(
                params["embed"], attention_part(first_layer), x.tokens, x.constants, cache, start
            ).compile(),
            "experts": programs.decode_experts.lower(
                layer["moe"]["experts"], x.expert_inputs, x.expert_rows, x.sequence_ids, None, 0
            ).compile(),
            "last_logits": programs.last_logits.lower(
                head_part(params), x.state, x.received
            ).compile(),
        }
        if len(keys) > 1:
            out["middle"] = programs.middle.lower(
                attention_part(layer), x.state, x.received, x.constants, cache, start
            ).compile()
        return out

    def abstract_caches(self, batch: int, max_len: int) -> list[decode.KVCache]:
        """ShapeDtypeStructs of `init_caches(batch, max_len)` (with shardings)."""
        shape = (batch, max_len, self.heads.num_devices * self.heads.slots_per_device)
        shape = (*shape, self.heads.head_dim)
        sharding = NamedSharding(self.programs(self.token_split(batch)).mesh, CACHE)
        zeros = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
        return [decode.KVCache(zeros, zeros) for _ in range(self.num_layers)]


class StageInputs(NamedTuple):
    """Abstract inputs of one micro-batch's stage programs (`MARunner.abstract_stage_inputs`):
    ShapeDtypeStructs with shardings. Pieces are wire arrays (float32, or int8 with each row's
    scale packed on its end when compressing); their cotangents are float32."""

    split: TokenSplit
    params: Params
    tokens: jax.ShapeDtypeStruct  # [b, S] int32, replicated on the attention pool
    state: TokenState
    received: tuple  # one wire array [R, E/J, b, C, M] per expert device, on the attention pool
    expert_inputs: tuple  # one wire array [J, E/J, b/G, C, M] per sequence shard, on the experts
    received_cotangents: tuple
    expert_cotangents: tuple
    constants: LayerConstants
    expert_rows: jax.ShapeDtypeStruct
    sequence_ids: jax.ShapeDtypeStruct


def _wire(shape: tuple, sharding: NamedSharding, compressed: bool) -> Any:
    """Abstract wire array of a piece: float32, or int8 with each row's float32 scale packed
    on its end (`compression.pack_int8`)."""
    if not compressed:
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    packed = (*shape[:-1], shape[-1] + compression.SCALE_BYTES)
    return jax.ShapeDtypeStruct(packed, jnp.int8, sharding=sharding)


def _like(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


@jax.jit
def _canonical_squared_norm(tree: Tree, rows: list[jax.Array]) -> jax.Array:
    """Sum of squares of expert leaves [E, ...] (in `tree_paths` order, `rows[i]` the row of
    each canonical expert in leaf i): per expert, then over the experts in canonical order."""
    total = jnp.float32(0)
    for (_, x), row in zip(tree_paths(tree), rows, strict=True):
        per_expert = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
        total = total + jnp.sum(per_expert[row])
    return total


@jax.jit
def _mean(values: list[jax.Array]) -> jax.Array:
    return jnp.mean(jnp.stack(values))


def device_bytes(tree: Any) -> int:
    """Bytes the device arrays of `tree` hold on this process's devices, summed over every device
    that holds a copy. From shapes and shardings alone: walking `addressable_shards` costs the
    driver more than dispatching the step's programs."""
    return sum(_leaf_device_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=1024)
def _leaf_device_bytes(shape: tuple, dtype: Any, sharding: jax.sharding.Sharding) -> int:
    shard = math.prod(sharding.shard_shape(shape)) * dtype.itemsize  # key arrays too
    return shard * len(sharding.addressable_devices)


def pool_bytes_per_stage(split: TokenSplit, batch: int, seq: int, width: int, top_k: int) -> int:
    """Bytes the attention pool's collectives move inside it for one stage of a micro-batch of
    `batch` sequences, summed over the receiving devices (ring algorithms): the all-gather of the
    normed activations [b, S, M] over SEQ before attention, and the reduce-scatter over SEQ plus
    the all-reduce over REP of the attention output after it; the combine's all-reduce over REP
    sums each of the `top_k` choices' terms (`StagePrograms._combine`), `top_k` times as much.
    Scalars and routing statistics are left out."""
    g, r = split.sequence_shards, split.replicas
    devices = g * r
    activations = 4 * batch * seq * width
    shard = activations // g
    gather = devices * shard * (g - 1)
    scatter = devices * shard * (g - 1)
    all_reduce = devices * 2 * shard * (r - 1) // r
    return gather + scatter + (1 + top_k) * all_reduce
