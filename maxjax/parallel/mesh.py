"""The 16-device mesh of the seed (4 nodes x 4 GPUs) and its attention / expert submeshes.

Device numbers in the config index `jax.devices()`. With fewer devices than the config needs,
`require_devices` says how to emulate them on CPU.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
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
    `mesh` that this process holds, as one replicated array there. (`jax.device_put` between
    replicated shardings of different device sets would go through host memory.)"""
    target = NamedSharding(mesh, P())
    if x.sharding.device_set == target.device_set:
        return x
    source = x.addressable_shards[0].data
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    copies = jax.device_put([source] * len(devices), devices)
    return jax.make_array_from_single_device_arrays(x.shape, target, copies, dtype=x.dtype)


def enable_cross_process_transfers(coordinator_address: str | None = None) -> None:
    """Let `jax.device_put` copy between devices of different processes (the pieces that cross
    between the pools do, when the pools sit on different hosts). JAX's cross-host transfers
    listen on `jax_cross_host_transfer_socket_address`; unless it is set (or MAXJAX_TRANSFER_ADDRESS
    gives one), this picks a free port on the address the coordinator reaches this host by
    (loopback when the coordinator is local). Call before `jax.distributed.initialize`."""
    import os
    import socket

    from jax._src import xla_bridge

    if xla_bridge.CROSS_HOST_TRANSFER_SOCKET_ADDRESS.value:
        return
    address = os.environ.get("MAXJAX_TRANSFER_ADDRESS")
    if address is None:
        coordinator = (coordinator_address or "").rsplit(":", 1)[0]
        local = coordinator in ("", "127.0.0.1", "localhost", "::1")
        host = "127.0.0.1" if local else socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        address = f"{host}:{port}"
    jax.config.update("jax_cross_host_transfer_socket_address", address)
