"""Memory plan: the bytes each device holds at the peak of a training or decoding step, by part.

Nothing is allocated. Every size comes from abstract shapes with shardings, or from programs
compiled ahead of time for abstract inputs:

- an array (parameter, optimizer moment, gradient, saved residual, piece, token state, cache)
  counts its shard (`sharding.shard_shape`) on every device its sharding names;
- a program's temporaries are `memory_analysis().temp_size_in_bytes` on every device it runs
  on. Its arguments and outputs are not added again: they are the arrays above.

A step passes through *phases*, moments with different sets of arrays alive. For MA separation:
the end of a round's forward sweep (what the sweep keeps for the backward sweep alive: every
stage's VJP residuals, or with gradient checkpointing every stage's inputs), the backward sweep
at each layer (what is kept for the layers not yet done, gradients of the layers done) and the
optimizer update (all gradients). With several rounds of gradient accumulation, the sums of the
earlier rounds' gradients are alive in every phase. For the baselines: the loss-and-gradient
program (one program: its outputs, the gradients, exist while it runs) and the update. A phase's
temporaries are the largest of the programs that run in it. Each device's plan is its largest
phase; its parts are the parts alive in that phase, so they add up to its total.

Decoding: parameters, the KV caches of the config's batch for `max_len` positions, the states and
pieces of the prompt's forward pass (prefill) or of a one-token step, and the decode programs'
temporaries. Every strategy donates the caches to the program that returns their update, so
they are held once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax.config import Config
from maxjax.model import decode
from maxjax.model.transformer import group_capacity

PARTS = (
    "parameters",
    "gradients",
    "optimizer_state",
    "residuals",
    "transfer_buffers",
    "token_states",
    "kv_cache",
    "temporaries",
    "standby",
)


# --- bytes per device ----------------------------------------------------------------------------


def itemsize(dtype: Any) -> int:
    """Bytes per element; PRNG keys count their raw key data."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return dtype.itemsize
    return jnp.dtype(dtype).itemsize


def device_bytes(tree: Any, devices: int) -> np.ndarray:
    """Bytes per device of every array or ShapeDtypeStruct in `tree` (each leaf needs a
    sharding): the leaf's shard size on each device of its sharding, indexed like
    `jax.devices()`."""
    index = {d: i for i, d in enumerate(jax.devices())}
    out = np.zeros(devices)
    for leaf in jax.tree.leaves(tree):
        if leaf is None:
            continue
        sharding = leaf.sharding
        if sharding is None:
            raise ValueError(f"leaf {leaf} has no sharding; cannot place it on devices")
        shard = math.prod(sharding.shard_shape(leaf.shape)) * itemsize(leaf.dtype)
        for device in sharding.device_set:
            out[index[device]] += shard
    return out


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """One compiled program's memory per device (`memory_analysis`, zero where it does not
    run)."""

    name: str
    temp: np.ndarray
    argument_bytes: int
    output_bytes: int

    @classmethod
    def of(cls, name: str, compiled: jax.stages.Compiled, devices: int) -> ProgramMemory:
        index = {d: i for i, d in enumerate(jax.devices())}
        stats = compiled.memory_analysis()
        temp = np.zeros(devices)
        shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
        for device in set().union(*(s.device_set for s in shardings)):
            temp[index[device]] = stats.temp_size_in_bytes
        return cls(name, temp, stats.argument_size_in_bytes, stats.output_size_in_bytes)


def largest_temp(programs: dict[str, ProgramMemory], names: Iterable[str], devices: int):
    """Per device, the largest temporaries among the programs `names` (those present)."""
    temps = [programs[n].temp for n in names if n in programs]
    return np.max(temps, axis=0) if temps else np.zeros(devices)


# --- the plan ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    """The arrays alive at one moment of a step, bytes per device by part."""

    name: str
    parts: dict[str, np.ndarray]

    @property
    def total(self) -> np.ndarray:
        return sum(self.parts.values())


