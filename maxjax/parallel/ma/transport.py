"""Moving capacity-buffer pieces between the attention pool and the expert pool, device to device.

`jax.device_put` copies an array device to device only when the source and destination shardings
have the same shard layout; between layouts that differ (say replicated on 12 devices -> split
over 4) it goes through host memory. The stage programs (`maxjax.parallel.ma.stages`) therefore
emit exactly the blocks that cross: a *piece* is one sequence shard's rows for one expert
device's experts, a [1, E/J, b/G, C, M] block (int8 with its scales packed in when compressing)
that sits on one attention device as a shard of the outgoing array and is wanted on one expert
device as a shard of the expert program's input (and the same way back). `PieceTransport` takes each piece's single-device
buffer, copies it with one batched `jax.device_put` to its destination device, and assembles the
destination arrays from the copies with `jax.make_array_from_single_device_arrays` (no copy).

`PieceTransport` never waits for the data: the copies are queued behind the programs that produce
them, so the host goes on dispatching (the ping-pong of `maxjax.parallel.ma.schedule`).

Across processes `CollectivePieceTransport` moves the same blocks by collective permutes instead:
one small *exchange program* over a mesh of both pools' devices, in which every block goes
from its source device to its destination device (`lax.ppermute`, NCCL on GPU, gloo on CPU).
Every process issues the same exchange programs in the same order, each with its own blocks.
The moves are split into rounds in which no device sends or receives twice, one `ppermute` per
round. The price: an exchange program runs on both pools at once, so it waits for both to
reach it, and the host waits until the blocks an exchange sends are computed before it
dispatches the exchange (see `CollectivePieceTransport._copy`): across processes a step does
block the host there. (`jax.device_put` between single-device shardings of different processes
did not complete on CPU with gloo.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax.parallel.ma.layout import INCOMING, OUTGOING, TokenSplit
from maxjax.parallel.mesh import zeros_on

Tree = Any


def nbytes(tree: Tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class PieceTransport:
    """Copies pieces between the attention and the expert pool (see the module docstring)."""

    name = "device_put"

    def __init__(self, attention_devices: list[jax.Device], expert_mesh: Mesh):
        self.attention_devices = list(attention_devices)
        self.expert_mesh = expert_mesh
        self.expert_devices = list(expert_mesh.devices.flat)
        self.copies_dispatched = 0
        self._templates: dict[tuple, tuple[int | jax.Array | None, ...]] = {}
        self._shard_order: dict[Any, dict[jax.Device, int]] = {}

    # --- single-device views ---------------------------------------------------------------------

    def _block(self, x: jax.Array, device: jax.Device) -> jax.Array | None:
        """x's shard on `device` as an array of its own; None on another process's device. The
        shard order is found once per sharding: building every shard's index
        (`x.addressable_shards`) on each move costs more host time than the copies."""
        order = self._shard_order.get(x.sharding)
        if order is None:
            order = {shard.device: i for i, shard in enumerate(x.addressable_shards)}
            self._shard_order[x.sharding] = order
        return x.addressable_data(order[device]) if device in order else None

    def _copy(self, moves: list[tuple[jax.Array | None, jax.Device, jax.Device, tuple, Any]]):
        """Copy blocks (block, source, destination, shape, dtype) device to device in one batch;
        returns the destination blocks. Within one process only (`MARunner` moves pieces across
        processes with `CollectivePieceTransport`)."""
        if jax.process_count() > 1:
            raise RuntimeError("PieceTransport copies within one process; use the collective one")
        self.copies_dispatched += len(moves)
        return jax.device_put([m[0] for m in moves], [m[2] for m in moves])

    # --- the two directions ----------------------------------------------------------------------

    def to_experts(self, pieces: tuple[Tree, ...], split: TokenSplit) -> tuple[tuple, int]:
        """Outgoing pieces (one wire tree per expert device j, arrays [R, E/J, b, C, M] on the
        attention pool) -> expert-program inputs (one wire tree per sequence shard s, arrays
        [J, E/J, b/G, C, M] split over the expert pool). Returns (inputs, bytes crossed)."""
        leaves_by_j = [jax.tree.leaves(p) for p in pieces]
        treedef = jax.tree.structure(pieces[0])
        moves, index = [], {}
        for j, s, a in split.pairs():
            for n, leaf in enumerate(leaves_by_j[j]):
                src, dst = self.attention_devices[a], self.expert_devices[j]
                shape = (
                    1,
                    *leaf.shape[1:2],
                    leaf.shape[2] // split.sequence_shards,
                    *leaf.shape[3:],
                )
                index[(j, s, n)] = len(moves)
                moves.append((self._block(leaf, src), src, dst, shape, leaf.dtype))
        copied = self._copy(moves)
        crossed = sum(math.prod(m[3]) * np.dtype(m[4]).itemsize for m in moves)
        inputs = []
        for s in range(split.sequence_shards):
            leaves = []
            for n, leaf in enumerate(leaves_by_j[0]):
                blocks = [copied[index[(j, s, n)]] for j in range(split.expert_devices)]
                shape = moves[index[(0, s, n)]][3]
                global_shape = (split.expert_devices, *shape[1:])
                leaves.append(
                    self._assemble(
                        global_shape, NamedSharding(self.expert_mesh, INCOMING), blocks, leaf.dtype
                    )
                )
            inputs.append(jax.tree.unflatten(treedef, leaves))
        return tuple(inputs), crossed

    def to_attention(
        self, outputs: tuple[Tree, ...], split: TokenSplit, attention_mesh: Mesh
    ) -> tuple[tuple, int]:
        """Expert-program outputs (one wire tree per sequence shard) -> incoming pieces on the
        attention pool (one wire tree per expert device, arrays [R, E/J, b, C, M], zero blocks
        on the replicas that do not receive them). Returns (pieces, bytes crossed)."""
        leaves_by_s = [jax.tree.leaves(o) for o in outputs]
        treedef = jax.tree.structure(outputs[0])
        moves, index = [], {}
        for j, s, a in split.pairs():
            for n, leaf in enumerate(leaves_by_s[s]):
                src, dst = self.expert_devices[j], self.attention_devices[a]
                index[(j, s, n)] = len(moves)
                block = self._block(leaf, src)
                moves.append((block, src, dst, (1, *leaf.shape[1:]), leaf.dtype))
        copied = self._copy(moves)
        crossed = sum(math.prod(m[3]) * np.dtype(m[4]).itemsize for m in moves)
        sharding = NamedSharding(attention_mesh, OUTGOING)
        pieces = []
        for j in range(split.expert_devices):
            leaves = []
            for n, leaf in enumerate(leaves_by_s[0]):
                template = self._incoming_template(split, j, (1, *leaf.shape[1:]), leaf.dtype)
                blocks = [
                    copied[index[(j, block, n)]] if isinstance(block, int) else block
                    for block in template
                ]
                global_shape = (
                    split.replicas,
                    leaf.shape[1],
                    leaf.shape[2] * split.sequence_shards,
                    *leaf.shape[3:],
                )
                leaves.append(self._assemble(global_shape, sharding, blocks, leaf.dtype))
            pieces.append(jax.tree.unflatten(treedef, leaves))
        return tuple(pieces), crossed

    def _incoming_template(
        self, split: TokenSplit, j: int, block_shape: tuple, dtype: Any
    ) -> tuple[int | jax.Array | None, ...]:
        """The blocks of expert device j's incoming piece in mesh order: the sequence shard s
        whose copy goes there (an int), a zero block (a replica that receives nothing), or
        None (a device of another process). Made once per transport and key."""
        key = (split, j, block_shape, np.dtype(dtype).str)
        if key not in self._templates:
            self._templates[key] = self._make_template(split, j, block_shape, dtype)
        return self._templates[key]

    def _make_template(
        self, split: TokenSplit, j: int, block_shape: tuple, dtype: Any
    ) -> tuple[int | jax.Array | None, ...]:
        template: list[int | jax.Array | None] = []
        for s in range(split.sequence_shards):
            for r in range(split.replicas):
                device = self.attention_devices[split.attention_device(s, r)]
                if r == split.sender(j):
                    template.append(s)
                elif device.process_index == jax.process_index():
                    template.append(zeros_on(block_shape, dtype, device))
                else:
                    template.append(None)
        return tuple(template)

    @staticmethod
    def _assemble(
        shape: tuple[int, ...], sharding: NamedSharding, blocks: list, dtype: Any
    ) -> jax.Array:
        """One global array from its per-device blocks (in mesh order; None = other process)."""
        return jax.make_array_from_single_device_arrays(
            shape, sharding, [b for b in blocks if b is not None], dtype=dtype
        )


def permute_rounds(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of `pairs` (source, destination) grouped into rounds in which no source and no
    destination appears twice (a greedy edge colouring: at most 2 x the busiest device's
    degree rounds, as few as that degree when the moves are regular, as here)."""
    rounds: list[list[int]] = []
    busy: list[tuple[set, set]] = []
    for i, (src, dst) in enumerate(pairs):
        for r, (senders, receivers) in enumerate(busy):
            if src not in senders and dst not in receivers:
                rounds[r].append(i)
                senders.add(src)
                receivers.add(dst)
                break
        else:
            rounds.append([i])
            busy.append(({src}, {dst}))
    return rounds


