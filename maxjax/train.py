"""Train the MoE transformer, resuming from the newest checkpoint of the run's directory.

    python -m maxjax.train [--config PATH] [--strategy ma|single|...] [--steps N]
                           [--checkpoint-dir DIR] [--set KEY=VALUE ...]

Defaults: configs/tiny.yaml, strategy "ma", steps = schedule.total_steps, DIR =
checkpoint.directory. Without an accelerator JAX emulates `hardware.total_gpus` CPU devices.

One step: the next global batch of the train split, dropout key fold_in(key(seed), step), loss
and gradients through the runner, clipping to optimizer.gradient_clipping, AdamW (warmup +
cosine). Every step appends one JSON line to DIR/metrics.jsonl; every
training.validation_interval steps (and at the end) the validation loss and perplexity too.
Every checkpoint.interval_steps (and at the end) a checkpoint is written in the background.

Running the same command again continues from the newest complete checkpoint with the same data
order and dropout keys, so its losses equal those of a run that never stopped; metrics.jsonl
lines after the restored step are dropped first. On a cluster the same command runs once per
host (see tutorials/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from tqdm import tqdm

from maxjax import model
from maxjax.checkpoint import CheckpointStore
from maxjax.config import Config, ConfigError, load_config
from maxjax.data import TokenBatches, validation_batches
from maxjax.evaluate import (
    USER_ERRORS,
    data_shard,
    global_batch,
    perplexity,
    quiet_libraries,
    setup_jax,
    validation_loss,
)
from maxjax.optim import learning_rate_schedule, make_optimizer
from maxjax.parallel import STRATEGIES, Runner, TrainState, make_runner

DEFAULT_CONFIG = "configs/tiny.yaml"
DEFAULT_STRATEGY = "ma"
# Keys whose change between runs does not change what a resumed run computes.
_HARMLESS_CHANGES = ("checkpoint.", "training.log_interval", "training.validation_")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stopped being finite)."""


