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


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or breaks a rule."""

    def __init__(self, key: str, rule: str):
        self.key = key
        self.rule = rule
        super().__init__(f"config key '{key}': {rule}")


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


@_frozen
class Model:
    type: str
    layers: int
    hidden_dim: int
    attention_heads: int
    head_dim: int


@_frozen
class MoE:
    experts_per_layer: int
    expert_hidden_dim: int
    top_k: int
    capacity_factor: float
    load_balancing_loss: float
    router_z_loss: float
    expert_dropout: float


@_frozen
class Sequence_:
    length: int
    batch_size: int
    total_tokens_per_batch: int


@_frozen
class Interconnect:
    intra_node: str
    inter_node: str


@_frozen
class Hardware:
    total_gpus: int
    gpu_type: str
    gpu_memory: str
    interconnect: Interconnect


@_frozen
class Nodes:
    architecture: str
    cpu: str
    system_memory: str
    gpu_mapping: dict[str, tuple[int, ...]]


@_frozen
class Attention:
    gpus: int
    devices: tuple[int, ...]
    head_distribution: tuple[int, ...]
    replication_factor: int


@_frozen
class MoEPool:
    gpus: int
    devices: tuple[int, ...]
    experts_per_gpu: int
    expert_mapping: dict[str, tuple[int, ...]]


@_frozen
class Synchronization:
    time_prediction_model: str
    sync_interval: int
    load_balancing_threshold: float
    communication_compression: str


@_frozen
class MASeparation:
    attention: Attention
    moe: MoEPool
    synchronization: Synchronization
    microbatches: int = 1
    transport: str = "device_put"


@_frozen
class Baselines:
    tensor_parallel: int = 8
    pipeline_parallel: int = 2
    microbatches: int = 2


@_frozen
class Training:
    dataset: str
    validation_split: float
    vocab_size: int
    source: str = "embedded"
    data_dir: str | None = None
    data_files: tuple[str, ...] = ()
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_interval: int = 10
    validation_interval: int = 100
    validation_batches: int = 4


@_frozen
class Optimizer:
    type: str
    learning_rate: float
    betas: tuple[float, ...]
    weight_decay: float
    gradient_clipping: float


@_frozen
class Schedule:
    warmup_steps: int
    total_steps: int
    decay: str


@_frozen
class Validation:
    """The seed's reported validation results (targets to compare with, not settings)."""

    perplexity: float | None = None
    convergence_speed: float | None = None
    reproducibility: str | None = None


@_frozen
class Checkpoint:
    directory: str = "checkpoints"
    interval_steps: int = 100
    max_to_keep: int = 3


@_frozen
class Config:
    model: Model
    moe: MoE
    sequence: Sequence_
    hardware: Hardware
    nodes: Nodes
    ma_separation: MASeparation
    training: Training
    optimizer: Optimizer
    schedule: Schedule
    baselines: Baselines = Baselines()
    validation: Validation = Validation()
    checkpoint: Checkpoint = Checkpoint()

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
TRANSPORT_CHOICES = ("device_put",)
SOURCE_CHOICES = ("embedded", "c4", "files")
DTYPE_CHOICES = ("float32", "bfloat16")


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
        (
            "ma_separation.synchronization.sync_interval",
            cfg.ma_separation.synchronization.sync_interval,
        ),
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
    _check(moe.capacity_factor > 0, "moe.capacity_factor", "must be positive")
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
    _check(
        att.gpus + pool.gpus == total,
        "ma_separation.moe.gpus",
        f"attention.gpus + moe.gpus must add up to hardware.total_gpus = {total}, "
        f"got {att.gpus} + {pool.gpus}",
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
        pool.experts_per_gpu * pool.gpus == moe.experts_per_layer,
        "ma_separation.moe.experts_per_gpu",
        f"experts_per_gpu * moe.gpus must equal moe.experts_per_layer = "
        f"{moe.experts_per_layer}, got {pool.experts_per_gpu} * {pool.gpus}",
    )
    expected_keys = {f"gpu_{d}" for d in pool.devices}
    _check(
        set(pool.expert_mapping) == expected_keys,
        "ma_separation.moe.expert_mapping",
        f"must have one entry per expert device, keys {sorted(expected_keys)}, "
        f"got {sorted(pool.expert_mapping)}",
    )
    for name, experts in pool.expert_mapping.items():
        _check(
            len(experts) == pool.experts_per_gpu,
            f"ma_separation.moe.expert_mapping.{name}",
            f"must hold experts_per_gpu = {pool.experts_per_gpu} experts, got {len(experts)}",
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
    b = cfg.baselines
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
            raise ConfigError(key, f"value {raw!r} is not valid YAML ({e})") from None
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
    if p.exists():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError("<path>", f"config file {str(path)!r} does not exist")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config, apply dotted overrides, and validate it."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"{p} is not valid YAML ({e})") from None
    if data is None:
        raise ConfigError("<file>", f"{p} is empty")
    return config_from_dict(apply_overrides(data, overrides))


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A validated copy of `cfg` with dotted overrides applied."""
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))