@dataclasses.dataclass
class MemoryPlan:
    """Phases of a step and the programs behind their temporaries; each device's peak."""

    config: str
    strategy: str
    mode: str  # "training" or "decoding"
    capacity_bytes: float
    pools: list[str]  # per device
    phases: list[Phase]
    programs: dict[str, ProgramMemory]
    settings: dict[str, Any]
    residual_leaves: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def peak(self, device: int) -> Phase:
        return max(self.phases, key=lambda p: p.total[device])

    def per_device(self) -> list[dict[str, Any]]:
        rows = []
        for device, pool in enumerate(self.pools):
            peak = self.peak(device)
            total = float(peak.total[device])
            rows.append(
                {
                    "device": device,
                    "pool": pool,
                    "peak_phase": peak.name,
                    "total_bytes": total,
                    **{part: float(peak.parts[part][device]) for part in PARTS},
                    "fraction_of_capacity": total / self.capacity_bytes,
                    "fits": total <= self.capacity_bytes,
                    "phase_totals": {p.name: float(p.total[device]) for p in self.phases},
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity_bytes,
            "config": self.config,
            "strategy": self.strategy,
            "mode": self.mode,
            "settings": self.settings,
            "parts": list(PARTS),
            "per_device": self.per_device(),
            "programs": {
                name: {
                    "temp_bytes_per_device": float(p.temp.max()),
                    "argument_bytes_per_device": p.argument_bytes,
                    "output_bytes_per_device": p.output_bytes,
                    "devices": [int(i) for i in np.flatnonzero(p.temp)] if p.temp.any() else [],
                }
                for name, p in self.programs.items()
            },
            "residual_leaves": self.residual_leaves,
        }


def _phase(name: str, devices: int, **parts: np.ndarray) -> Phase:
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown memory parts {sorted(unknown)}")
    return Phase(name, {part: parts.get(part, np.zeros(devices)) for part in PARTS})


def _compiled(programs: dict[str, jax.stages.Compiled], devices: int) -> dict:
    return {name: ProgramMemory.of(name, c, devices) for name, c in programs.items()}


def init_state(tx: optax.GradientTransformation, pool: Any) -> Any:
    """The optimizer state `Runner.init_train_state` makes for `pool`, abstract, placed."""
    from maxjax.parallel.runner import optimizer_init

    return optimizer_init(tx, pool).lower(pool).compile().out_info


def update_programs(
    runner: Any, params: Any, grads: Any, tx: optax.GradientTransformation
) -> tuple[dict[str, jax.stages.Compiled], dict[str, Any], dict[str, Any]]:
    """The programs of `Runner.apply_gradients` (squared norm and AdamW update per pool), and
    the optimizer state per pool as `init_train_state` places it and as the updates hold it
    (their outputs). The update is compiled again for the held state only if the first update
    places it differently."""
    from maxjax import optim

    out, at_init, states = {}, {}, {}
    params_pools, grads_pools = runner.split_pools(params), runner.split_pools(grads)
    for name, pool in grads_pools.items():
        out[f"squared_norm[{name}]"] = jax.jit(optim.squared_norm).lower(pool).compile()
    for name, pool in grads_pools.items():
        mesh = jax.tree.leaves(pool)[0].sharding.mesh
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
        norms = [scalar] * len(grads_pools)
        update = runner._update_fn(name, tx)
        at_init[name] = init_state(tx, params_pools[name])
        first = update.lower(params_pools[name], at_init[name], pool, norms).compile()
        states[name] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            first.out_info[1],
        )
        moved = jax.tree.leaves(
            jax.tree.map(lambda a, b: a.sharding != b.sharding, at_init[name], states[name])
        )
        out[f"update[{name}]"] = (
            update.lower(params_pools[name], states[name], pool, norms).compile()
            if any(moved)
            else first
        )
    return out, at_init, states


def optimizer_at_init(
    params: Any, at_init: dict[str, Any], devices: int, **more: np.ndarray
) -> Phase:
    """Right after `init_train_state`: the parameters and the optimizer state (`at_init`, per
    pool, from `update_programs`), and any `more` parts alive from the start (MA's standby)."""
    state = sum(device_bytes(pool_state, devices) for pool_state in at_init.values())
    return _phase(
        "optimizer init",
        devices,
        parameters=device_bytes(params, devices),
        optimizer_state=state,
        **more,
    )


def standby_bytes(runner: Any, devices: int) -> np.ndarray:
    """Per device: the standby copy of MA's attention replicas (replication_factor 2), its ring
    predecessor's split parameters and both moments, alive in every phase; 0 elsewhere."""
    out = np.zeros(devices)
    out[list(runner.cfg.attention_devices)] = runner.standby_bytes()
    return out


def _pools(runner: Any, params: Any, devices: int) -> list[str]:
    """Per device, the pools whose parameters it holds (joined with '+')."""
    names: list[set[str]] = [set() for _ in range(devices)]
    for name, pool in runner.split_pools(params).items():
        for device in np.flatnonzero(device_bytes(pool, devices)):
            names[device].add(name)
    return ["+".join(sorted(n)) or "-" for n in names]