def _note(message: str) -> None:
    """Progress messages: stdout, process 0 only (stderr carries only problems)."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(f"maxjax.train: warning: {message}", file=sys.stderr)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed_keys(saved: dict[str, Any], cfg: Config) -> list[str]:
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    return sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and not k.startswith(_HARMLESS_CHANGES)
    )


class MetricsLog:
    """DIR/metrics.jsonl: one JSON object per line, written by process 0 only.

    Opening it keeps only the lines of steps up to `keep_through` (the restored step), so the
    file always describes one consistent run; a line cut short by a crash is dropped too.
    """

    def __init__(self, path: Path, keep_through: int):
        self.path = path
        self._file = None
        if jax.process_index() != 0:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", math.inf) <= keep_through:
                    kept.append(line + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


_FIRST_KEYS = ("loss", "lm_loss", "load_balancing_loss", "z_loss", "grad_norm")


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, Any]:
    """Metrics as floats and lists, the main losses first (readable metrics.jsonl lines)."""
    host = jax.device_get(metrics)
    out = {}
    for key in [*[k for k in _FIRST_KEYS if k in host], *sorted(set(host) - set(_FIRST_KEYS))]:
        value = host[key]
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else float(value)
    return out


def step_key(seed: int, step: int) -> jax.Array:
    """Dropout key of the step that starts at `step`: the same on every resume and strategy."""
    return jax.random.fold_in(jax.random.key(seed), step)


def training_step(
    runner: Runner,
    state: TrainState,
    batch: np.ndarray,
    tx: optax.GradientTransformation,
    seed: int,
) -> tuple[TrainState, dict[str, Any], float]:
    """One optimizer step on a batch of this process's rows with the step's dropout key.

    Returns (new state, {step, loss, ...} as host numbers, seconds the step took).
    """
    rng = step_key(seed, state.step)
    start = time.perf_counter()
    state, metrics = runner.train_step(state, global_batch(batch), tx, rng)
    record = {"step": state.step, **_host_metrics(metrics)}
    return state, record, time.perf_counter() - start


def is_validation_step(step: int, interval: int, last_step: int) -> bool:
    """Validation runs every `interval` steps and after the last one."""
    return step % interval == 0 or step == last_step


def validation_record(
    runner: Runner, params: model.Params, batches: list[np.ndarray], step: int
) -> dict[str, Any]:
    """{step, val_loss, val_perplexity} of `params` on the validation batches."""
    loss = validation_loss(runner, params, batches)
    return {"step": step, "val_loss": loss, "val_perplexity": perplexity(loss)}


def train(
    cfg: Config,
    strategy: str = DEFAULT_STRATEGY,
    steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train to step `steps` (default schedule.total_steps), resuming from `checkpoint_dir`.

    Returns {step, first_loss, last_loss, val_loss, val_perplexity, history, checkpoint_dir,
    wall_seconds}; `history` holds the metrics.jsonl records of this call. Raises TrainingError
    if the loss becomes NaN or infinite (the last good checkpoint stays the newest).
    """
    steps = steps or cfg.schedule.total_steps
    directory = Path(checkpoint_dir or cfg.checkpoint.directory)
    if strategy not in STRATEGIES:
        raise ConfigError(
            "--strategy", f"{strategy!r} is not available; choose one of {STRATEGIES}"
        )
    if cfg.training.gradient_checkpointing:
        _warn("training.gradient_checkpointing is set, but the runners do not rematerialise yet")
    train_data = TokenBatches(cfg, "train", **data_shard())
    val_data = validation_batches(cfg, cfg.training.validation_batches, **data_shard())
    runner = make_runner(cfg, strategy)
    tx = make_optimizer(cfg)
    lr_at = learning_rate_schedule(cfg)
    store = CheckpointStore(directory, cfg.checkpoint.max_to_keep)

    if store.steps():
        start, exported, meta, saved_cfg = store.restore(model.abstract_params(cfg), warn=_warn)
        for damaged in [s for s in store.steps() if s > start]:
            _warn(f"moved damaged checkpoint of step {damaged} to {store.set_aside(damaged)}")
        changed = _changed_keys(saved_cfg, cfg)
        if changed:
            _warn(f"resuming with config changes in {', '.join(changed)}")
        state = runner.import_train_state(exported, start, tx)
        train_data.restore(meta["data"])
        _note(f"resumed from the checkpoint of step {start} in {directory}")
    else:
        state = runner.init_train_state(runner.init(cfg.training.seed), tx)
    log = MetricsLog(directory / "metrics.jsonl", keep_through=state.step)

    def save() -> None:
        meta = {"data": train_data.state(), "seed": cfg.training.seed, "strategy": strategy}
        store.save(state.step, runner.export_train_state(state), meta, cfg.to_dict())

    history: list[dict[str, Any]] = []
    val_loss = None
    bar = tqdm(
        total=steps,
        initial=state.step,
        unit="step",
        dynamic_ncols=True,
        disable=not progress or jax.process_index() != 0,
    )
    start_time = time.perf_counter()
    try:
        while state.step < steps:
            step = state.step
            state, record, seconds = training_step(
                runner, state, next(train_data), tx, cfg.training.seed
            )
            if not math.isfinite(record["loss"]):
                store.wait()
                kept = store.steps()
                raise TrainingError(
                    f"loss became {record['loss']} at step {state.step}; stopped. "
                    + (
                        f"The newest good checkpoint is step {kept[-1]} in {directory}."
                        if kept
                        else "No checkpoint was written yet."
                    )
                )
            record["learning_rate"] = float(lr_at(step))
            record["tokens_per_second"] = cfg.sequence.total_tokens_per_batch / seconds
            record["seconds"] = seconds
            log.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}"
            )
            if state.step % cfg.training.log_interval == 0 and not progress:
                _note(f"step {state.step}: loss {record['loss']:.4f}")
            if is_validation_step(state.step, cfg.training.validation_interval, steps):
                val = validation_record(runner, state.params, val_data, state.step)
                val_loss = val["val_loss"]
                log.write(val)
                history.append(val)
                _note(
                    f"step {state.step}: validation loss {val_loss:.4f}, "
                    f"perplexity {val['val_perplexity']:.2f}"
                )
            if state.step % cfg.checkpoint.interval_steps == 0 or state.step == steps:
                save()
        if val_loss is None:
            val_loss = validation_loss(runner, state.params, val_data)
        store.wait()
    finally:
        bar.close()
        log.close()
        store.close()
    losses = [r["loss"] for r in history if "loss" in r]
    return {
        "step": state.step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_loss": val_loss,
        "val_perplexity": perplexity(val_loss),
        "history": history,
        "checkpoint_dir": str(directory),
        "wall_seconds": time.perf_counter() - start_time,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maxjax.train", description="Train the MoE transformer (resumes)."
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (path or name)")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY, help="execution strategy")
    parser.add_argument("--steps", type=int, default=None, help="train up to this step")
    parser.add_argument("--checkpoint-dir", default=None, help="default: checkpoint.directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.learning_rate=1e-3",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(args.config, args.overrides)
        setup_jax(cfg)
        summary = train(cfg, args.strategy, args.steps, args.checkpoint_dir, not args.no_progress)
    except (*USER_ERRORS, TrainingError) as e:
        print(f"maxjax.train: error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        losses = (
            f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
            if summary["first_loss"] is not None
            else "nothing left to train, "
        )
        print(
            f"step {summary['step']}: {losses}validation loss {summary['val_loss']:.4f}, "
            f"perplexity {summary['val_perplexity']:.2f}; checkpoints in {summary['checkpoint_dir']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
