"""Checkpoints of a training run, written with orbax shard by shard, readable under any strategy.

A checkpoint directory holds one sub-directory per saved step (``DIR/<step>/``) with three items:

- ``state``: ``Runner.export_train_state`` = {params, mu, nu, count} in the writing runner's own
  layout (padded heads and vocabulary, permuted experts, stacked stages), as the sharded arrays
  it holds: orbax writes each device's shards from where they are, each process only its own
  (addressable) shards, so no device and no host ever holds a whole pool's tree. Across
  processes the item is ``shards`` instead (`maxjax.sharded_state`): orbax cannot write an array
  that lives on some processes only, as MA separation's pools do, so every process writes its
  own shards as files with an index, and any number of processes reads them back;
- ``meta``: JSON with the step, which of the two items holds the state (``state_item``), the
  zero-size leaves left out of orbax's item (``empty_leaves``: orbax refuses them), the training
  data position (``TokenBatches.state()``), the RNG seed, the strategy that wrote it and
  ``layout``, its runner's ``storage_layout()`` (what fixes the stored leaves' shapes and order;
  checkpoints without it hold the single-device layout);
- ``config``: the run's config as JSON (``Config.to_dict()``).

Restoring with a ``target`` (a runner's layout and its parameters' shardings, `RestoreTarget`)
whose layout equals the stored one reads each device's shards straight onto that device. Any
other restore (another strategy, or no target) reads the stored arrays onto one host device and
converts them there to the single-device layout (`maxjax.parallel.canonical_from_storage`):
changing strategy passes the whole tree through one device, as a single-device run needs anyway.

Saves in one process are asynchronous. Orbax writes into a temporary directory and renames it to
``DIR/<step>`` only when every item is complete, so a process killed at any moment leaves the previous
checkpoints intact and at most a temporary directory that restoring ignores. The trainer saves
only states that `all_finite` (one on-device reduction per device pool) accepts. Restoring
verifies what it read: the shapes (in the single-device layout; a mismatch means another model:
an error), the dtypes, that every value is finite, and that the config item is a valid config; a
checkpoint that fails to read or verify is reported and restoring falls back to the step before
it.

Everything on disk is found and read through orbax's public API (its step-name format, its
CheckpointManager and its JSON item handler); this module never opens orbax's files by path
(the shard files are this project's own format, read by their own handler).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from maxjax.parallel.runner import from_paths, map_with_path, merge, select, tree_paths
from maxjax.sharded_state import ShardFilesHandler, ShardFilesRestore, ShardFilesSave


class RestoreTarget(NamedTuple):
    """Where a restore should put the arrays: a runner's `storage_layout()` and its
    `abstract_params()` (shapes with shardings; mu and nu are placed like the parameters)."""

    layout: dict[str, Any]
    params: Any
    # Given a stored layout this one is not, makes it this one where it can (the runner takes
    # a stored expert placement) and returns the new target; None where it cannot.
    adopt: Callable[[dict[str, Any]], RestoreTarget | None] | None = None


def restore_target(runner: Any) -> RestoreTarget:
    """The `RestoreTarget` of a runner (`maxjax.parallel.Runner`). A runner that can take a
    stored layout's placement (`adopt_storage_layout`: MA experts re-placed by the sync loop)
    takes it, so that the state restores in place, shard by shard."""

    def adopt(layout: dict[str, Any]) -> RestoreTarget | None:
        return restore_target(runner) if runner.adopt_storage_layout(layout) else None

    adopts = hasattr(runner, "adopt_storage_layout")
    return RestoreTarget(
        runner.storage_layout(), runner.abstract_params(), adopt if adopts else None
    )


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty, damaged, or does not fit the model."""


def _missing_directory(directory: str | Path) -> CheckpointError:
    """The error for a checkpoint directory that is not there, or is not a directory."""
    problem = "is not a directory" if Path(directory).exists() else "does not exist"
    return CheckpointError(f"checkpoint directory {str(directory)!r} {problem}")


