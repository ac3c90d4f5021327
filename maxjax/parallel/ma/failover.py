"""Attention replicas and in-place failover (seed §5.9).

With ``ma_separation.attention.replication_factor: 2`` every attention device also holds a
*standby copy* of its ring predecessor's shard: the head slots and vocabulary rows of the
parameters and of both AdamW moments (the norms and the router are on every attention device
already). `refresh_standby` makes the copy after every step: one program on the attention pool
that shifts each split leaf one position along the ring (`lax.ppermute`, device to device), so
the copy is bit for bit what its owner holds.

When devices fail (`fail_devices`), the runner is rebuilt over the survivors and the state from
what survives; nothing is read from a failed device:

- a failed **attention** device's shard comes from its standby's copy. With
  ``ma_separation.attention.failover: spare_expert_device`` (the default) a surviving expert
  device takes the failed device's place in the pool (`spare_expert_devices`, `with_spares`) and
  its experts go to the other expert devices like a failed expert device's, but with their own
  state: the head distribution and every mesh position stay as they were, so every sum over the
  pool is taken in the same order and the step computes the same bits as before the failure
  (with int8 traffic too, where a float rounding difference would flip a value lying on an int8
  rounding boundary). With ``standby``, or when a spare would leave no expert device, the
  failed device's heads join its standby's (`surviving_config`) and the pool and the vocabulary
  are re-split over the survivors: the same function, summed in another order. Either way the
  ring of standbys is set up again, so a later failure is survived too; a shard is lost only
  when a device and its standby fail together (`FailoverError`);
- a failed **expert** device's experts go to the surviving expert devices that hold the fewest
  (`surviving_experts`: ceil(E / survivors) slots per device, the extra slots empty), their
  weights and moments from an `ExpertSource` (the newest checkpoint, read to the host, only the
  lost experts taken; or their initial values). The other experts keep their state.

The caller redoes the step the failure interrupted on the rebuilt state, so every routed
assignment is served. This is emulation in one process: a "failed" device is one the runner
stops using (its arrays are deleted), not a lost process; a lost process needs a restart from a
checkpoint (tutorials/cluster.md). Rebuilding gathers the surviving shards through the host
(one copy of the state), which a multi-host system would do device to device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax
from jax import lax

from maxjax import model
from maxjax.config import Config, with_overrides
from maxjax.parallel.ma.layout import ATTENTION_POOL, EXPERT_POOL, ExpertOrder, layer_of
from maxjax.parallel.mesh import ATTENTION_AXIS, forget_device
from maxjax.parallel.runner import (
    Path,
    TrainState,
    Tree,
    map_with_path,
    merge,
    select,
    tree_paths,
)

STANDBY_TREES = ("params", "mu", "nu")


class FailoverError(RuntimeError):
    """A device failure that cannot be survived in place (one line, for the user)."""


def standby_position(position: int, pool_size: int) -> int:
    """Position in the attention pool of the device that holds the copy of `position`'s shard."""
    return (position + 1) % pool_size


def surviving_config(cfg: Config, failed: Iterable[int]) -> Config:
    """`cfg` laid out over the attention devices that survive `failed`: each failed device's
    heads join its standby's count (the standby already holds their parameters), and the failed
    devices are listed in `hardware.failed_devices`. Raises FailoverError when a shard lost both
    copies or there is no copy."""
    failed = sorted(set(failed))
    lost = check_copies(cfg, failed)
    if not lost:
        return cfg
    att = cfg.ma_separation.attention
    pool = list(att.devices)
    heads = list(att.head_distribution)
    for device in lost:
        position = pool.index(device)
        heads[standby_position(position, len(pool))] += heads[position]
    keep = [i for i, d in enumerate(pool) if d not in failed]
    devices = [pool[i] for i in keep]
    overrides = [
        f"ma_separation.attention.gpus={len(devices)}",
        f"ma_separation.attention.devices={devices}",
        f"ma_separation.attention.head_distribution={[heads[i] for i in keep]}",
        f"hardware.failed_devices={sorted(set(cfg.hardware.failed_devices) | set(lost))}",
    ]
    return with_overrides(cfg, overrides)


