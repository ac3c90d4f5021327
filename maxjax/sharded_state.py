"""Per-process shard files: a checkpoint item for arrays that live on some processes only.

Orbax writes a jax.Array across processes only if every process holds a shard of it. MA
separation keeps its expert pool on the devices of some processes and its attention pool on the
others, so across processes its state is written by this item instead:

- every process writes the shards it holds (each distinct shard once: the replica 0 of its
  index) as raw files under ``<item>/process_<i>/``, with an ``index.json`` that gives each
  array's global shape and dtype and, per shard, its file and its index (start, stop per axis);
- host (numpy) leaves, the same on every process, are written whole by process 0.

Reading merges the indices of all processes (the directory must be one the processes share, as
for any multi-host checkpoint) and builds each requested array from the shards that overlap the
blocks its target sharding puts on this process's devices; nothing else is read. A target on
another layout of shards, or one host device for a whole array, is served the same way, so a
single process reads what four wrote.

The item runs inside orbax's CheckpointManager like its own handlers: orbax creates the temporary
step directory, waits for every process, and renames it only when all have written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxjax.parallel.runner import from_paths, map_with_path, tree_paths

INDEX = "index.json"


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]


def _write(path: Path, block: np.ndarray) -> None:
    np.ascontiguousarray(block).tofile(path)


class ShardFilesHandler(ocp.CheckpointHandler):
    """Orbax handler of the per-process shard files (see the module docstring)."""

    def save(self, directory: Any, args: ShardFilesSave) -> None:
        process = jax.process_index()
        out = Path(directory) / f"process_{process}"
        out.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {}
        for number, (path, leaf) in enumerate(tree_paths(args.item)):
            name = "/".join(path)
            entry = {
                "shape": list(np.shape(leaf)),
                "dtype": str(np.dtype(leaf.dtype)),
                "shards": [],
            }
            if isinstance(leaf, jax.Array):
                shape = tuple(leaf.shape)
                for k, shard in enumerate(s for s in leaf.addressable_shards if s.replica_id == 0):
                    file = f"{number}.{k}"
                    _write(out / file, np.asarray(shard.data))
                    entry["shards"].append({"file": file, "index": _bounds(shard.index, shape)})
            elif process == 0:
                file = f"{number}.host"
                _write(out / file, np.asarray(leaf))
                entry["shards"].append({"file": file, "index": [[0, n] for n in np.shape(leaf)]})
            index[name] = entry
        (out / INDEX).write_text(json.dumps(index))

    def restore(self, directory: Any, args: ShardFilesRestore) -> Any:
        stored = _merged_index(directory)

        def read(path: tuple[str, ...], target: Any) -> Any:
            name = "/".join(path)
            if name not in stored:
                raise FileNotFoundError(f"{name} is not in the shard files of {directory}")
            return _assemble(stored[name], target)

        return map_with_path(read, args.item)

    def metadata(self, directory: Any) -> dict[str, Any]:
        """The stored arrays as ShapeDtypeStructs, nested like the saved tree."""
        return from_paths(
            [
                (
                    tuple(name.split("/")),
                    jax.ShapeDtypeStruct(tuple(e["shape"]), _dtype(e["dtype"])),
                )
                for name, e in _merged_index(directory).items()
            ]
        )


def _dtype(name: str) -> np.dtype:
    return np.dtype(jax.numpy.dtype(name))


def _merged_index(directory: Any) -> dict[str, Any]:
    """{name: {shape, dtype, shards: [(path, bounds)]}} over every process's index."""
    merged: dict[str, Any] = {}
    indices = sorted(Path(directory).glob(f"process_*/{INDEX}"))
    if not indices:
        raise FileNotFoundError(f"no shard index under {directory}")
    for path in indices:
        for name, entry in json.loads(path.read_text()).items():
            into = merged.setdefault(
                name, {"shape": entry["shape"], "dtype": entry["dtype"], "shards": []}
            )
            if into["shape"] != entry["shape"] or into["dtype"] != entry["dtype"]:
                raise ValueError(f"processes disagree on the shape or dtype of {name}")
            into["shards"] += [(path.parent / s["file"], s["index"]) for s in entry["shards"]]
    return merged


def _read_block(entry: dict[str, Any], bounds: list[list[int]]) -> np.ndarray:
    """The block `bounds` of a stored array, copied from the shard files that overlap it."""
    dtype = _dtype(entry["dtype"])
    block = np.empty([stop - start for start, stop in bounds], dtype)
    if block.size == 0:
        return block
    covered = np.zeros(block.shape, bool)
    for path, shard_bounds in entry["shards"]:
        overlap = [
            (max(a0, b0), min(a1, b1))
            for (a0, a1), (b0, b1) in zip(bounds, shard_bounds, strict=True)
        ]
        if any(lo >= hi for lo, hi in overlap):
            continue
        shard_shape = tuple(hi - lo for lo, hi in shard_bounds)
        shard = np.memmap(path, dtype, mode="r", shape=shard_shape or (1,)).reshape(shard_shape)
        pairs = list(zip(overlap, shard_bounds, bounds, strict=True))
        src = tuple(slice(lo - s0, hi - s0) for (lo, hi), (s0, _), _ in pairs)
        dst = tuple(slice(lo - b0, hi - b0) for (lo, hi), _, (b0, _) in pairs)
        block[dst] = shard[src]
        covered[dst] = True
    if not covered.all():
        raise ValueError(f"the shard files do not cover the block {bounds}")
    return block


def _assemble(entry: dict[str, Any], target: Any) -> Any:
    """The stored array on `target`'s sharding (a ShapeDtypeStruct with one), or as numpy when
    the target has no sharding."""
    shape = tuple(entry["shape"])
    if tuple(target.shape) != shape:
        raise ValueError(f"stored shape {shape} differs from the requested {tuple(target.shape)}")
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return _read_block(entry, [[0, n] for n in shape])
    blocks: dict[str, np.ndarray] = {}
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = _bounds(index, shape)
        key = json.dumps(bounds)
        if key not in blocks:
            blocks[key] = _read_block(entry, bounds)
        pieces.append(jax.device_put(blocks[key].astype(target.dtype), device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces, dtype=target.dtype)


@ocp.args.register_with_handler(ShardFilesHandler, for_save=True)
@dataclasses.dataclass
class ShardFilesSave(ocp.args.CheckpointArgs):
    """Save a nested dict of jax.Arrays (any sharding, any processes) and numpy arrays."""

    item: Any


@ocp.args.register_with_handler(ShardFilesHandler, for_restore=True)
@dataclasses.dataclass
class ShardFilesRestore(ocp.args.CheckpointArgs):
    """Restore onto `item`: a nested dict of ShapeDtypeStructs (with a sharding for device
    arrays, without one for numpy)."""

    item: Any
