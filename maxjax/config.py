"""Typed, validated configuration that mirrors the seed's YAML sections.

`load_config(path, overrides)` reads a YAML file, applies ``"dotted.key=value"`` overrides (values
parsed as YAML), builds frozen dataclasses and checks every rule the model and the device layout
rely on. Any violation raises `ConfigError` naming the key and the rule.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def one_line(error: BaseException | str) -> str:
    """An error's message (or any text) on one line: library messages (pyyaml's, orbax's) may
    span several, and a refused command prints exactly one line."""
    return " ".join(str(error).split())


def check_count(value: int | None, flag: str) -> None:
    """Raise ConfigError unless a command-line count (None: its default) is 1 or more."""
    if value is not None and value < 1:
        raise ConfigError(flag, f"must be 1 or more, got {value}")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or breaks a rule."""

    def __init__(self, key: str, rule: str):
        self.key = key
        self.rule = rule
        # '<path>', '<file>', '<root>': the problem is the file itself, not one of its keys.
        super().__init__(rule if key.startswith("<") else f"config key '{key}': {rule}")


_frozen = dataclasses.dataclass(frozen=True)


class FrozenMap(Mapping):
    """A read-only, hashable mapping, so that a Config can be a cache or jit static key."""

    def __init__(self, items: Mapping[str, Any]):
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def _key(doc: str, default: Any = dataclasses.MISSING) -> Any:
    """A config field with its meaning (`doc`), read by `key_docs` and `python -m maxjax.config`."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@_frozen
class Model:
    type: str = _key("description; the code has one model (seed)")
    layers: int = _key("decoder layers; every layer's feed-forward is the MoE layer (seed)")
    hidden_dim: int = _key("model width M; divisible by attention_heads (seed)")
    attention_heads: int = _key(
        "heads N, spread over the attention devices by head_distribution (seed)"
    )
    head_dim: int = _key(
        "width D of one head; equals hidden_dim / attention_heads; even (rotary pairs) (seed)"
    )


@_frozen
class MoE:
    experts_per_layer: int = _key("experts E in each MoE layer (seed)")
    expert_hidden_dim: int = _key(
        "hidden width H of one expert FFN (hidden -> H -> hidden, GELU) (seed)"
    )
    top_k: int = _key("experts per token, 1..experts_per_layer (seed)")
    capacity_factor: float | None = _key(
        "slots per expert and sequence: ceil(seq_tokens * top_k * capacity_factor / E); "
        "assignments past capacity are dropped (seed); null: dropless (seq_tokens slots, "
        "no assignment dropped; with ma_separation.expert_compute 'filled_slots' the MA expert "
        "stage computes only the filled ones)"
    )
    load_balancing_loss: float = _key(
        "coefficient of the load-balancing loss E * sum_i f_i * P_i (seed)"
    )
    router_z_loss: float = _key(
        "coefficient of the router z-loss mean_t logsumexp(logits_t)^2 (seed)"
    )
    expert_dropout: float = _key(
        "dropout on the expert hidden activation, training only; in [0, 1) (seed)"
    )


@_frozen
class Sequence_:
    length: int = _key("tokens per training sequence; one sequence is one routing group (seed)")
    batch_size: int = _key(
        "sequences per global batch; divisible by ma_separation.microbatches (seed)"
    )
    total_tokens_per_batch: int = _key("tokens per batch; equals length * batch_size (seed)")


@_frozen
class Interconnect:
    intra_node: str = _key("link inside a node, descriptive (seed)")
    inter_node: str = _key("link between nodes, descriptive (seed)")


@_frozen
class Hardware:
    total_gpus: int = _key(
        "devices of the whole system; on CPU JAX emulates this many; "
        "equals attention.gpus + moe.gpus + the failed devices (seed)"
    )
    gpu_type: str = _key("the seed's GPU, descriptive (seed)")
    gpu_memory: str = _key("the seed's GPU memory, descriptive (seed)")
    interconnect: Interconnect = _key("the seed's links (seed)")
    failed_devices: tuple[int, ...] = _key(
        "devices that have failed and are in neither pool: written by an attention failover "
        "(`MARunner.fail_devices`) into the surviving layout it reports, and given with --set "
        "to restart a job on that layout (maxjax)",
        (),
    )


@_frozen
class Nodes:
    architecture: str = _key("description of the node layout (seed)")
    cpu: str = _key("the seed's host CPU, descriptive (seed)")
    system_memory: str = _key("the seed's host memory, descriptive (seed)")
    gpu_mapping: dict[str, tuple[int, ...]] = _key(
        "devices of each node, keys node_0 .. node_<n-1>, each node the same size; every "
        "device 0..total_gpus-1 exactly once; row i of the (node, gpu) mesh (seed)"
    )


@_frozen
class Attention:
    gpus: int = _key("size of the attention pool (seed)")
    devices: tuple[int, ...] = _key(
        "the attention pool's device numbers; disjoint from moe.devices (seed comment)"
    )
    head_distribution: tuple[int, ...] = _key(
        "heads per attention device, in the order of devices; sums to model.attention_heads (seed)"
    )
    replication_factor: int = _key(
        "2: every attention device also holds an exact standby copy of its ring predecessor's "
        "head and vocabulary shard (parameters and AdamW moments, refreshed device to device "
        "after every step), so a failed attention device is replaced without a restart; "
        "1: no copy (seed)"
    )
    failover: str = _key(
        "how a failed attention device is replaced: 'spare_expert_device' puts a surviving "
        "expert device in its place in the pool (its shard from the standby copy, that device's "
        "experts spread over the other expert devices), so the attention layout and every sum "
        "stay as they were and the losses equal those without the failure; 'standby' gives its "
        "heads to its standby and lays the pool out over the survivors. 'spare_expert_device' "
        "falls back to 'standby' when no expert device can be spared (maxjax)",
        "spare_expert_device",
    )


@_frozen
class MoEPool:
    gpus: int = _key("size of the expert pool (seed)")
    devices: tuple[int, ...] = _key("the expert pool's device numbers (seed comment)")
    experts_per_gpu: int = _key(
        "expert slots per expert device and layer: experts_per_layer / gpus, rounded up when "
        "they do not divide (after an expert device failed; the extra slots stay empty) (seed)"
    )
    expert_mapping: dict[str, tuple[int, ...]] = _key(
        "which experts live on which expert device, keys gpu_<d>; a partition of 0..E-1 (seed)"
    )


@_frozen
class Synchronization:
    time_prediction_model: str = _key("the stage-time predictor, descriptive (seed)")
    sync_interval: int = _key(
        "steps between sync points: a measured step, refits of the time models and the "
        "re-placement of experts in layers out of balance (and the micro-batch count re-chosen "
        "with rechoose_microbatches); 0: off (seed)"
    )
    load_balancing_threshold: float = _key(
        "imbalance of a layer's expert devices (predicted stage times; kept loads before a "
        "time model is fitted) above which the sync loop re-places its experts, and of the two "
        "pools' measured stage times above which it re-chooses the micro-batch count; in [0, 1) "
        "(seed)"
    )
    communication_compression: str = _key(
        "'8-bit quantization' (int8 + one float32 scale per token between the pools) or 'none' "
        "(seed)"
    )
    rechoose_microbatches: bool = _key(
        "whether the sync loop also re-chooses ma_separation.microbatches (explores double or "
        "half, then keeps the count with the smaller predicted step time); off by default: "
        "another count sums the micro-batches' gradients in another order, so a run's losses "
        "are no longer bit for bit those of the same run without the loop (maxjax)",
        False,
    )


@_frozen
class MASeparation:
    attention: Attention = _key("the attention pool (seed)")
    moe: MoEPool = _key("the expert pool (seed)")
    synchronization: Synchronization = _key("the time predictor and balancer (seed)")
    microbatches: int = _key(
        "micro-batches per step in ping-pong between the pools; divides sequence.batch_size "
        "(maxjax)",
        1,
    )
    gradient_accumulation: int = _key(
        "rounds per step: the batch is cut into gradient_accumulation x microbatches "
        "micro-batches, and each round of `microbatches` runs forward and backward before the "
        "next, gradients summed, so only one round's activations are alive (maxjax)",
        1,
    )
    transport: str = _key(
        "how buffer pieces move between the pools within one process: 'device_put' "
        "(device-to-device copies of the blocks that cross) or 'collective' (collective "
        "permutes in exchange programs over both pools); across processes always 'collective' "
        "(maxjax)",
        "device_put",
    )
    expert_compute: str = _key(
        "what an expert device computes in training: 'filled_slots' (only the slots that hold "
        "tokens, packed into tiles: its work follows the load its experts serve) or "
        "'capacity' (every slot of the capacity buffers, one batched product) (maxjax)",
        "capacity",
    )


@_frozen
class Baselines:
    tensor_parallel: int = _key(
        "TP degree of the 'tp' and 'tp_pp' baselines; divides total_gpus, heads and experts "
        "(maxjax)",
        8,
    )
    pipeline_parallel: int = _key(
        "PP degree of the 'pp' and 'tp_pp' baselines; divides model.layers (maxjax)", 2
    )
    microbatches: int = _key("GPipe micro-batches of the pipeline baselines (maxjax)", 2)


@_frozen
class Training:
    dataset: str = _key("the seed's data, descriptive; what is read is chosen by source (seed)")
    validation_split: float = _key("fraction of documents held out for validation (seed)")
    vocab_size: int = _key("rows of the embedding table and logits; at least 50257 (seed)")
    source: str = _key(
        "'embedded' (offline help text), 'c4' (TFDS) or 'files' (maxjax)", "embedded"
    )
    data_dir: str | None = _key("TFDS data directory for source 'c4' (maxjax)", None)
    data_files: tuple[str, ...] = _key(
        "files or glob patterns (.txt, .jsonl, .json.gz) for source 'files' (maxjax)", ()
    )
    dtype: str = _key(
        "compute dtype of the matmuls, 'float32' or 'bfloat16'; parameters stay float32 (maxjax)",
        "float32",
    )
    gradient_checkpointing: bool = _key(
        "rematerialise activations in the backward pass: keep each layer's (MA: each stage's) "
        "input, compute the layer again for its gradient; every strategy (maxjax)",
        False,
    )
    seed: int = _key("seed of initialisation, data order and dropout keys (maxjax)", 0)
    log_interval: int = _key("steps between log lines without a progress bar (maxjax)", 10)
    validation_interval: int = _key(
        "steps between validation passes, also at the last step (maxjax)", 100
    )
    validation_batches: int = _key("validation batches per pass (maxjax)", 4)


@_frozen
class Optimizer:
    type: str = _key("the optimizer; only AdamW (seed)")
    learning_rate: float = _key("peak learning rate, reached at the end of warmup (seed)")
    betas: tuple[float, ...] = _key("AdamW beta1, beta2, each in [0, 1) (seed)")
    weight_decay: float = _key("decoupled weight decay on every matrix (seed)")
    gradient_clipping: float = _key(
        "maximum global gradient norm (over both pools under MA separation) (seed)"
    )


@_frozen
class Schedule:
    warmup_steps: int = _key("linear warmup from 0 to learning_rate; below total_steps (seed)")
    total_steps: int = _key(
        "training length; the cosine reaches 0 here; default --steps of maxjax.train (seed)"
    )
    decay: str = _key("decay after warmup; only 'cosine' (seed)")


@_frozen
class Validation:
    """The seed's reported validation results (targets to compare with, not settings)."""

    perplexity: float | None = _key("the seed's validation perplexity for MA separation", None)
    convergence_speed: float | None = _key("the seed's '% faster' convergence", None)
    reproducibility: str | None = _key("the seed's reproducibility claim", None)