class CollectivePieceTransport(PieceTransport):
    """`PieceTransport` whose copies are collective permutes in exchange programs over both
    pools (see the module docstring): what moves pieces between processes."""

    name = "collective"

    def __init__(self, attention_devices: list[jax.Device], expert_mesh: Mesh):
        super().__init__(attention_devices, expert_mesh)
        self.devices = self.attention_devices + self.expert_devices
        self.exchange_mesh = Mesh(np.array(self.devices), ("exchange",))
        self._slot = {d.id: i for i, d in enumerate(self.devices)}
        self._exchanges: dict[tuple, Any] = {}
        self.exchanges_dispatched = 0

    def _exchange(self, perms: tuple[tuple[tuple[int, int], ...], ...]) -> Any:
        """The program permuting one array per round: round r's blocks along `perms[r]`."""
        if perms not in self._exchanges:

            def body(*blocks: jax.Array) -> tuple[jax.Array, ...]:
                return tuple(
                    lax.ppermute(b, "exchange", list(p)) for b, p in zip(blocks, perms, strict=True)
                )

            spec = (P("exchange"),) * len(perms)
            self._exchanges[perms] = jax.jit(
                jax.shard_map(body, mesh=self.exchange_mesh, in_specs=spec, out_specs=spec)
            )
        return self._exchanges[perms]

    def _copy(self, moves: list[tuple[jax.Array | None, jax.Device, jax.Device, tuple, Any]]):
        """The exchange programs for `moves`, dispatched once the blocks they send are computed.

        That wait is the one place a step blocks the host. Without it, the devices that only
        add zero blocks start an exchange at once and wait inside its collective, each holding
        one of the CPU client's worker threads, which the programs still computing the sent
        blocks then lack: on 16 emulated devices that deadlocked (XLA aborts after 40 s) about
        one step in three once the host dispatched fast enough to get that far ahead."""
        jax.block_until_ready([m[0] for m in moves if m[0] is not None])
        self.copies_dispatched += len(moves)
        me = jax.process_index()
        out: list[jax.Array | None] = [None] * len(moves)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, _, _, shape, dtype) in enumerate(moves):
            groups[(shape, np.dtype(dtype).str)].append(i)
        sharding = NamedSharding(self.exchange_mesh, P("exchange"))
        for (shape, dtype), members in groups.items():
            ends = [(self._slot[moves[i][1].id], self._slot[moves[i][2].id]) for i in members]
            rounds = permute_rounds(ends)
            arrays = []
            for rnd in rounds:
                sent = {ends[k][0]: moves[members[k]][0] for k in rnd}
                blocks = [
                    sent[slot] if slot in sent else zeros_on(shape, dtype, device)
                    for slot, device in enumerate(self.devices)
                    if device.process_index == me
                ]
                global_shape = (len(self.devices) * shape[0], *shape[1:])
                arrays.append(self._assemble(global_shape, sharding, blocks, dtype))
            perms = tuple(tuple(ends[k] for k in rnd) for rnd in rounds)
            received = self._exchange(perms)(*arrays)
            self.exchanges_dispatched += 1
            for rnd, array in zip(rounds, received, strict=True):
                for k in rnd:
                    dst = moves[members[k]][2]
                    if dst.process_index == me:
                        out[members[k]] = self._block(array, dst)
        return out