def check_copies(cfg: Config, failed: Iterable[int]) -> list[int]:
    """The attention devices among `failed`, once it is checked that each one's shard has a
    surviving copy (its standby's); raises FailoverError naming the lost shard otherwise."""
    att = cfg.ma_separation.attention
    failed = sorted(set(failed))
    pool = list(att.devices)
    lost = [d for d in failed if d in pool]
    if not lost:
        return lost
    if att.replication_factor < 2:
        raise FailoverError(
            f"attention device {lost[0]} failed and ma_separation.attention.replication_factor "
            "is 1: its heads have no other copy; restart from the newest checkpoint"
        )
    heads = list(att.head_distribution)
    for device in lost:
        position = pool.index(device)
        standby = pool[standby_position(position, len(pool))]
        if standby in failed:
            raise FailoverError(
                f"attention devices {device} and {standby} failed together: {standby} held the "
                f"only other copy of {device}'s shard (heads {_head_range(heads, position)}), "
                "so it is lost; restart from the newest checkpoint"
            )
    return lost


def spare_expert_devices(cfg: Config, failed: Iterable[int]) -> list[int]:
    """With `ma_separation.attention.failover: spare_expert_device`, the expert devices that take
    the places of the failed attention devices: the last surviving ones, as long as one expert
    device is left to hold the experts. [] when no attention device failed, with the 'standby'
    failover, or when too few expert devices survive (the failover then falls back to
    'standby')."""
    att = cfg.ma_separation.attention
    failed = set(failed)
    lost = [d for d in att.devices if d in failed]
    alive = [d for d in cfg.expert_devices if d not in failed]
    if not lost or att.failover != "spare_expert_device" or len(alive) <= len(lost):
        return []
    return alive[-len(lost) :]


def with_spares(cfg: Config, failed: Iterable[int], spares: list[int]) -> Config:
    """`cfg`, whose expert pool no longer holds `spares`, with each failed attention device
    replaced by a spare at its position in the pool: the head distribution, the mesh positions
    and so every sum over the pool stay as they were (the shard comes from the standby copy)."""
    failed = sorted(set(failed))
    lost = check_copies(cfg, failed)
    pool = list(cfg.ma_separation.attention.devices)
    for device, spare in zip(lost, spares, strict=True):
        pool[pool.index(device)] = spare
    recorded = (set(cfg.hardware.failed_devices) - set(spares)) | set(lost)
    overrides = [
        f"ma_separation.attention.devices={pool}",
        f"hardware.failed_devices={sorted(recorded)}",
    ]
    return with_overrides(cfg, overrides)


def _head_range(heads: list[int], position: int) -> str:
    first = sum(heads[:position])
    return f"{first}-{first + heads[position] - 1}"


def is_split(runner: Any, path: Path) -> bool:
    """An attention-pool leaf cut over the pool (head slots or vocabulary rows)."""
    return runner.pool_of(path) == ATTENTION_POOL and ATTENTION_AXIS in runner.spec_of(path)


def standby_source(runner: Any, exported: dict[str, Any]) -> dict[str, Tree]:
    """The leaves a standby copies: the attention pool's split leaves of params, mu and nu."""
    return {name: select(exported[name], lambda p: is_split(runner, p)) for name in STANDBY_TREES}


def standby_program(runner: Any, source: dict[str, Tree]) -> Any:
    """Jitted: every leaf of `source` shifted one position along the attention ring (shard a
    lands on device a + 1); the previous copy (second argument) is donated."""
    pool = len(runner.attention_devices)
    ring = [(a, standby_position(a, pool)) for a in range(pool)]
    specs = {
        name: map_with_path(lambda p, _: runner.spec_of(p), tree) for name, tree in source.items()
    }
    shift = jax.shard_map(
        lambda tree: jax.tree.map(lambda x: lax.ppermute(x, ATTENTION_AXIS, ring), tree),
        mesh=runner.attention_mesh,
        in_specs=(specs,),
        out_specs=specs,
    )
    return jax.jit(lambda tree, previous: shift(tree), donate_argnums=1)


