"""Hardware specifications: rates, links and power of one device kind (configs/hardware/*.yaml).

`cpu-here` is measured on the running machine by `measure_cpu`; the GPU files cite datasheets.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml

HARDWARE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
EFFICIENCY_KINDS = ("matmul", "attention", "token", "memory", "link")


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """What one device and its links can do; all rates per device and per direction."""

    name: str
    matmul_flops: float
    memory_bytes_per_s: float
    memory_capacity_bytes: float
    intra_node_bytes_per_s: float
    nic_bytes_per_s: float
    nics_per_node: int
    gpus_per_node: int
    tdp_w: float
    idle_w: float
    program_overhead_s: float
    shard_overhead_s: float
    shared_host: bool
    overlap: bool
    efficiency: dict[str, float]

    @property
    def node_nic_bytes_per_s(self) -> float:
        """Bandwidth out of (or into) one node over all its NICs."""
        return self.nic_bytes_per_s * self.nics_per_node

    def with_nics(self, nics_per_node: int) -> HardwareSpec:
        return dataclasses.replace(self, nics_per_node=nics_per_node)


def spec_from_dict(data: dict[str, Any]) -> HardwareSpec:
    """Build a spec from parsed YAML; a missing or unknown key fails naming it."""
    names = [f.name for f in dataclasses.fields(HardwareSpec)]
    missing = [n for n in names if n not in data]
    unknown = [k for k in data if k not in names and k != "measured"]
    if missing:
        raise ValueError(f"hardware spec lacks {', '.join(missing)}")
    if unknown:
        raise ValueError(f"hardware spec has unknown keys {', '.join(unknown)}")
    eff = dict(data["efficiency"])
    lacking = [k for k in EFFICIENCY_KINDS if k not in eff]
    if lacking:
        raise ValueError(f"hardware spec efficiency lacks {', '.join(lacking)}")
    for key in ("matmul_flops", "memory_bytes_per_s", "intra_node_bytes_per_s", "nic_bytes_per_s"):
        if float(data[key]) <= 0:
            raise ValueError(f"hardware spec {key} must be positive, got {data[key]}")
    values = {n: data[n] for n in names}
    values["efficiency"] = {k: float(v) for k, v in eff.items()}
    for key in (
        "matmul_flops",
        "memory_bytes_per_s",
        "memory_capacity_bytes",
        "intra_node_bytes_per_s",
        "nic_bytes_per_s",
        "tdp_w",
        "idle_w",
        "program_overhead_s",
        "shard_overhead_s",
    ):
        values[key] = float(values[key])
    values["nics_per_node"] = int(values["nics_per_node"])
    values["gpus_per_node"] = int(values["gpus_per_node"])
    values["shared_host"] = bool(values["shared_host"])
    values["overlap"] = bool(values["overlap"])
    return HardwareSpec(**values)


def load_hardware(name_or_path: str) -> HardwareSpec:
    """A spec by name in configs/hardware/ ('a100-80gb') or by path."""
    path = Path(name_or_path)
    if not path.exists():
        path = HARDWARE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))
        raise ValueError(f"no hardware spec {name_or_path!r}; known: {', '.join(known)}")
    return spec_from_dict(yaml.safe_load(path.read_text()))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_time(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def measure_cpu(repeats: int = 7) -> dict[str, Any]:
    """Measure this host: float32 matmul rate, memory bandwidth, per-program and per-shard cost.

    The shard cost is what one more emulated device adds to a program dispatched over a pool
    (a trivial shard_map on 12 devices against one device), because emulated devices share the
    host's cores.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec

    size = 1024
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul_flops = 2 * size**3 / _median_time(lambda: matmul(a), repeats)

    n = 32 * 1024 * 1024  # 128 MiB of float32, well beyond the caches
    big = jnp.ones((n,), jnp.float32)
    stream = jax.jit(lambda x: x * 1.5 + 1.0)
    memory_rate = 2 * 4 * n / _median_time(lambda: stream(big), repeats)

    small = jnp.ones((8,), jnp.float32)
    tiny = jax.jit(lambda x: x + 1.0)
    program_overhead = _median_time(lambda: tiny(small), 50)

    devices = jax.devices()
    pool = min(12, len(devices))
    shard_overhead = 0.0
    if pool > 1:
        mesh = Mesh(np.array(devices[:pool]), ("pool",))
        spec = PartitionSpec("pool")
        sharded = jax.device_put(
            jnp.ones((pool * 8,), jnp.float32), jax.sharding.NamedSharding(mesh, spec)
        )
        over_pool = jax.jit(
            jax.shard_map(lambda x: x + 1.0, mesh=mesh, in_specs=spec, out_specs=spec)
        )
        pool_time = _median_time(lambda: over_pool(sharded), 50)
        shard_overhead = max(0.0, (pool_time - program_overhead) / (pool - 1))
    return {
        "matmul_flops": float(matmul_flops),
        "memory_bytes_per_s": float(memory_rate),
        "program_overhead_s": float(program_overhead),
        "shard_overhead_s": float(shard_overhead),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "emulated_devices": len(devices),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def cpu_spec_yaml(measured: dict[str, Any]) -> str:
    """The text of configs/hardware/cpu-here.yaml for measured rates (comments say where from)."""
    m = measured
    return f"""# This machine, measured by `python -m maxjax.bench project --measure-cpu` on {m["date"]}.
# CPU: {m["cpu_model"]}, {m["cores"]} cores, {m["emulated_devices"]} emulated JAX devices.
name: cpu-here
matmul_flops: {m["matmul_flops"]:.4e}  # measured: float32 1024^3 matmul, one jitted program, median
memory_bytes_per_s: {m["memory_bytes_per_s"]:.4e}  # measured: read+write of a 128 MiB float32 array
memory_capacity_bytes: 24.0e9  # this machine's RAM, shared by every emulated device
intra_node_bytes_per_s: {m["memory_bytes_per_s"]:.4e}  # a transfer between emulated devices is a copy in RAM (as measured above)
nic_bytes_per_s: {m["memory_bytes_per_s"]:.4e}  # no network: every emulated device is in this process
nics_per_node: 1
gpus_per_node: 16  # every emulated device on one host
tdp_w: 0.0  # not measured: no power meter here
idle_w: 0.0
program_overhead_s: {m["program_overhead_s"]:.4e}  # measured: dispatch + return of a trivial jitted program
shard_overhead_s: {m["shard_overhead_s"]:.4e}  # measured: extra cost per emulated device of a trivial 12-device shard_map
shared_host: true  # emulated devices share the cores: their programs run one after another
overlap: false  # a CPU core does not hide memory traffic behind arithmetic: time = compute + memory
efficiency:  # measured rates are achieved rates, so 1.0; kinds below matmul speed are not separated here
  matmul: 1.0
  attention: 1.0
  token: 1.0
  memory: 1.0
  link: 1.0
measured:
  cpu_model: "{m["cpu_model"]}"
  cores: {m["cores"]}
  date: "{m["date"]}"
"""


def write_cpu_spec(path: Path | None = None) -> Path:
    """Measure this host and write its spec (configs/hardware/cpu-here.yaml by default)."""
    path = path or HARDWARE_DIR / "cpu-here.yaml"
    path.write_text(cpu_spec_yaml(measure_cpu()))
    return path