def check_writable_directory(directory: str | Path) -> None:
    """Raise CheckpointError unless `directory` is a directory this process may write in, or
    can be created as one: a training run checks this before it starts, so that a file in the
    way or a read-only folder is one line rather than an OSError at its first write."""
    path = Path(directory)
    if path.exists():
        if not path.is_dir():
            raise _missing_directory(directory)
        if not os.access(path, os.W_OK | os.X_OK):
            raise CheckpointError(f"checkpoint directory {str(directory)!r} is not writable")
        return
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(directory)!r} cannot be created: {str(existing)!r} is "
            "not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"checkpoint directory {str(directory)!r} cannot be created: {str(existing)!r} is "
            "not writable"
        )


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "shards": ShardFilesHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


def _step_paths(directory: str | Path) -> dict[int, Any]:
    """{step: path} of the completed checkpoints under `directory`, found through orbax."""
    path = Path(directory)
    if not path.is_dir():
        return {}
    found = ocp.step.standard_name_format().find_all(path)
    return {int(m.step): m.path for m in found}


def saved_steps(directory: str | Path) -> list[int]:
    """Completed checkpoint steps under `directory`, oldest first (JAX's devices stay untouched)."""
    return sorted(_step_paths(directory))


def read_json_item(directory: str | Path, step: int, item: str) -> dict[str, Any]:
    """The JSON item `item` ('meta' or 'config') of checkpoint `step`, read by orbax's handler.

    Unlike a CheckpointManager this does not start JAX's backends, so it can run before the
    number of emulated CPU devices is set.
    """
    step_path = _step_paths(directory)[step]
    return dict(ocp.JsonCheckpointHandler().restore(step_path / item, ocp.args.JsonRestore()))


def read_config(directory: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, config dict) of checkpoint `step` (default: newest readable).

    Used before JAX starts (the config decides how many CPU devices to emulate).
    """
    steps = saved_steps(directory)
    if not Path(directory).is_dir():
        raise _missing_directory(directory)
    if not steps:
        raise CheckpointError(f"checkpoint directory {str(directory)!r} holds no checkpoint")
    candidates = [step] if step is not None else steps[::-1]
    if step is not None and step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {str(directory)!r} (has {steps})")
    for s in candidates:
        try:
            return s, read_json_item(directory, s, "config")
        except Exception:  # noqa: BLE001, S112 - a damaged item: try the previous step
            continue
    raise CheckpointError(f"no readable config in any checkpoint of {str(directory)!r}")


def state_item() -> str:
    """The item that holds the arrays: orbax's ``state`` in one process; ``shards``
    (`maxjax.sharded_state`, one set of shard files per process) across processes, where a pool
    may live on some processes only and orbax cannot write it."""
    return "shards" if jax.process_count() > 1 else "state"


def all_finite(tree: Any) -> bool:
    """Whether every float array of `tree` is finite, checked where the arrays live.

    Arrays are grouped by the devices that hold them (a runner may keep two pools); each group
    is reduced to one boolean on its devices, and only those booleans reach the host. Host
    (numpy) leaves are checked on the host.
    """
    groups: dict[tuple, list[jax.Array]] = {}
    host_ok = True
    for leaf in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if isinstance(leaf, jax.Array):
            groups.setdefault(_device_order(leaf.sharding), []).append(leaf)
        else:
            host_ok = host_ok and bool(np.isfinite(np.asarray(leaf)).all())
    flags = [_all_finite_on_device(leaves) for leaves in groups.values()]
    from maxjax.parallel.mesh import fetch

    return host_ok and all(bool(flag) for flag in fetch(flags))


def _device_order(sharding: jax.sharding.Sharding) -> tuple:
    """Arrays that one jitted program may take together share this key (same devices, in the
    same mesh order)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return tuple(d.id for d in sharding.mesh.devices.flat)
    return tuple(sorted(d.id for d in sharding.device_set))


