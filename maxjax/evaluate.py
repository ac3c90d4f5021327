"""Restore a checkpoint and report validation loss and perplexity.

    python -m maxjax.evaluate --checkpoint-dir checkpoints/tiny [--step N] [--strategy S] [--json PATH]

The config comes from the checkpoint itself. Perplexity is exp of the mean next-token
cross-entropy over the first `training.validation_batches` validation batches (the same batches
training reports). This module also holds what `maxjax.train` shares with it: starting JAX
(emulated CPU devices, multi-process clusters) and building global batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxjax import model
from maxjax.checkpoint import (
    CheckpointError,
    CheckpointStore,
    read_config,
    read_json_item,
    restore_target,
)
from maxjax.cluster import init_distributed, wait_for_lost_peer
from maxjax.config import Config, ConfigError, check_count, config_from_dict, one_line
from maxjax.data import DataError, validation_batches
from maxjax.optim import make_optimizer
from maxjax.parallel import (
    STRATEGIES,
    DeviceError,
    Runner,
    TrainState,
    check_strategy,
    make_runner,
)
from maxjax.parallel.mesh import fetch

# --- starting JAX ---------------------------------------------------------------------------


def setup_jax(cfg: Config) -> None:
    """Before any JAX computation: join the cluster (if any) and emulate the config's devices on CPU.

    `jax_num_cpu_devices` only affects the CPU backend, so on a GPU machine it changes nothing.
    It is left alone when XLA_FLAGS already sets a device count or JAX has already started
    (a notebook or a test that set up its devices itself).
    """
    processes = int(os.environ.get("MAXJAX_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "1")))
    try:
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", max(1, cfg.hardware.total_gpus // processes))
        if processes > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
                # A process that loads a program from the persistent cache while another
                # compiles it runs ahead, and gloo gives up on a collective whose peers are
                # more than 30 s apart (seen with the cache on, never with it off).
                jax.config.update("jax_enable_compilation_cache", False)
    except RuntimeError:
        return  # JAX is already running: keep its devices
    if processes > 1 and not jax.distributed.is_initialized():
        init_distributed()


def global_batch(local: np.ndarray) -> np.ndarray | jax.Array:
    """This process's rows of a batch as the global [B, ...] array every process sees.

    In one process the numpy array itself (the runner places it). With P processes the rows of
    process p live on p's devices, as `TokenBatches(process_index=p)` produced them.
    """
    count = jax.process_count()
    if count == 1:
        return local
    rows = [[d for d in jax.devices() if d.process_index == p] for p in range(count)]
    sharding = NamedSharding(Mesh(np.array(rows), ("process", "local")), PartitionSpec("process"))
    return jax.make_array_from_process_local_data(
        sharding, local, (local.shape[0] * count, *local.shape[1:])
    )


def data_shard() -> dict[str, int]:
    """This process's share of every global batch (TokenBatches keyword arguments)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


# --- validation -----------------------------------------------------------------------------


def validation_loss(runner: Runner, params: model.Params, batches: list[np.ndarray]) -> float:
    """Mean next-token cross-entropy (no dropout, no auxiliary losses) over equal-sized batches.

    `runner.loss` computes it the strategy's way (vocabulary-parallel where the vocabulary is
    sharded), never holding the logits [B, S, V] whole. Each batch's loss is fetched before the
    next batch is dispatched: with many multi-device programs queued at once, XLA's CPU
    collectives can wait on each other past their rendezvous timeout (seen with MA
    separation's forward on 16 emulated devices)."""
    return float(np.mean([float(fetch(runner.loss(params, global_batch(b)))) for b in batches]))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# --- restoring ------------------------------------------------------------------------------


def default_strategy(checkpoint_dir: str | Path, step: int | None = None) -> str:
    """The strategy that wrote the checkpoint if it is available here, else 'single'."""
    try:
        s, _ = read_config(checkpoint_dir, step)
        strategy = read_json_item(checkpoint_dir, s, "meta").get("strategy", "single")
    except Exception:  # noqa: BLE001 - an unreadable meta item: the default strategy
        strategy = "single"
    return strategy if strategy in STRATEGIES else "single"