@_frozen
class Checkpoint:
    directory: str = _key(
        "where maxjax.train writes checkpoints and metrics.jsonl (--checkpoint-dir overrides) "
        "(maxjax)",
        "checkpoints",
    )
    interval_steps: int = _key("steps between checkpoints, also at the last step (maxjax)", 100)
    max_to_keep: int = _key("newest checkpoints kept (maxjax)", 3)


@_frozen
class Config:
    model: Model = _key("the transformer (seed 4.1)")
    moe: MoE = _key("the MoE layers (seed 4.1)")
    sequence: Sequence_ = _key("sequence shape and batch (seed 4.1)")
    hardware: Hardware = _key("the system (seed 4.2)")
    nodes: Nodes = _key("the nodes (seed 4.2)")
    ma_separation: MASeparation = _key("the attention and expert pools (seed 4.3)")
    training: Training = _key("data and run settings (seed 6)")
    optimizer: Optimizer = _key("AdamW (seed 6)")
    schedule: Schedule = _key("learning-rate schedule (seed 6)")
    baselines: Baselines = _key("degrees of the Table 1 baselines (maxjax)", Baselines())
    validation: Validation = _key("the seed's reported results, not settings", Validation())
    checkpoint: Checkpoint = _key("checkpointing of maxjax.train (maxjax)", Checkpoint())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), the inverse of `config_from_dict`."""
        return _to_plain(self)

    # Derived quantities used across the package.
    @property
    def attention_devices(self) -> tuple[int, ...]:
        return self.ma_separation.attention.devices

    @property
    def expert_devices(self) -> tuple[int, ...]:
        return self.ma_separation.moe.devices

    def experts_of_device(self, device: int) -> tuple[int, ...]:
        """The experts that `expert_mapping` places on expert device `device`."""
        return self.ma_separation.moe.expert_mapping[f"gpu_{device}"]


COMPRESSION_CHOICES = ("8-bit quantization", "none")
TRANSPORT_CHOICES = ("device_put", "collective")
EXPERT_COMPUTE_CHOICES = ("filled_slots", "capacity")
ATTENTION_FAILOVER_CHOICES = ("spare_expert_device", "standby")
SOURCE_CHOICES = ("embedded", "c4", "files")
DTYPE_CHOICES = ("float32", "bfloat16")
# training.seed seeds jax.random.key, nnx.Rngs and the data order: a 32-bit unsigned integer
# (larger Python ints overflow when JAX converts them).
SEED_LIMIT = 2**32


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e.rule)
        raise ConfigError(key, "; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        (elem,) = typing.get_args(tp)[:1]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
        return FrozenMap({str(k): _coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()})
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"must be a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(key, f"unknown key (known keys here: {known})")
        kwargs[name] = _coerce(key, value, hints[name])
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(key, "required key is missing")
    return cls(**kwargs)


def _check(cond: bool, key: str, rule: str) -> None:
    if not cond:
        raise ConfigError(key, rule)


def validate(cfg: Config) -> None:
    """Check every cross-field rule; raise ConfigError naming the first key that breaks one."""
    m, moe, seq = cfg.model, cfg.moe, cfg.sequence
    for key, value in [
        ("model.layers", m.layers),
        ("model.hidden_dim", m.hidden_dim),
        ("model.attention_heads", m.attention_heads),
        ("model.head_dim", m.head_dim),
        ("moe.experts_per_layer", moe.experts_per_layer),
        ("moe.expert_hidden_dim", moe.expert_hidden_dim),
        ("sequence.length", seq.length),
        ("sequence.batch_size", seq.batch_size),
        ("hardware.total_gpus", cfg.hardware.total_gpus),
        ("training.vocab_size", cfg.training.vocab_size),
        ("schedule.total_steps", cfg.schedule.total_steps),
        ("ma_separation.microbatches", cfg.ma_separation.microbatches),
        ("ma_separation.gradient_accumulation", cfg.ma_separation.gradient_accumulation),
        ("checkpoint.interval_steps", cfg.checkpoint.interval_steps),
        ("checkpoint.max_to_keep", cfg.checkpoint.max_to_keep),
        ("baselines.tensor_parallel", cfg.baselines.tensor_parallel),
        ("baselines.pipeline_parallel", cfg.baselines.pipeline_parallel),
        ("baselines.microbatches", cfg.baselines.microbatches),
        ("training.log_interval", cfg.training.log_interval),
        ("training.validation_interval", cfg.training.validation_interval),
        ("training.validation_batches", cfg.training.validation_batches),
    ]:
        _check(value > 0, key, f"must be positive, got {value}")
    sync_interval = cfg.ma_separation.synchronization.sync_interval
    _check(
        sync_interval >= 0,
        "ma_separation.synchronization.sync_interval",
        f"must be non-negative (0 turns the sync loop off), got {sync_interval}",
    )
    _check(seq.length >= 2, "sequence.length", "must be at least 2 (next-token prediction)")
    _check(
        m.hidden_dim % m.attention_heads == 0,
        "model.hidden_dim",
        f"must be divisible by model.attention_heads ({m.hidden_dim} % {m.attention_heads} != 0)",
    )
    _check(
        m.head_dim == m.hidden_dim // m.attention_heads,
        "model.head_dim",
        f"must equal hidden_dim / attention_heads = {m.hidden_dim // m.attention_heads}",
    )
    _check(m.head_dim % 2 == 0, "model.head_dim", "must be even (rotary embeddings rotate pairs)")
    _check(
        1 <= moe.top_k <= moe.experts_per_layer,
        "moe.top_k",
        f"must be in 1..experts_per_layer ({moe.experts_per_layer}), got {moe.top_k}",
    )
    _check(
        moe.capacity_factor is None or moe.capacity_factor > 0,
        "moe.capacity_factor",
        "must be positive, or null (dropless)",
    )
    _check(0 <= moe.expert_dropout < 1, "moe.expert_dropout", "must be in [0, 1)")
    _check(moe.load_balancing_loss >= 0, "moe.load_balancing_loss", "must be non-negative")
    _check(moe.router_z_loss >= 0, "moe.router_z_loss", "must be non-negative")
    _check(
        seq.total_tokens_per_batch == seq.length * seq.batch_size,
        "sequence.total_tokens_per_batch",
        f"must equal length * batch_size = {seq.length * seq.batch_size}",
    )

    # Device layout.
    total = cfg.hardware.total_gpus
    nodes = cfg.nodes.gpu_mapping
    expected_nodes = [f"node_{i}" for i in range(len(nodes))]
    unknown = sorted(set(nodes) - set(expected_nodes))
    _check(
        not unknown,
        f"nodes.gpu_mapping.{unknown[0]}" if unknown else "nodes.gpu_mapping",
        "unknown node name; the nodes must be named node_0, node_1, ... in order",
    )
    _check(
        len({len(devs) for devs in nodes.values()}) <= 1,
        "nodes.gpu_mapping",
        "every node must hold the same number of devices",
    )
    mapped = [d for devs in cfg.nodes.gpu_mapping.values() for d in devs]
    _check(
        sorted(mapped) == list(range(total)) if mapped else True,
        "nodes.gpu_mapping",
        f"must list every device 0..{total - 1} exactly once",
    )
    att, pool = cfg.ma_separation.attention, cfg.ma_separation.moe
    _check(att.gpus > 0, "ma_separation.attention.gpus", "must be positive")
    _check(pool.gpus > 0, "ma_separation.moe.gpus", "must be positive")
    _check(
        len(att.devices) == att.gpus,
        "ma_separation.attention.devices",
        f"must list attention.gpus = {att.gpus} devices, got {len(att.devices)}",
    )
    _check(
        len(pool.devices) == pool.gpus,
        "ma_separation.moe.devices",
        f"must list moe.gpus = {pool.gpus} devices, got {len(pool.devices)}",
    )
    for key, devs in [
        ("ma_separation.attention.devices", att.devices),
        ("ma_separation.moe.devices", pool.devices),
    ]:
        _check(len(set(devs)) == len(devs), key, "must not repeat a device")
        _check(all(0 <= d < total for d in devs), key, f"devices must be in 0..{total - 1}")
    overlap = sorted(set(att.devices) & set(pool.devices))
    _check(
        not overlap,
        "ma_separation.moe.devices",
        f"must not overlap the attention devices (both hold {overlap})",
    )
    failed = cfg.hardware.failed_devices
    _check(
        len(set(failed)) == len(failed) and all(0 <= d < total for d in failed),
        "hardware.failed_devices",
        f"must list distinct devices in 0..{total - 1}",
    )
    in_pools = sorted(set(failed) & (set(att.devices) | set(pool.devices)))
    _check(
        not in_pools,
        "hardware.failed_devices",
        f"a failed device is in no pool, but {in_pools} is listed in one",
    )
    _check(
        att.gpus + pool.gpus + len(failed) == total,
        "ma_separation.moe.gpus",
        f"attention.gpus + moe.gpus (+ the failed devices) must add up to "
        f"hardware.total_gpus = {total}, got {att.gpus} + {pool.gpus}"
        + (f" + {len(failed)}" if failed else ""),
    )
    _check(
        len(att.head_distribution) == att.gpus,
        "ma_separation.attention.head_distribution",
        f"must have one entry per attention device ({att.gpus}), got {len(att.head_distribution)}",
    )
    _check(
        all(h >= 1 for h in att.head_distribution),
        "ma_separation.attention.head_distribution",
        "every attention device must hold at least one head",
    )
    _check(
        sum(att.head_distribution) == m.attention_heads,
        "ma_separation.attention.head_distribution",
        f"must sum to model.attention_heads = {m.attention_heads}, "
        f"got {sum(att.head_distribution)}",
    )
    _check(
        att.replication_factor in (1, 2),
        "ma_separation.attention.replication_factor",
        "must be 1 (no standby copy) or 2 (one standby copy per shard)",
    )
    _check(
        att.failover in ATTENTION_FAILOVER_CHOICES,
        "ma_separation.attention.failover",
        f"must be one of {ATTENTION_FAILOVER_CHOICES}, got {att.failover!r}",
    )
    _check(
        pool.experts_per_gpu == -(-moe.experts_per_layer // pool.gpus),
        "ma_separation.moe.experts_per_gpu",
        f"experts_per_gpu * moe.gpus must hold moe.experts_per_layer = "
        f"{moe.experts_per_layer} with less than one device's worth to spare "
        f"(experts_per_layer / gpus rounded up), got {pool.experts_per_gpu} * {pool.gpus}",
    )
    expected_keys = {f"gpu_{d}" for d in pool.devices}
    _check(
        set(pool.expert_mapping) == expected_keys,
        "ma_separation.moe.expert_mapping",
        f"must have one entry per expert device, keys {sorted(expected_keys)}, "
        f"got {sorted(pool.expert_mapping)}",
    )
    for name, experts in pool.expert_mapping.items():
        even = pool.experts_per_gpu * pool.gpus == moe.experts_per_layer
        _check(
            len(experts) == pool.experts_per_gpu if even else len(experts) <= pool.experts_per_gpu,
            f"ma_separation.moe.expert_mapping.{name}",
            f"must hold {'' if even else 'at most '}experts_per_gpu = {pool.experts_per_gpu} "
            f"experts, got {len(experts)}",
        )
    all_experts = sorted(e for es in pool.expert_mapping.values() for e in es)
    _check(
        all_experts == list(range(moe.experts_per_layer)),
        "ma_separation.moe.expert_mapping",
        f"must be a partition of the experts 0..{moe.experts_per_layer - 1} "
        "(each expert on exactly one device)",
    )
    sync = cfg.ma_separation.synchronization
    _check(
        sync.communication_compression in COMPRESSION_CHOICES,
        "ma_separation.synchronization.communication_compression",
        f"must be one of {COMPRESSION_CHOICES}, got {sync.communication_compression!r}",
    )
    _check(
        0 <= sync.load_balancing_threshold < 1,
        "ma_separation.synchronization.load_balancing_threshold",
        "must be in [0, 1)",
    )
    _check(
        cfg.ma_separation.transport in TRANSPORT_CHOICES,
        "ma_separation.transport",
        f"must be one of {TRANSPORT_CHOICES}, got {cfg.ma_separation.transport!r}",
    )
    _check(
        cfg.ma_separation.expert_compute in EXPERT_COMPUTE_CHOICES,
        "ma_separation.expert_compute",
        f"must be one of {EXPERT_COMPUTE_CHOICES}, got {cfg.ma_separation.expert_compute!r}",
    )
    b = cfg.baselines
    _check(
        seq.batch_size % cfg.ma_separation.microbatches == 0,
        "ma_separation.microbatches",
        f"must divide sequence.batch_size = {seq.batch_size} (equal micro-batches), "
        f"got {cfg.ma_separation.microbatches}",
    )
    rounds = cfg.ma_separation.gradient_accumulation
    _check(
        seq.batch_size % (cfg.ma_separation.microbatches * rounds) == 0,
        "ma_separation.gradient_accumulation",
        f"times ma_separation.microbatches = "
        f"{cfg.ma_separation.microbatches} divide sequence.batch_size = {seq.batch_size}, "
        f"got {rounds}",
    )
    _check(
        total % (b.tensor_parallel) == 0,
        "baselines.tensor_parallel",
        f"must divide hardware.total_gpus = {total}",
    )
    _check(
        total % (b.tensor_parallel * b.pipeline_parallel) == 0,
        "baselines.pipeline_parallel",
        f"tensor_parallel * pipeline_parallel must divide hardware.total_gpus = {total}",
    )

    # Training.
    tr, opt, sch = cfg.training, cfg.optimizer, cfg.schedule
    _check(0 < tr.validation_split < 1, "training.validation_split", "must be in (0, 1)")
    _check(tr.source in SOURCE_CHOICES, "training.source", f"must be one of {SOURCE_CHOICES}")
    _check(tr.dtype in DTYPE_CHOICES, "training.dtype", f"must be one of {DTYPE_CHOICES}")
    _check(
        0 <= tr.seed < SEED_LIMIT,
        "training.seed",
        f"must be in 0..{SEED_LIMIT - 1} (a 32-bit seed of jax.random.key), got {tr.seed}",
    )
    _check(
        tr.source != "files" or len(tr.data_files) > 0,
        "training.data_files",
        "must list at least one file when training.source is 'files'",
    )
    _check(
        tr.vocab_size >= 50257,
        "training.vocab_size",
        "must be at least 50257 (the GPT-2 tokenizer's size)",
    )
    _check(opt.type.lower() == "adamw", "optimizer.type", "only AdamW is implemented")
    _check(
        opt.learning_rate > 0,
        "optimizer.learning_rate",
        f"must be positive, got {opt.learning_rate}",
    )
    _check(len(opt.betas) == 2, "optimizer.betas", "must be a pair [beta1, beta2]")
    _check(all(0 <= b_ < 1 for b_ in opt.betas), "optimizer.betas", "each beta must be in [0, 1)")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", "must be non-negative")
    _check(opt.gradient_clipping > 0, "optimizer.gradient_clipping", "must be positive")
    _check(sch.warmup_steps >= 0, "schedule.warmup_steps", "must be non-negative")
    _check(
        sch.warmup_steps < sch.total_steps,
        "schedule.warmup_steps",
        f"must be smaller than schedule.total_steps = {sch.total_steps}",
    )
    _check(sch.decay in ("cosine",), "schedule.decay", "only 'cosine' is implemented")


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (parsed YAML or `Config.to_dict()`)."""
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", "the config must be a mapping of sections")
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