# --- MA separation -------------------------------------------------------------------------------


def largest_leaves(tree: Any, count: int = 8) -> list[dict[str, Any]]:
    """The `count` largest leaves of `tree` per device (shape, dtype, bytes on one device)."""
    leaves = [
        {
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "bytes_per_device": math.prod(leaf.sharding.shard_shape(leaf.shape))
            * itemsize(leaf.dtype),
        }
        for leaf in jax.tree.leaves(tree)
    ]
    return sorted(leaves, key=lambda x: -x["bytes_per_device"])[:count]


def received_bytes(runner: Any, split: Any, received: tuple, devices: int, micro: int):
    """Bytes per device of `micro` micro-batches' incoming pieces on the attention pool: a
    device holds the pieces it exchanges itself (`TokenSplit.pairs`); the other replicas'
    blocks are one zero block per device, shared by every piece (the transport's cache)."""
    index = {d: i for i, d in enumerate(jax.devices())}
    out = np.zeros(devices)
    block = sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize(leaf.dtype)
        for leaf in jax.tree.leaves(received[0])
    )
    receives = np.zeros(devices)
    for _, _, position in split.pairs():
        receives[index[runner.attention_devices[position]]] += 1
    for device in runner.attention_devices:
        i = index[device]
        out[i] += micro * receives[i] * block
        if receives[i] < split.expert_devices:
            out[i] += block  # the shared zero block
    return out


def plan_ma_training(
    runner: Any, batch: int, seq_len: int, tx: optax.GradientTransformation
) -> tuple[list[Phase], dict[str, ProgramMemory], dict[str, Any]]:
    """Phases of `MARunner.train_step` on tokens [batch, seq_len + 1]."""
    n = len(jax.devices())
    micro, rounds = runner.microbatches, runner.accumulation
    size = batch // (micro * rounds)
    x = runner.abstract_stage_inputs(size, seq_len)
    compiled = runner.compile_training_programs(size, seq_len)
    params = x.params
    keys = sorted(params["layers"], key=int)
    layers = len(keys)
    remat = runner.cfg.training.gradient_checkpointing
    suffix = "" if remat else "_vjp"
    forward = [f"{stage}{suffix}" for stage in ("first", "middle", "experts")]
    forward = [name for name in forward if name in compiled]
    tokens = jax.ShapeDtypeStruct((size, seq_len + 1), jnp.int32, sharding=x.tokens.sharding)
    if remat:
        # Kept for the backward sweep: each stage's inputs. Layer 0 keeps its token slice,
        # a later layer the token state and received pieces it read; the experts their pieces.
        received = received_bytes(runner, x.split, x.received, n, micro)
        attention_kept = [micro * device_bytes(x.tokens, n)] + [
            micro * device_bytes(x.state, n) + received for _ in range(layers - 1)
        ]
        experts_kept = micro * device_bytes(x.expert_inputs, n)
        residual_of_layer = [a + experts_kept for a in attention_kept]
        state, pieces, aux, _ = compiled["middle" if layers > 1 else "first"].out_info
        expert_out = compiled["experts"].out_info
    else:
        attention_vjp = [
            device_bytes(compiled["first_vjp" if i == 0 else "middle_vjp"].out_info[1], n)
            for i in range(layers)
        ]
        experts_vjp = device_bytes(compiled["experts_vjp"].out_info[1], n)
        residual_of_layer = [micro * (a + experts_vjp) for a in attention_vjp]
        state, pieces, aux = compiled["middle_vjp" if layers > 1 else "first_vjp"].out_info[0]
        expert_out = compiled["experts_vjp"].out_info[0]
    step_tokens = micro * device_bytes(tokens, n)
    # The loop's last micro-batch: its outgoing pieces and its expert outputs are still held.
    in_flight = device_bytes(pieces, n) + device_bytes(expert_out, n)

    param_bytes = device_bytes(params, n)
    standby = standby_bytes(runner, n)
    grads = params  # `Runner.value_and_grad`: gradients have the placement of the parameters
    # After the first round the sums of the earlier rounds' gradients are alive throughout.
    summed = device_bytes(grads, n) if rounds > 1 else np.zeros(n)
    updates, at_init, opt_state = update_programs(runner, params, grads, tx)
    opt_bytes = device_bytes(opt_state, n)
    programs = _compiled({**compiled, **updates}, n)
    backward_programs = [name for name in compiled if name not in forward]
    phases = [
        _phase(
            "forward end",
            n,
            parameters=param_bytes,
            optimizer_state=opt_bytes,
            standby=standby,
            gradients=summed,
            residuals=sum(residual_of_layer),
            token_states=step_tokens
            + micro * device_bytes(state, n)
            + layers * micro * device_bytes(aux, n),
            transfer_buffers=received_bytes(runner, x.split, x.received, n, micro) + in_flight,
            temporaries=largest_temp(programs, compiled, n),
        )
    ]
    head_grads = device_bytes(compiled["head_step"].out_info[1], n)
    _, _, (d_h, d_gates, d_received) = compiled["head_step"].out_info
    cotangents = micro * device_bytes((d_h, d_gates), n)
    d_pieces = micro * device_bytes(d_received, n)
    # One micro-batch's cotangent pieces on the experts and back (float32).
    d_flight = device_bytes(x.expert_cotangents, n) + device_bytes(x.received_cotangents, n)
    for depth in reversed(range(layers)):
        done = [params["layers"][k] for k in keys[depth:]]
        embed = device_bytes(params["embed"], n) if depth == 0 else 0
        phases.append(
            _phase(
                f"backward layer {depth}",
                n,
                parameters=param_bytes,
                optimizer_state=opt_bytes,
                standby=standby,
                gradients=summed if rounds > 1 else head_grads + device_bytes(done, n) + embed,
                residuals=sum(residual_of_layer[: depth + 1]),
                token_states=step_tokens + cotangents + layers * micro * device_bytes(aux, n),
                transfer_buffers=d_pieces + d_flight,
                temporaries=largest_temp(programs, backward_programs, n),
            )
        )
    phases.append(
        _phase(
            "update",
            n,
            parameters=param_bytes,
            optimizer_state=opt_bytes,
            standby=standby,
            gradients=device_bytes(grads, n),
            temporaries=largest_temp(programs, updates, n),
        )
    )
    phases.append(optimizer_at_init(params, at_init, n, standby=standby))
    settings = {
        "batch": batch,
        "seq_len": seq_len,
        "microbatches": micro,
        "gradient_accumulation": rounds,
        "split": x.split,
        "residual_leaves": {
            name: largest_leaves(compiled[name].out_info[1])
            for name in ("first_vjp", "middle_vjp", "experts_vjp")
            if name in compiled and not remat
        },
    }
    return phases, programs, settings