@jax.jit
def _all_finite_on_device(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class UnusableCheckpoint(ValueError):
    """A checkpoint read back but its contents are wrong (dtype, non-finite values, config)."""


def _verify(state: dict[str, Any], expected_params: Any, config: Any) -> None:
    """Raise UnusableCheckpoint unless `state` has the expected dtypes, is finite, and `config`
    is a valid config."""
    from maxjax.config import ConfigError, config_from_dict

    expected = _leaf_names(expected_params)
    for part in ("params", "mu", "nu"):
        for name, leaf in _leaf_names(state[part]).items():
            if np.dtype(leaf.dtype) != np.dtype(expected[name].dtype):
                raise UnusableCheckpoint(
                    f"{part}.{name} has dtype {leaf.dtype}, expected {expected[name].dtype}"
                )
        if not all_finite(state[part]):
            raise UnusableCheckpoint(f"its {part} hold non-finite values")
    try:
        config_from_dict(config)
    except (ConfigError, TypeError) as e:
        raise UnusableCheckpoint(f"its config is not valid ({e})") from None


def _leaf_names(tree: Any) -> dict[str, Any]:
    """'layers.0.attention.query.kernel' -> leaf (orbax stores integer keys as strings)."""
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _keyed_like(tree: Any, like: Any) -> Any:
    """`tree` as orbax lists it (integer keys as strings) with the keys of `like` (same nesting)."""
    if not isinstance(like, dict):
        return tree
    return {k: _keyed_like(tree[k] if k in tree else tree[str(k)], v) for k, v in like.items()}


def _empty_leaves(tree: Any) -> list[list[Any]]:
    """[dotted name, shape, dtype] of every zero-size leaf (orbax refuses to write them; the
    pipeline baselines keep such placeholders for the layers a stage does not hold)."""
    return [
        [".".join(path), list(leaf.shape), str(np.dtype(leaf.dtype))]
        for path, leaf in tree_paths(tree)
        if hasattr(leaf, "shape") and int(np.prod(leaf.shape)) == 0
    ]


def _without(tree: Any, names: set[str]) -> Any:
    """`tree` without the leaves named in `names` (and without the dicts left empty)."""
    return select(tree, lambda path: ".".join(path) not in names)


def _with_empty(like: Any, restored: Any, names: set[str]) -> Any:
    """`restored` with the leaves named in `names` put back as zero-size arrays placed like
    the corresponding leaves of `like` (ShapeDtypeStructs)."""

    def empty(_: Any, leaf: Any) -> Any:
        zeros = np.zeros(leaf.shape, leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(zeros, sharding) if sharding is not None else zeros

    placeholders = select(like, lambda path: ".".join(path) in names)
    return merge(restored, map_with_path(empty, placeholders))


def _shape_mismatches(saved: Any, expected: Any) -> list[str]:
    """One message for every expected array that the checkpoint lacks or holds in another shape."""
    saved_leaves, expected_leaves = _leaf_names(saved), _leaf_names(expected)
    problems = [
        f"{name} is in the checkpoint but not in this model"
        for name in saved_leaves
        if name not in expected_leaves
    ]
    for name, leaf in expected_leaves.items():
        if name not in saved_leaves:
            problems.append(f"{name} is missing from the checkpoint")
        elif tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            problems.append(
                f"{name} has shape {tuple(saved_leaves[name].shape)} in the checkpoint but "
                f"{tuple(leaf.shape)} under this config"
            )
    return problems


class CheckpointStore:
    """Save and restore training checkpoints in one directory (keeps the newest `max_to_keep`)."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = None, create: bool = True):
        self.directory = Path(directory).absolute()
        if not create and not saved_steps(self.directory):
            if not self.directory.is_dir():
                raise _missing_directory(directory)
            raise CheckpointError(f"checkpoint directory {str(directory)!r} holds no checkpoint")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, exported: dict[str, Any], meta: dict[str, Any], config: dict[str, Any]
    ) -> None:
        """Start writing checkpoint `step` (in the background in one process; across processes
        the shard files are written before this returns)."""
        item = state_item()
        if item == "shards":
            state, empty = ShardFilesSave(exported), []
        else:
            empty = _empty_leaves(exported)
            state = ocp.args.StandardSave(_without(exported, {name for name, *_ in empty}))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{item: state},
                meta=ocp.args.JsonSave(
                    {**meta, "step": step, "state_item": item, "empty_leaves": empty}
                ),
                config=ocp.args.JsonSave(config),
            ),
        )

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def restore(
        self,
        expected_params: Any,
        step: int | None = None,
        warn=print,
        target: RestoreTarget | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(step, state, meta, config) of `step`, or of the newest checkpoint that restores.

        `expected_params` (single-device shapes, e.g. `model.abstract_params(cfg)`) is checked
        against the checkpoint first; a mismatch raises CheckpointError naming the differing
        arrays. If `target`'s layout is the stored one, the state comes back in that layout on
        its shardings, read shard by shard; otherwise in the single-device layout on the host
        CPU device. ``meta["layout"]`` is the layout of the returned state. Calls
        `warn(message)` for each damaged checkpoint skipped.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(
                f"checkpoint directory {str(self.directory)!r} holds no checkpoint"
            )
        if step is not None and step not in steps:
            raise CheckpointError(
                f"no checkpoint of step {step} in {str(self.directory)!r} (has {steps})"
            )
        candidates = [step] if step is not None else steps[::-1]
        failures, last_reason = [], ""
        for s in candidates:
            try:
                return (s, *self._restore_step(s, expected_params, target))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                failures.append(s)
                if s != candidates[-1]:
                    warn(f"checkpoint of step {s} is damaged ({reason}); trying the previous one")
                last_reason = reason
        raise CheckpointError(
            f"no checkpoint in {str(self.directory)!r} could be restored "
            f"(tried steps {failures}; last error: {last_reason})"
        )

    def _restore_step(
        self, step: int, expected_params: Any, target: RestoreTarget | None
    ) -> tuple[dict, dict, dict]:
        from maxjax.parallel import CANONICAL_LAYOUT, canonical_from_storage

        meta = dict(
            self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        )
        layout = meta.get("layout", CANONICAL_LAYOUT)
        item = meta.get("state_item", "state")
        empty = {name: (tuple(shape), dtype) for name, shape, dtype in meta.get("empty_leaves", [])}
        saved = self._manager.item_metadata(step)[item]
        stored = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), saved["params"]
        )
        stored = merge(
            stored,
            from_paths(
                [
                    (tuple(name.split(".")[1:]), jax.ShapeDtypeStruct(shape, dtype))
                    for name, (shape, dtype) in empty.items()
                    if name.startswith("params.")
                ]
            ),
        )
        problems = _shape_mismatches(
            jax.eval_shape(lambda t: canonical_from_storage(layout, t), stored), expected_params
        )
        if problems:
            shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
            raise CheckpointError(
                f"checkpoint of step {step} in {str(self.directory)!r} was written for a "
                f"different model: {shown}"
            )
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        on_host = lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=host)  # noqa: E731
        if target is not None and target.layout != layout and target.adopt is not None:
            target = target.adopt(layout) or target
        direct = target is not None and target.layout == layout
        params = (
            target.params if direct else jax.tree.map(on_host, _keyed_like(stored, expected_params))
        )
        wanted = {"params": params, "mu": params, "nu": params, "count": on_host(saved["count"])}
        reader = ShardFilesRestore if item == "shards" else ocp.args.StandardRestore
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{item: reader(_without(wanted, set(empty)))}, config=ocp.args.JsonRestore()
            ),
        )
        state = _with_empty(wanted, restored[item], set(empty))
        state["count"] = np.asarray(state["count"])
        if not direct:
            convert = jax.jit(lambda t: canonical_from_storage(layout, t))
            for part in ("params", "mu", "nu"):
                state[part] = convert(state[part])
            layout = CANONICAL_LAYOUT
        config = dict(restored["config"])
        _verify(state, expected_params, config)
        return state, {**meta, "layout": dict(layout)}, config

    def set_aside(self, step: int) -> Path:
        """Move the (damaged) checkpoint `step` to DIR/damaged/<step> so a new save can take its
        place. Across processes process 0 moves it and the others wait for the move."""
        target = self.directory / "damaged" / str(step)
        if jax.process_index() == 0:
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(_step_paths(self.directory)[step]), str(target))
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"maxjax-set-aside-{step}")
        self._manager.reload()
        return target
