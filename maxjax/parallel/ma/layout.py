"""Where MA separation puts things: pure shape code, testable without compiling.

- `HeadLayout`: the heads of `head_distribution` on the attention devices, padded to equal slots.
- `ExpertOrder`: the experts in expert-device order (`expert_mapping`).
- `TokenSplit`: how a micro-batch's sequences are split over the attention pool for the
  token-wise parts of a layer, and which attention device exchanges which piece with which
  expert device.
- `ParamLayout`: which pool holds a parameter, its PartitionSpec there, and the leaf transforms
  between the single-device layout and the MA layout (pad heads and vocabulary, permute experts).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from maxjax.config import Config
from maxjax.parallel.mesh import ATTENTION_AXIS, EXPERT_AXIS
from maxjax.parallel.vocab import padded_size

ATTENTION_POOL = "attention"
EXPERT_POOL = "experts"
QKV = ("query", "key", "value")

SEQ = "seq"  # attention-pool axis over which a micro-batch's sequences are split
REP = "rep"  # attention-pool axis of the devices that share one sequence shard
POOL = (SEQ, REP)  # both: every attention device (heads, vocabulary)

TOKENS = P(SEQ)  # token-wise arrays [b, S, ...] on the attention pool: split by sequence shard
OUTGOING = P(REP, None, SEQ)  # pieces on the attention pool [R, E/J, b, C, M]
INCOMING = P(EXPERT_AXIS)  # pieces on the expert pool [J, E/J, b/G, C, M]
CACHE = P(None, None, POOL, None)  # KV cache [b, T, A*n_max, D]: split by head slots

Path = tuple[str, ...]


class HeadLayout(NamedTuple):
    """How the N heads are spread over the A attention devices, padded to n_max slots each."""

    heads_per_device: tuple[int, ...]
    slots_per_device: int  # n_max
    head_dim: int

    @classmethod
    def from_config(cls, cfg: Config) -> HeadLayout:
        heads = tuple(cfg.ma_separation.attention.head_distribution)
        return cls(heads, max(heads), cfg.model.head_dim)

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
    """Experts in expert-device order, per layer: in layer l, device j holds rows
    j*R/J .. (j+1)*R/J - 1 of order[l] (R rows: the experts, plus empty slots, -1, when the
    experts do not divide evenly over the devices, as after an expert device failed). Starts as
    `expert_mapping` in every layer; the sync loop may re-place each layer's experts
    (`MARunner.move_experts`)."""

    order: np.ndarray  # [L, R]: canonical expert of each row, -1 = empty ([1, R]: every layer)
    row_of_expert: np.ndarray  # [L, E]: row of each canonical expert

    @classmethod
    def of(cls, order: np.ndarray | list) -> ExpertOrder:
        """From [L, R] rows, or one [R] order for every layer (checkpoints before per-layer
        placement stored that); each row holds every expert 0..E-1 once and -1 elsewhere."""
        order = np.atleast_2d(np.asarray(order, np.int32))
        experts = int(np.sum(order[0] >= 0)) if order.ndim == 2 else 0
        if order.ndim != 2 or any(
            sorted(row[row >= 0]) != list(range(experts)) or np.any(row < -1) for row in order
        ):
            raise ValueError(
                "an expert order is [layers, rows], each row holding every expert once "
                f"(-1: an empty slot): {order}"
            )
        row_of = np.zeros((order.shape[0], experts), np.int32)
        for layer, row in enumerate(order):
            filled = np.flatnonzero(row >= 0)
            row_of[layer, row[filled]] = filled
        return cls(order, row_of)

    @classmethod
    def from_config(cls, cfg: Config) -> ExpertOrder:
        slots = cfg.ma_separation.moe.experts_per_gpu
        order = []
        for d in cfg.expert_devices:
            experts = list(cfg.experts_of_device(d))
            order += experts + [-1] * (slots - len(experts))
        return cls.of(np.tile(np.array(order, np.int32), (cfg.model.layers, 1)))

    @property
    def num_experts(self) -> int:
        return self.row_of_expert.shape[1]

    @property
    def num_rows(self) -> int:
        """R: the experts and the empty slots."""
        return self.order.shape[1]

    def rows(self, layer: int) -> np.ndarray:
        """Canonical expert of each row in `layer` [R], -1 for an empty slot."""
        return self.order[layer if len(self.order) > 1 else 0]

    def row_of(self, layer: int) -> np.ndarray:
        """Row of each canonical expert in `layer` [E]."""
        return self.row_of_expert[layer if len(self.order) > 1 else 0]

    def source_rows(self, source: ExpertOrder, layer: int) -> np.ndarray:
        """For each row of this order in `layer`, the row of `source` holding the same expert
        (-1 for an empty slot): the gather that turns `source`'s expert arrays into ours."""
        rows = self.rows(layer)
        return np.where(rows >= 0, source.row_of(layer)[np.maximum(rows, 0)], -1)

    def mapping(self, layer: int, devices: list[str]) -> dict[str, list[int]]:
        """`expert_mapping` of one layer: each device's experts, in row order."""
        per_device = self.num_rows // len(devices)
        rows = self.rows(layer).reshape(len(devices), per_device)
        return {
            device: [int(e) for e in row if e >= 0]
            for device, row in zip(devices, rows, strict=True)
        }