def refresh_standby(runner: Any, state: TrainState) -> None:
    """Copy the attention pool's shards of `state` to their standbys (replication_factor 2)."""
    if runner.replicas < 2:
        runner.standby = None
        return
    source = standby_source(runner, {"params": state.params, **moments(state)})
    if runner._standby_program is None:
        runner._standby_program = standby_program(runner, source)
    runner.standby = runner._standby_program(source, runner.standby)


def moments(state: TrainState) -> dict[str, Tree]:
    """AdamW's first and second moments of every pool, merged into params-shaped trees."""
    return {
        name: merge(*(optax.tree_utils.tree_get(s, name) for s in state.opt_state.values()))
        for name in ("mu", "nu")
    }


def standby_bytes_per_device(runner: Any, params: Tree) -> int:
    """Bytes of the standby copy on one attention device: its predecessor's split leaves of the
    parameters and both moments (the same shapes as its own)."""
    if runner.replicas < 2:
        return 0
    total = 0
    for path, leaf in tree_paths(params):
        if is_split(runner, path):
            total += leaf.size * leaf.dtype.itemsize // len(runner.attention_devices)
    return len(STANDBY_TREES) * total


def _surviving_leaf(
    runner: Any, path: Path, leaf: jax.Array, copies: dict[Path, jax.Array], failed: set
) -> np.ndarray:
    """The whole MA-layout value of an attention-pool leaf from the survivors: each live device's
    own shard, and a failed device's shard from its standby's copy (`copies`, by path)."""
    shards = {shard.device: shard for shard in leaf.addressable_shards}
    if not is_split(runner, path):
        alive = next(s for d, s in shards.items() if d not in failed)
        return np.asarray(alive.data)
    copies = {shard.device: shard for shard in copies[path].addressable_shards}
    devices = runner.attention_devices
    blocks = []
    for position, device in enumerate(devices):
        if device in failed:
            standby = devices[standby_position(position, len(devices))]
            blocks.append(np.asarray(copies[standby].data))
        else:
            blocks.append(np.asarray(shards[device].data))
    return np.concatenate(blocks, axis=tuple(runner.spec_of(path)).index(ATTENTION_AXIS))


def failover_config(
    cfg: Config, order: ExpertOrder, failed: Iterable[int]
) -> tuple[Config, ExpertOrder, list[int]]:
    """The config and expert placement after `failed` fail together, and the expert devices
    spared for the attention pool (`spare_expert_devices`). Raises FailoverError when a shard
    lost both copies or nothing can hold the experts."""
    failed = sorted(set(failed))
    experts = [d for d in failed if d in cfg.expert_devices]
    spares = spare_expert_devices(cfg, failed)
    new_cfg = cfg if spares else surviving_config(cfg, failed)
    if experts or spares:
        new_cfg, order = surviving_experts(new_cfg, order, experts + spares)
    if spares:
        new_cfg = with_spares(new_cfg, failed, spares)
    return new_cfg, order, spares