def plan_ma_decoding(
    runner: Any, batch: int, prompt_len: int, max_len: int
) -> tuple[list[Phase], dict[str, ProgramMemory], dict[str, Any]]:
    """Phases of `MARunner.generate` on `batch` prompts of `prompt_len` tokens, caches of
    `max_len` positions: the prefill and a one-token step."""
    n = len(jax.devices())
    parts = runner.decode_parts(batch)
    size = batch // parts
    params = runner.abstract_params()
    caches = parts * device_bytes(runner.abstract_caches(size, max_len), n)
    phases, programs = [], {}
    for name, seq in (("prefill", prompt_len), ("decode step", 1)):
        compiled = runner.compile_decode_programs(size, seq, max_len)
        memory = _compiled(compiled, n)
        programs.update({f"{name}: {k}": v for k, v in memory.items()})
        capacity = group_capacity(decode.inference_config(runner.cfg), seq)
        x = runner.abstract_stage_inputs(size, seq, capacity)
        state, pieces, _, _ = compiled["first"].out_info
        phases.append(
            _phase(
                name,
                n,
                parameters=device_bytes(params, n),
                kv_cache=caches,
                token_states=parts * device_bytes((state, x.tokens), n),
                transfer_buffers=received_bytes(runner, x.split, x.received, n, parts)
                + device_bytes(pieces, n)
                + device_bytes(compiled["experts"].out_info, n),
                temporaries=largest_temp(memory, compiled, n),
            )
        )
    settings = {"batch": batch, "prompt_len": prompt_len, "max_len": max_len, "parts": parts}
    return phases, programs, settings


# --- baselines -----------------------------------------------------------------------------------


