"""The 16-device mesh of the seed (4 nodes x 4 GPUs) and its attention / expert submeshes.

Device numbers in the config index `jax.devices()`. With fewer devices than the config needs,
`require_devices` says how to emulate them on CPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from maxjax.config import Config

NODE_AXIS = "node"
GPU_AXIS = "gpu"
ATTENTION_AXIS = "attention"
EXPERT_AXIS = "expert"


class DeviceError(RuntimeError):
    """The config needs more devices than this process can see."""


def require_devices(count: int) -> list[jax.Device]:
    """The first `count` devices of `jax.devices()`, or a DeviceError explaining how to get them."""
    devices = jax.devices()
    if len(devices) < count:
        raise DeviceError(
            f"this config needs {count} devices but JAX sees {len(devices)} "
            f"({devices[0].platform}). To emulate {count} devices on CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts "
            f"(or call jax.config.update('jax_num_cpu_devices', {count}) right after "
            "importing jax)."
        )
    return devices[:count]


def node_layout(cfg: Config) -> np.ndarray:
    """Device numbers arranged [node, gpu] from nodes.gpu_mapping (row i = node_i)."""
    mapping = cfg.nodes.gpu_mapping
    rows = [mapping[name] for name in sorted(mapping, key=lambda n: int(n.split("_")[-1]))]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DeviceError("nodes.gpu_mapping: every node must hold the same number of devices")
    return np.array(rows, dtype=int)


def full_mesh(cfg: Config) -> Mesh:
    """All `hardware.total_gpus` devices as a (node, gpu) mesh."""
    devices = require_devices(cfg.hardware.total_gpus)
    layout = node_layout(cfg)
    return Mesh(np.array(devices, dtype=object)[layout], (NODE_AXIS, GPU_AXIS))


def attention_submesh(cfg: Config) -> Mesh:
    """The attention pool (ma_separation.attention.devices) as a 1-D mesh, axis 'attention'."""
    devices = require_devices(cfg.hardware.total_gpus)
    return Mesh(np.array([devices[d] for d in cfg.attention_devices]), (ATTENTION_AXIS,))


def expert_submesh(cfg: Config) -> Mesh:
    """The expert pool (ma_separation.moe.devices) as a 1-D mesh, axis 'expert'."""
    devices = require_devices(cfg.hardware.total_gpus)
    return Mesh(np.array([devices[d] for d in cfg.expert_devices]), (EXPERT_AXIS,))


def replicate(x: jax.Array, mesh: Mesh) -> jax.Array:
    """A fully replicated array (a scalar, a key) copied device to device onto every device of
    `mesh`, as one replicated array there. (`jax.device_put` between replicated shardings of
    different device sets would go through host memory.) Each process copies its own copy: x
    is either on one process's devices, or a value every process holds on its own devices (a
    key computed the same way everywhere). A global array spread over processes moves by
    `replicate_tree`."""
    target = NamedSharding(mesh, P())
    if x.sharding.device_set == target.device_set:
        return x
    if not x.is_fully_addressable:
        raise ValueError(
            "replicate copies an array this process holds whole; use replicate_tree for "
            f"arrays on other processes' devices (got sharding {x.sharding})"
        )
    source = x.addressable_shards[0].data
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    copies = jax.device_put([source] * len(devices), devices)
    return jax.make_array_from_single_device_arrays(x.shape, target, copies, dtype=x.dtype)


def restrict(x: jax.Array, mesh: Mesh) -> jax.Array:
    """x, replicated on a set of devices that includes `mesh`'s, as an array replicated on
    `mesh` (no copy: the same buffers)."""
    devices = set(mesh.devices.flat)
    blocks = [s.data for s in x.addressable_shards if s.device in devices]
    return jax.make_array_from_single_device_arrays(
        x.shape, NamedSharding(mesh, P()), blocks, dtype=x.dtype
    )


_SUM_PROGRAMS: dict[tuple, jax.stages.Wrapped] = {}


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of `tree` (an array replicated on some devices, anywhere in the cluster)
    replicated on all devices of `mesh`, in one program over all devices: each leaf's value
    from one device that holds it, zeros from every other device, summed over devices (exact:
    adding zeros). Every process calls it with the same tree; what crosses processes is a
    collective (gloo on CPU, NCCL on GPU)."""
    leaves, treedef = jax.tree.flatten(tree)
    everywhere = everywhere_mesh()
    me = jax.process_index()
    inputs, kinds = [], []
    for x in leaves:
        kind = "key" if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype
        data = jax.random.key_data(x) if kind == "key" else x
        if data.dtype == np.bool_:
            data = data.astype(np.int32)
        source = min(x.sharding.device_set, key=lambda d: d.id)
        blocks = []
        for device in everywhere.devices.flat:
            if device.process_index != me:
                continue
            if device == source:
                block = next(s.data for s in data.addressable_shards if s.device == device)
            else:
                block = zeros_on(data.shape, data.dtype, device)
            blocks.append(block[None])
        sharding = NamedSharding(everywhere, P("all"))
        inputs.append(
            jax.make_array_from_single_device_arrays(
                (len(jax.devices()), *data.shape), sharding, blocks, dtype=data.dtype
            )
        )
        kinds.append(kind)
    key = tuple((x.shape, str(x.dtype)) for x in inputs)
    if key not in _SUM_PROGRAMS:
        _SUM_PROGRAMS[key] = jax.jit(
            jax.shard_map(
                lambda *xs: tuple(jax.lax.psum(x[0], "all") for x in xs),
                mesh=everywhere,
                in_specs=(P("all"),) * len(inputs),
                out_specs=(P(),) * len(inputs),
            )
        )
    summed = _SUM_PROGRAMS[key](*inputs)
    out = []
    for x, kind in zip(summed, kinds, strict=True):
        x = restrict(x, mesh)
        if kind == "key":
            x = jax.random.wrap_key_data(x)
        elif kind == np.bool_:
            x = x.astype(np.bool_)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def everywhere_mesh() -> Mesh:
    """Every device of every process as a 1-D mesh, axis 'all'."""
    return Mesh(np.array(jax.devices()), ("all",))


def fetch(tree: Any) -> Any:
    """Host values (numpy) of a tree of arrays, in every process, wherever the arrays live:
    with several processes every array comes over by `replicate_tree` first (always, so that
    every process runs the same programs in the same order)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.device_get(replicate_tree(tree, everywhere_mesh()))


_ZEROS: dict[tuple, jax.Array] = {}


def zeros_on(shape: tuple[int, ...], dtype: Any, device: jax.Device) -> jax.Array:
    """A cached zero array made on `device` (nothing from the host): the blocks a device adds
    where it has nothing to send."""
    key = (shape, np.dtype(dtype).str, device.id)
    if key not in _ZEROS:
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=SingleDeviceSharding(device))
        _ZEROS[key] = make()
    return _ZEROS[key]


def forget_device(device: jax.Device) -> None:
    """Drop what this module cached on `device` (a device that failed). The arrays are not
    deleted: another runner in the process may still use that device."""
    for key in [k for k in _ZEROS if k[2] == device.id]:
        del _ZEROS[key]