def fail_devices(
    runner: Any,
    state: TrainState,
    devices: Iterable[int],
    tx: optax.GradientTransformation,
    lost_experts: ExpertSource | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Devices `devices` (config numbers) fail together: rebuild the runner and `state` over the
    survivors without reading from a failed device. A failed expert device's experts are taken
    from `lost_experts` (default: their initial values, `initial_experts`). Returns (state,
    failure record)."""
    start = time.perf_counter()
    failed_ids = sorted(set(devices))
    cfg = runner.cfg
    experts = [d for d in failed_ids if d in cfg.expert_devices]
    unknown = [d for d in failed_ids if d not in cfg.attention_devices and d not in experts]
    if unknown:
        raise FailoverError(
            f"device {unknown[0]} is in neither pool (attention {list(cfg.attention_devices)}, "
            f"experts {list(cfg.expert_devices)})"
        )
    if jax.process_count() > 1:
        raise FailoverError(
            "in-place failover needs every device in one process; restart the job from the "
            "newest checkpoint on the surviving devices"
        )
    new_cfg, order, spares = failover_config(cfg, runner.experts, failed_ids)
    before = runner.experts
    everything = jax.devices()
    failed = {everything[d] for d in failed_ids}
    exported = runner.export_train_state(state)
    copies = runner.standby
    copies_of = {n: dict(tree_paths(copies[n])) if copies else {} for n in STANDBY_TREES}
    restored, source_name = None, None
    if experts:
        restored, source_name = (lost_experts or initial_experts(runner))()
    canonical: dict[str, Any] = {"count": exported["count"]}
    for name in STANDBY_TREES:
        pools = runner.split_pools(exported[name])
        attention = map_with_path(
            lambda p, x, name=name: runner.layout.from_layout(
                p,
                _surviving_leaf(runner, p, x, copies_of[name], failed),
            ),
            pools[ATTENTION_POOL],
        )
        if experts:
            expert = map_with_path(
                lambda p, x, name=name: _surviving_experts(runner, p, x, failed, restored, name),
                pools[EXPERT_POOL],
            )
        else:
            expert = runner.to_canonical(pools[EXPERT_POOL])
        canonical[name] = merge(attention, expert)
    jax.block_until_ready(canonical)
    old = [exported[n] for n in STANDBY_TREES] + [state.opt_state, copies]
    microbatches = runner.microbatches  # the sync loop's choice outlives the new layout
    runner._build(new_cfg)
    runner.set_expert_order(order.order)
    runner.set_microbatches(microbatches)
    for leaf in jax.tree.leaves(old):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()
    for device in failed:
        forget_device(device)
    state = runner.import_train_state(canonical, state.step, tx)
    jax.block_until_ready((state, runner.standby))
    seconds = time.perf_counter() - start
    pool_names = sorted({"experts" if d in experts else "attention" for d in failed_ids})
    record = {
        "event": "failure",
        "step": state.step + 1,
        "device": failed_ids[0] if len(failed_ids) == 1 else failed_ids,
        "pool": pool_names[0] if len(pool_names) == 1 else pool_names,
        "recovery_seconds": seconds,
        # The interrupted step is redone once every expert is back, so no routed assignment
        # meets a missing expert: each is served.
        "tokens_served_fraction": 1.0,
        "layout": surviving_layout(runner),
    }
    if spares:
        record["spare_expert_devices"] = spares
    if experts:
        record["experts_restored_from"] = source_name
        record["experts_restored"] = _lost_experts(before, cfg.expert_devices, experts)
    return state, record


def surviving_layout(runner: Any) -> dict[str, Any]:
    """The layout a failover left: pools, heads per attention device, each device's standby."""
    att = runner.cfg.ma_separation.attention
    pool = list(att.devices)
    return {
        "attention_devices": pool,
        "head_distribution": list(att.head_distribution),
        "standby_of": {str(d): pool[standby_position(i, len(pool))] for i, d in enumerate(pool)}
        if runner.replicas > 1
        else {},
        "expert_devices": list(runner.cfg.expert_devices),
        "expert_slots_per_device": runner.cfg.ma_separation.moe.experts_per_gpu,
        "failed_devices": list(runner.cfg.hardware.failed_devices),
    }


# --- expert devices ----------------------------------------------------------------------------

ExpertSource = Callable[[], tuple[dict[str, Tree], str]]


def initial_experts(runner: Any) -> ExpertSource:
    """The lost experts' initial values (`init_params` of the run's seed) with zero moments: the
    source when no checkpoint has been written yet."""

    def source() -> tuple[dict[str, Tree], str]:
        seed = runner.cfg.training.seed
        params = jax.device_get(jax.jit(lambda: model.init_params(runner.cfg, seed))())
        zeros = jax.tree.map(np.zeros_like, params)
        return {"params": params, "mu": zeros, "nu": zeros}, "initial values"

    return source


def _spread(kept: list[list[int]], lost: list[int], slots: int) -> list[list[int]]:
    """`kept` (experts per surviving device) with `lost` added one by one to the device that
    holds the fewest (the first of those), never beyond `slots`."""
    out = [list(k) for k in kept]
    for expert in lost:
        device = min(range(len(out)), key=lambda i: (len(out[i]), i))
        if len(out[device]) >= slots:
            raise FailoverError(f"no expert slot left for expert {expert}")
        out[device].append(expert)
    return out


def _lost_experts(order: ExpertOrder, devices: tuple[int, ...], failed: list[int]) -> list:
    """Per layer, the experts on the failed expert devices (in row order)."""
    per_device = order.num_rows // len(devices)
    lost = []
    for layer in range(len(order.order)):
        rows = order.order[layer].reshape(len(devices), per_device)
        lost.append(
            [int(e) for j, d in enumerate(devices) if d in failed for e in rows[j] if e >= 0]
        )
    return lost


def surviving_experts(
    cfg: Config, order: ExpertOrder, failed: list[int]
) -> tuple[Config, ExpertOrder]:
    """`cfg` and the placement `order` over the expert devices that survive `failed`: each
    survivor keeps its experts, and the failed devices' experts go to the survivors holding the
    fewest, in ceil(E / survivors) slots per device (the extra slots empty)."""
    pool = cfg.ma_separation.moe
    devices = list(pool.devices)
    alive = [d for d in devices if d not in failed]
    if not alive:
        raise FailoverError(f"every expert device failed ({failed}); nothing can hold the experts")
    experts = order.num_experts
    slots = -(-experts // len(alive))
    per_device = order.num_rows // len(devices)
    layers = []
    lost_by_layer = _lost_experts(order, tuple(devices), failed)
    for layer, lost in enumerate(lost_by_layer):
        rows = order.order[layer].reshape(len(devices), per_device)
        kept = [[int(e) for e in rows[devices.index(d)] if e >= 0] for d in alive]
        placed = _spread(kept, lost, slots)
        layers.append([e for device in placed for e in device + [-1] * (slots - len(device))])
    mapping = _spread(
        [list(cfg.experts_of_device(d)) for d in alive],
        [e for d in devices if d in failed for e in cfg.experts_of_device(d)],
        slots,
    )
    overrides = [
        f"ma_separation.moe.gpus={len(alive)}",
        f"ma_separation.moe.devices={alive}",
        f"ma_separation.moe.experts_per_gpu={slots}",
        "ma_separation.moe.expert_mapping={"
        + ", ".join(f"gpu_{d}: {m}" for d, m in zip(alive, mapping, strict=True))
        + "}",
        f"hardware.failed_devices={sorted(set(cfg.hardware.failed_devices) | set(failed))}",
    ]
    return with_overrides(cfg, overrides), ExpertOrder.of(np.array(layers, np.int32))


def _surviving_experts(
    runner: Any, path: Path, leaf: jax.Array, failed: set, restored: dict[str, Tree], name: str
) -> np.ndarray:
    """The canonical value [E, ...] of an expert leaf: each expert from its device's shard, or
    from `restored` (a canonical tree) when its device failed."""
    layer = layer_of(path)
    order = runner.experts
    devices = list(runner.expert_mesh.devices.flat)
    per_device = order.num_rows // len(devices)
    shards = {shard.device: shard for shard in leaf.addressable_shards}
    backup = dict(tree_paths(restored[name]))[path]
    out = np.empty((order.num_experts, *leaf.shape[1:]), leaf.dtype)
    blocks = {}
    for expert, row in enumerate(order.row_of(layer)):
        device = devices[row // per_device]
        if device in failed:
            out[expert] = np.asarray(backup[expert])
        else:
            if device not in blocks:
                blocks[device] = np.asarray(shards[device].data)
            out[expert] = blocks[device][row % per_device]
    return out