class TokenSplit(NamedTuple):
    """The token-wise parts of a layer for a micro-batch of b sequences on A attention devices.

    The pool is viewed as a (SEQ = G) x (REP = R) mesh, G = the largest divisor of A that divides
    b: attention device s*R + r holds sequences s*b/G .. (s+1)*b/G - 1 (its *sequence shard*) and
    computes their norms, router, dispatch and combine; the R devices of a shard do this
    identically. The capacity buffer of a shard, [E, b/G, C, M], is cut into one *piece* per
    expert device j (its E/J experts): piece (j, s) leaves from replica `sender(j)` of shard s and
    its output comes back to the same device, so each routed row crosses the boundary once each
    way. Attention itself runs on all A devices over all b sequences (all-gather before,
    reduce-scatter after, inside the pool).
    """

    sequence_shards: int  # G
    replicas: int  # R
    expert_devices: int  # J

    @classmethod
    def for_batch(cls, pool_size: int, batch: int, expert_devices: int) -> TokenSplit:
        shards = max(d for d in range(1, pool_size + 1) if pool_size % d == 0 and batch % d == 0)
        return cls(shards, pool_size // shards, expert_devices)

    def sender(self, expert_device: int) -> int:
        """The replica of every sequence shard that exchanges piece `expert_device`."""
        return expert_device % self.replicas

    def attention_device(self, shard: int, replica: int) -> int:
        """Position in the attention pool of (sequence shard, replica)."""
        return shard * self.replicas + replica

    def pairs(self) -> list[tuple[int, int, int]]:
        """(expert device j, sequence shard s, attention position) of every crossing piece."""
        return [
            (j, s, self.attention_device(s, self.sender(j)))
            for j in range(self.expert_devices)
            for s in range(self.sequence_shards)
        ]

    def mesh(self, attention_devices: np.ndarray) -> Mesh:
        """The attention pool as a (SEQ, REP) mesh, devices in pool order."""
        return Mesh(
            np.asarray(attention_devices).reshape(self.sequence_shards, self.replicas), POOL
        )


class ParamLayout:
    """Pools, PartitionSpecs and layout transforms of the parameters (pure; no devices)."""

    def __init__(self, cfg: Config):
        self.heads = HeadLayout.from_config(cfg)
        self.experts = ExpertOrder.from_config(cfg)
        self.vocab_size = cfg.training.vocab_size
        self.padded_vocab = padded_size(self.vocab_size, len(cfg.attention_devices))

    KIND = "ma"

    def describe(self) -> dict:
        """What fixes the leaves' shapes and order (JSON): stored with a checkpoint, so that
        `from_description(...).from_layout` reads it back into the single-device layout."""
        return {
            "kind": self.KIND,
            "expert_order": self.experts.order.tolist(),
            "heads_per_device": [int(n) for n in self.heads.heads_per_device],
            "head_dim": int(self.heads.head_dim),
            "vocab_size": int(self.vocab_size),
            "padded_vocab": int(self.padded_vocab),
        }

    @classmethod
    def from_description(cls, description: dict) -> ParamLayout:
        """The layout `describe` wrote, without a config or devices."""
        layout = cls.__new__(cls)
        heads = tuple(description["heads_per_device"])
        layout.heads = HeadLayout(heads, max(heads), description["head_dim"])
        layout.experts = ExpertOrder.of(description["expert_order"])
        layout.vocab_size = description["vocab_size"]
        layout.padded_vocab = description["padded_vocab"]
        return layout

    def with_expert_order(self, order: np.ndarray) -> ParamLayout:
        """The same layout with another expert placement ([L, E])."""
        layout = ParamLayout.__new__(ParamLayout)
        layout.__dict__.update(self.__dict__)
        layout.experts = ExpertOrder.of(order)
        return layout

    @staticmethod
    def is_expert(path: Path) -> bool:
        return "experts" in tuple(map(str, path))

    def pool_of(self, path: Path) -> str:
        return EXPERT_POOL if self.is_expert(path) else ATTENTION_POOL

    def spec_of(self, path: Path) -> P:
        """PartitionSpec of a MA-layout leaf on its pool's 1-D mesh (axis 'attention' or
        'expert'): heads and vocabulary split over the attention pool, experts over the expert
        pool, norms and router replicated."""
        path = tuple(map(str, path))
        if self.is_expert(path):
            return P(EXPERT_AXIS)
        if path[-2] in QKV or path[-2] == "lm_head":
            return P(None, ATTENTION_AXIS)
        if path[-2] in ("out", "embed"):
            return P(ATTENTION_AXIS, None)
        return P()

    def stage_spec_of(self, path: Path) -> P:
        """The same split on a stage program's (SEQ, REP) view of the attention pool."""
        spec = self.spec_of(path)
        return P(*(POOL if axis == ATTENTION_AXIS else axis for axis in spec))

    def to_layout(self, path: Path, x: jax.Array) -> jax.Array:
        """Canonical leaf -> MA layout (pad heads and vocabulary, permute experts)."""
        path = tuple(map(str, path))
        if self.is_expert(path):
            rows = self.experts.rows(layer_of(path))
            if np.all(rows >= 0):
                return x[rows]
            padded = jnp.concatenate([x, jnp.zeros_like(x[:1])])  # an empty slot: zeros
            return padded[np.where(rows >= 0, rows, x.shape[0])]
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

    def from_layout(self, path: Path, x: jax.Array) -> jax.Array:
        """MA-layout leaf -> canonical."""
        path = tuple(map(str, path))
        if self.is_expert(path):
            return x[self.experts.row_of(layer_of(path))]
        if path[-2] in QKV:
            return x[:, self.heads.real_columns()]
        if path[-2] == "out":
            return x[self.heads.real_columns()]
        if path[-2] == "embed":
            return x[: self.vocab_size]
        if path[-2] == "lm_head":
            return x[:, : self.vocab_size]
        return x


def layer_of(path: Path) -> int:
    """The layer index of a leaf under ("layers", "<l>", ...)."""
    path = tuple(map(str, path))
    return int(path[path.index("layers") + 1])
