"""Moving capacity buffers between the attention pool and the expert pool.

A buffer has the experts on its leading axis, in expert-device order (see `maxjax.parallel.ma`):
on the attention pool it is replicated over the attention devices (every one of them computed
it), on the expert pool it is split over the expert devices (each holds the rows of its own
experts). Two transports move it, behind one interface:

- `DevicePutTransport`: `jax.device_put` onto the other submesh's sharding. Works inside one
  process; JAX copies each destination shard from a source device that holds it.
- `CollectiveTransport`: one program over the full mesh that moves the shards with `ppermute`.
  The per-device buffers of both pools are assembled, without copies, into one array over all
  devices; the program sends each expert device its rows (one permutation) and each attention
  device every expert device's rows (``attention devices`` permutations of ``expert devices``
  pairs each). This is what works across processes, where a device_put between hosts is not
  available. The program spans both pools, so it is a synchronisation point: it waits (on the
  host) for its input before it is dispatched, so that all devices reach its rendezvous close
  together (XLA's CPU collectives abort when a participant is late by more than a fixed
  timeout, which an overloaded machine with queued work otherwise hits). No ping-pong overlap
  survives across it.

Both move pytrees of such arrays (an int8 buffer and its scales travel together).
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax.config import Config
from maxjax.parallel.mesh import (
    ATTENTION_AXIS,
    EXPERT_AXIS,
    attention_submesh,
    expert_submesh,
    full_mesh,
)

Tree = Any


class Transport(abc.ABC):
    """Moves expert-major buffers between the attention and the expert submesh."""

    name = "abstract"

    def __init__(self, attention_mesh: Mesh, expert_mesh: Mesh):
        self.attention_mesh = attention_mesh
        self.expert_mesh = expert_mesh
        self.on_attention = NamedSharding(attention_mesh, P())
        self.on_experts = NamedSharding(expert_mesh, P(EXPERT_AXIS))
        self.programs_dispatched = 0

    @abc.abstractmethod
    def to_experts(self, tree: Tree) -> Tree:
        """Buffers replicated on the attention pool -> split by leading axis on the expert pool."""

    @abc.abstractmethod
    def to_attention(self, tree: Tree) -> Tree:
        """Buffers split on the expert pool -> replicated on every attention device."""


class DevicePutTransport(Transport):
    """`jax.device_put` between the submeshes (one process)."""

    name = "device_put"

    def to_experts(self, tree: Tree) -> Tree:
        return jax.device_put(tree, self.on_experts)

    def to_attention(self, tree: Tree) -> Tree:
        return jax.device_put(tree, self.on_attention)


class CollectiveTransport(Transport):
    """`ppermute` inside a shard_map over the full mesh (works across processes)."""

    name = "collective"

    def __init__(self, attention_mesh: Mesh, expert_mesh: Mesh, mesh: Mesh):
        super().__init__(attention_mesh, expert_mesh)
        self.mesh = mesh
        self.axes = tuple(mesh.axis_names)
        self.devices = list(mesh.devices.flat)
        position = {d: i for i, d in enumerate(self.devices)}
        self.attention_positions = [position[d] for d in attention_mesh.devices.flat]
        self.expert_positions = [position[d] for d in expert_mesh.devices.flat]
        if len(self.expert_positions) > len(self.attention_positions):
            raise ValueError("the collective transport needs at least as many attention devices")
        self.full_sharding = NamedSharding(mesh, P(self.axes))
        self._dummies: dict[tuple, jax.Array] = {}
        self._send = jax.jit(self._send_body)
        self._gather = jax.jit(self._gather_body)

    # --- schedules: (source position, destination position) pairs ------------------------------

    def send_pairs(self) -> list[tuple[int, int]]:
        """Attention device j (of the pool) sends expert device j its rows."""
        return list(zip(self.attention_positions, self.expert_positions, strict=False))

    def gather_rounds(self) -> list[list[tuple[int, int]]]:
        """Round r: expert device j sends its rows to attention device (j + r) mod A."""
        attn, experts = self.attention_positions, self.expert_positions
        return [
            [(experts[j], attn[(j + r) % len(attn)]) for j in range(len(experts))]
            for r in range(len(attn))
        ]

    # --- programs over the full mesh ------------------------------------------------------------

    def _send_body(self, full: jax.Array) -> jax.Array:
        groups = len(self.expert_positions)
        rows = full.shape[0] // len(self.devices) // groups
        group_of = np.zeros(len(self.devices), np.int32)
        for j, (src, _) in enumerate(self.send_pairs()):
            group_of[src] = j

        def body(local: jax.Array) -> jax.Array:
            me = jax.lax.axis_index(self.axes)
            start = jnp.asarray(group_of)[me] * rows
            block = jax.lax.dynamic_slice_in_dim(local, start, rows, axis=0)
            return jax.lax.ppermute(block, self.axes, self.send_pairs())

        return jax.shard_map(
            body, mesh=self.mesh, in_specs=P(self.axes), out_specs=P(self.axes), check_vma=False
        )(full)

    def _gather_body(self, full: jax.Array) -> jax.Array:
        groups = len(self.expert_positions)
        rounds = self.gather_rounds()
        # slot[r, p]: which expert group position p receives in round r (groups = nothing).
        slot = np.full((len(rounds), len(self.devices)), groups, np.int32)
        expert_index = {pos: j for j, pos in enumerate(self.expert_positions)}
        for r, pairs in enumerate(rounds):
            for src, dst in pairs:
                slot[r, dst] = expert_index[src]

        def body(local: jax.Array) -> jax.Array:
            me = jax.lax.axis_index(self.axes)
            out = jnp.zeros((groups, *local.shape), local.dtype)
            for r, pairs in enumerate(rounds):
                received = jax.lax.ppermute(local, self.axes, pairs)
                out = out.at[jnp.asarray(slot[r])[me]].set(received, mode="drop")
            return out.reshape(groups * local.shape[0], *local.shape[1:])

        return jax.shard_map(
            body, mesh=self.mesh, in_specs=P(self.axes), out_specs=P(self.axes), check_vma=False
        )(full)

    # --- assembling per-device buffers into arrays over the full mesh and back ---------------

    def _dummy(self, shape: tuple[int, ...], dtype: Any, device: jax.Device) -> jax.Array:
        key = (shape, np.dtype(dtype).str, device.id)
        if key not in self._dummies:
            self._dummies[key] = jax.device_put(np.zeros(shape, dtype), device)
        return self._dummies[key]

    def _on_full_mesh(self, x: jax.Array) -> jax.Array:
        """Every device's local buffer of x (zeros where x has none) as one full-mesh array."""
        local = {s.device: s.data for s in x.addressable_shards}
        block = x.sharding.shard_shape(x.shape)
        arrays = [
            local[d] if d in local else self._dummy(block, x.dtype, d)
            for d in self.devices
            if d.process_index == jax.process_index()
        ]
        shape = (block[0] * len(self.devices), *block[1:])
        return jax.make_array_from_single_device_arrays(
            shape, self.full_sharding, arrays, dtype=x.dtype
        )

    def _take(self, full: jax.Array, sharding: NamedSharding, shape: tuple[int, ...]) -> jax.Array:
        """The shards of `full` on the devices of `sharding`, as one array of `shape`."""
        local = {s.device: s.data for s in full.addressable_shards}
        arrays = [local[d] for d in sharding.mesh.devices.flat if d in local]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays, dtype=full.dtype)

    def to_experts(self, tree: Tree) -> Tree:
        def move(x: jax.Array) -> jax.Array:
            self.programs_dispatched += 1
            return self._take(self._send(self._on_full_mesh(x)), self.on_experts, x.shape)

        return jax.tree.map(move, jax.block_until_ready(tree))

    def to_attention(self, tree: Tree) -> Tree:
        def move(x: jax.Array) -> jax.Array:
            self.programs_dispatched += 1
            return self._take(self._gather(self._on_full_mesh(x)), self.on_attention, x.shape)

        return jax.tree.map(move, jax.block_until_ready(tree))


def make_transport(cfg: Config, name: str | None = None) -> Transport:
    """The transport named by `ma_separation.transport` (or `name`) for the config's pools."""
    name = name or cfg.ma_separation.transport
    attention, experts = attention_submesh(cfg), expert_submesh(cfg)
    if name == "device_put":
        return DevicePutTransport(attention, experts)
    if name == "collective":
        return CollectiveTransport(attention, experts, full_mesh(cfg))
    raise ValueError(f"unknown transport {name!r}; choose 'device_put' or 'collective'")


__all__ = [
    "ATTENTION_AXIS",
    "CollectiveTransport",
    "DevicePutTransport",
    "Transport",
    "make_transport",
]