_OVERRIDE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)$", re.S)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with ``"dotted.key=value"`` overrides applied (values parsed as YAML)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        match = _OVERRIDE.match(item.strip())
        if not match:
            raise ConfigError(item, "override must look like 'section.key=value'")
        key, raw = match.groups()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"value {raw!r} is not valid YAML ({one_line(e)})") from None
        parts = key.split(".")
        node = data
        cls: Any = Config
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            names = (
                {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
            )
            if names is not None and part not in names:
                raise ConfigError(
                    here, f"unknown key (known keys here: {', '.join(sorted(names))})"
                )
            if names is None and not isinstance(node, dict):
                raise ConfigError(here, "cannot set a key inside a non-mapping value")
            if depth == len(parts) - 1:
                node[part] = value
                break
            if dataclasses.is_dataclass(cls):
                cls = typing.get_type_hints(cls)[part]
                cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
            else:
                cls = None
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(here, "cannot set a key inside a non-mapping value")
            node = child
    return data


def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by name in the repository's configs/ ('tiny', 'paper.yaml')."""
    p = Path(path)
    if not p.exists():
        p = next((c for c in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml") if c.is_file()), p)
    if not p.exists():
        raise ConfigError("<path>", f"config file {str(path)!r} does not exist")
    if p.is_dir():
        raise ConfigError("<path>", f"config path {str(path)!r} is a directory, not a YAML file")
    return p


BASE_KEY = "base"


def _label(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _leaf_sources(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_leaf_sources(value, source, f"{dotted}."))
        else:
            out[dotted] = source
    return out


def _merged(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key, every other value replaces."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    label = _label(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"{label} is not valid YAML ({one_line(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("<file>", f"{label} cannot be read ({e})") from None
    if data is None:
        raise ConfigError("<file>", f"{label} is empty")
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", f"{label} must be a mapping of sections")
    return dict(data)


def read_config_file(
    path: str | Path, _chain: tuple[Path, ...] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """(data, sources) of a YAML config with its `base:` chain resolved.

    `base: other.yaml` (relative to the file) names the config this one starts from; its keys
    are overridden by this file's. Chains are allowed, cycles are refused. `sources` maps each
    dotted leaf key to the file that set it.
    """
    p = resolve_config_path(path) if not _chain else Path(path)
    resolved = p.resolve()
    if resolved in _chain:
        cycle = " -> ".join(_label(c) for c in (*_chain, resolved))
        raise _with_source(
            ConfigError(BASE_KEY, f"the bases form a cycle ({cycle})"), _label(_chain[-1])
        )
    data = _read_yaml(p)
    base = data.pop(BASE_KEY, None)
    sources = _leaf_sources(data, _label(p))
    if base is None:
        return data, sources
    if not isinstance(base, str) or not base:
        raise _with_source(ConfigError(BASE_KEY, f"must name a YAML file, got {base!r}"), _label(p))
    base_path = p.parent / base
    if not base_path.is_file():
        problem = "does not exist" if not base_path.exists() else "is not a file"
        raise _with_source(
            ConfigError(BASE_KEY, f"base file {str(base_path)!r} {problem}"), _label(p)
        )
    base_data, base_sources = read_config_file(base_path, (*_chain, resolved))
    return _merged(base_data, data), {
        **{k: v for k, v in base_sources.items() if not _shadowed(k, data)},
        **sources,
    }


def _shadowed(dotted: str, data: Mapping[str, Any]) -> bool:
    """Whether `data` replaces the leaf `dotted` (it sets that key or a non-mapping above it)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, Mapping):
            return True
    return True


def _source_of(key: str, sources: Mapping[str, str], default: str) -> str:
    """The file that set `key` (or the nearest key above or below it), else `default`."""
    if key in sources:
        return sources[key]
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:depth]) in sources:
            return sources[".".join(parts[:depth])]
    below = sorted(k for k in sources if k.startswith(f"{key}."))
    return sources[below[0]] if below else default


def _with_source(error: ConfigError, source: str) -> ConfigError:
    located = ConfigError(error.key, error.rule)
    located.args = (f"{source}: {error}",)
    located.source = source
    return located


def load_config_with_sources(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[Config, dict[str, str]]:
    """(config, sources): `sources` maps each dotted key to the file (or '--set') that set it."""
    data, sources = read_config_file(path)
    top = _label(resolve_config_path(path))
    try:
        merged = apply_overrides(data, overrides)
    except ConfigError as e:
        raise _with_source(e, "--set") from None
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        sources = {k: v for k, v in sources.items() if k != key and not k.startswith(f"{key}.")}
        sources[key] = "--set"
    try:
        return config_from_dict(merged), sources
    except ConfigError as e:
        raise _with_source(e, _source_of(e.key, sources, top)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (resolving `base:`), apply dotted overrides, and validate it.

    Errors name the file (or '--set') that set the offending key.
    """
    return load_config_with_sources(path, overrides)[0]


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A validated copy of `cfg` with dotted overrides applied."""
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def key_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Every dotted config key (sections and leaves) with its meaning, in definition order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        out[dotted] = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(key_docs(hints[f.name], f"{dotted}."))
    return out


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6)
    return text.strip().removesuffix("...").strip()


def describe(cfg: Config, sources: Mapping[str, str]) -> str:
    """The resolved config, one `key: value  # source` line per leaf (source 'default' if unset)."""
    lines = [f"{key}: {_yaml_scalar(value)}" for key, value in _flat(cfg.to_dict()).items()]
    width = min(60, max(len(line) for line in lines))
    return "\n".join(
        f"{line.ljust(width)}  # {_source_of(line.split(':', 1)[0], sources, 'default')}"
        for line in lines
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m maxjax.config PATH [--set KEY=VALUE ...]`: print the resolved config."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m maxjax.config",
        description="Print a config with its bases resolved, each value with the file that set it.",
    )
    parser.add_argument("config", help="YAML config (path or name in configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg, sources = load_config_with_sources(args.config, args.overrides)
    except ConfigError as e:
        if os.environ.get("MAXJAX_DEBUG") == "1":
            raise
        print(f"maxjax.config: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(describe(cfg, sources))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