def restore(
    checkpoint_dir: str | Path,
    step: int | None = None,
    strategy: str | None = None,
    warn=lambda message: print(message, file=sys.stderr),
) -> tuple[Config, Runner, TrainState, dict[str, Any]]:
    """(config, runner, train state, meta) of a checkpoint, placed for `strategy`.

    The config is the checkpoint's own; `strategy` defaults to the one that wrote it. Call
    `setup_jax(cfg)` first in a fresh process if the strategy needs emulated CPU devices.
    """
    _, data = read_config(checkpoint_dir, step)
    cfg = config_from_dict(data)
    strategy = strategy or default_strategy(checkpoint_dir, step)
    runner = make_runner(cfg, strategy)
    store = CheckpointStore(checkpoint_dir, create=False)
    try:
        restored_step, exported, meta, _ = store.restore(
            model.abstract_params(cfg), step, warn, target=restore_target(runner)
        )
    finally:
        store.close()
    tx = make_optimizer(cfg)
    state = runner.import_train_state(exported, restored_step, tx, meta["layout"])
    return cfg, runner, state, meta


def evaluate(
    checkpoint_dir: str | Path,
    step: int | None = None,
    strategy: str | None = None,
    num_batches: int | None = None,
) -> dict[str, Any]:
    """{step, val_loss, perplexity, strategy, batches} of a checkpoint on the validation split.

    `num_batches` defaults to the checkpoint's `training.validation_batches`; it must be 1 or
    more (ConfigError)."""
    check_count(num_batches, "--batches")
    cfg, runner, state, _ = restore(checkpoint_dir, step, strategy)
    count = cfg.training.validation_batches if num_batches is None else num_batches
    batches = validation_batches(cfg, count, **data_shard())
    loss = validation_loss(runner, state.params, batches)
    return {
        "step": state.step,
        "val_loss": loss,
        "perplexity": perplexity(loss),
        "strategy": runner.name,
        "batches": len(batches),
    }


# --- command line ---------------------------------------------------------------------------

USER_ERRORS = (ConfigError, DataError, DeviceError, CheckpointError)


def check_output_file(path: str | Path | None, flag: str = "--json") -> None:
    """Raise ConfigError unless `path` (None: no file) can be written as a file: its folder
    exists and it is not itself a folder. Checked before the work whose result it will hold."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(flag, f"{str(path)!r} is a directory, not a file to write")
    if not folder.is_dir():
        problem = "is not a directory" if folder.exists() else "does not exist"
        raise ConfigError(flag, f"the folder {str(folder)!r} of {str(path)!r} {problem}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(flag, f"the folder {str(folder)!r} of {str(path)!r} is not writable")


def debugging() -> bool:
    """MAXJAX_DEBUG=1: let a refused run end with its traceback instead of one line."""
    return os.environ.get("MAXJAX_DEBUG") == "1"


def quiet_libraries() -> None:
    """Keep orbax's and absl's progress logs off stderr, which carries only our messages."""
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maxjax.evaluate", description="Validation loss of a checkpoint."
    )
    parser.add_argument("--checkpoint-dir", required=True, help="directory of a training run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--strategy", default=None, help="strategy to run (default: the writer's)")
    parser.add_argument("--batches", type=int, default=None, help="validation batches to use")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        check_count(args.batches, "--batches")
        check_output_file(args.json)
        if args.strategy is not None and args.strategy not in STRATEGIES:
            raise ConfigError(
                "--strategy", f"{args.strategy!r} is not available; choose one of {STRATEGIES}"
            )
        _, data = read_config(args.checkpoint_dir, args.step)
        cfg = config_from_dict(data)
        strategy = args.strategy or default_strategy(args.checkpoint_dir, args.step)
        check_strategy(cfg, strategy, cfg.sequence.batch_size)
        setup_jax(cfg)
        result = evaluate(args.checkpoint_dir, args.step, args.strategy, args.batches)
    except USER_ERRORS as e:
        if debugging():
            raise
        print(f"maxjax.evaluate: error: {one_line(e)}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError:
        wait_for_lost_peer()
        raise
    print(
        f"step {result['step']}: validation loss {result['val_loss']:.4f}, "
        f"perplexity {result['perplexity']:.2f} ({result['batches']} batches, "
        f"strategy {result['strategy']})"
    )
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            if debugging():
                raise
            print(
                f"maxjax.evaluate: error: cannot write {args.json!r} ({one_line(e)})",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