def plan_baseline_training(
    runner: Any, batch: int, seq_len: int, tx: optax.GradientTransformation
) -> tuple[list[Phase], dict[str, ProgramMemory], dict[str, Any]]:
    """Phases of `BaselineRunner.train_step` on tokens [batch, seq_len + 1]."""
    n = len(jax.devices())
    params = runner.abstract_params()
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = runner._value_and_grad.lower(params, tokens, key).compile()
    (_, metrics), grads = step.out_info
    updates, at_init, opt_state = update_programs(runner, params, grads, tx)
    programs = _compiled({"value_and_grad": step, **updates}, n)
    tokens_placed = step.input_shardings[0][1]
    token_bytes = device_bytes(
        jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=tokens_placed), n
    )
    common = {
        "parameters": device_bytes(params, n),
        "optimizer_state": device_bytes(opt_state, n),
        "gradients": device_bytes(grads, n),
    }
    phases = [
        _phase(
            "loss and gradients",
            n,
            **common,
            token_states=token_bytes + device_bytes(metrics, n),
            temporaries=largest_temp(programs, ["value_and_grad"], n),
        ),
        _phase("update", n, **common, temporaries=largest_temp(programs, updates, n)),
        optimizer_at_init(params, at_init, n),
    ]
    return phases, programs, {"batch": batch, "seq_len": seq_len}


def plan_baseline_decoding(
    runner: Any, batch: int, prompt_len: int, max_len: int
) -> tuple[list[Phase], dict[str, ProgramMemory], dict[str, Any]]:
    """Phases of `BaselineRunner.generate`: the prefill and a one-token step (caches donated)."""
    n = len(jax.devices())
    params = runner.abstract_params()
    padded = batch + (-batch % runner.degrees.data)
    caches = runner.abstract_caches(padded, max_len)
    start = jax.ShapeDtypeStruct((), jnp.int32)
    phases, programs = [], {}
    for name, seq in (("prefill", prompt_len), ("decode step", 1)):
        tokens = jax.ShapeDtypeStruct((padded, seq), jnp.int32)
        compiled = runner._decode_step.lower(params, tokens, caches, start).compile()
        memory = ProgramMemory.of("decode", compiled, n)
        programs[f"{name}: decode"] = memory
        logits, _ = compiled.out_info
        phases.append(
            _phase(
                name,
                n,
                parameters=device_bytes(params, n),
                kv_cache=device_bytes(caches, n),
                token_states=device_bytes(logits, n),
                temporaries=memory.temp,
            )
        )
    return phases, programs, {"batch": padded, "prompt_len": prompt_len, "max_len": max_len}


# --- entry point ---------------------------------------------------------------------------------


def plan(
    cfg: Config,
    strategy: str,
    *,
    decode: bool = False,
    capacity_bytes: float = 80e9,
    batch: int | None = None,
    prompt_len: int | None = None,
    max_len: int | None = None,
    runner: Any = None,
    tx: optax.GradientTransformation | None = None,
    config_name: str = "",
) -> MemoryPlan:
    """The memory plan of `strategy` for `cfg` on the devices JAX sees (16 emulated CPU devices
    stand in for the cluster: shapes and shardings are the cluster's). Training: one
    `train_step` on `batch` (default `sequence.batch_size`) sequences of `sequence.length`
    tokens. Decoding: `batch` prompts of `prompt_len` (default `sequence.length // 2`) tokens,
    caches of `max_len` (default `sequence.length`) positions. Pass the `runner` and `tx` a
    run will use to share their compiled programs with it."""
    from maxjax import optim
    from maxjax.parallel import check_strategy, make_runner

    if strategy not in ("ma", "tp", "pp", "tp_pp"):
        raise ValueError(
            f"--strategy: the memory plan covers ma, tp, pp and tp_pp, not {strategy!r}"
        )
    batch = batch or cfg.sequence.batch_size
    check_strategy(cfg, strategy, batch if not decode else None)
    runner = runner or make_runner(cfg, strategy)
    n = len(jax.devices())
    if decode:
        max_len = max_len or cfg.sequence.length
        prompt_len = prompt_len or max(1, cfg.sequence.length // 2)
        if not 1 <= prompt_len < max_len:
            raise ValueError(f"--prompt-len: {prompt_len} must be at least 1 and below {max_len}")
        build = plan_ma_decoding if strategy == "ma" else plan_baseline_decoding
        phases, programs, settings = build(runner, batch, prompt_len, max_len)
    else:
        build = plan_ma_training if strategy == "ma" else plan_baseline_training
        tx = tx or optim.make_optimizer(cfg)
        phases, programs, settings = build(runner, batch, cfg.sequence.length, tx)
    residual_leaves = settings.pop("residual_leaves", {})
    return MemoryPlan(
        config=config_name,
        strategy=strategy,
        mode="decoding" if decode else "training",
        capacity_bytes=capacity_bytes,
        pools=_pools(runner, runner.abstract_params(), n),
        phases=phases,
        programs=programs,
        settings={k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in settings.items()},
        residual_leaves=residual_leaves,
    )
