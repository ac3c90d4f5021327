"""Train the MoE transformer, resuming from the newest checkpoint of the run's directory.

    python -m maxjax.train [--config PATH] [--strategy ma|single|...] [--steps N]
                           [--checkpoint-dir DIR] [--set KEY=VALUE ...] [--allow-config-change]
                           [--no-checkpoint] [--fail-device ID@STEP ...]

Defaults: configs/tiny.yaml, strategy "ma", steps = schedule.total_steps, DIR =
checkpoint.directory. Without an accelerator JAX emulates `hardware.total_gpus` CPU devices.

One step: the next global batch of the train split, dropout key fold_in(key(seed), step), loss
and gradients through the runner, clipping to optimizer.gradient_clipping, AdamW (warmup +
cosine). Every step appends one JSON line to DIR/metrics.jsonl; every
training.validation_interval steps (and at the end) the validation loss and perplexity too.
Every checkpoint.interval_steps (and at the end) a checkpoint is written in the background.
With "ma", every ma_separation.synchronization.sync_interval steps that step is measured, a
sync record follows its line, the experts of layers out of balance are re-placed and, with
rechoose_microbatches, the micro-batch count re-chosen (`maxjax.sync.loop`); both are saved with
each checkpoint and restored on resume.

Running the same command again continues from the newest complete checkpoint with the same data
order and dropout keys, so its losses equal those of a run that never stopped; metrics.jsonl
lines after the restored step are dropped first. A resume whose config differs from the
checkpoint's in a key that changes what is computed (batch, sequence length, data, model,
optimizer, schedule, dtype, compression: `_RUN_DEFINING`) stops with one line naming the
difference (`--allow-config-change` accepts it). `--no-checkpoint` refuses a directory that
already holds a run, so no run's metrics are lost. Ctrl-C ends with one line naming the newest
intact checkpoint, where the same command resumes (exit code 130). Only finite parameters and
optimizer states are saved (one on-device check per save); a non-finite loss, gradient norm or
state stops the run with one line naming the newest good checkpoint, which a resume uses.
`--fail-device ID@STEP` emulates the failure of a device during a step: an attention device's
shard is taken over from its standby copy, an expert device's experts move to the surviving
expert devices (restored from the newest checkpoint), in place (`maxjax.parallel.ma.failover`);
the step is redone and a failure record is logged. Refused input ends with one line on stderr
(MAXJAX_DEBUG=1 shows the traceback instead). On a cluster the same command runs once per
host (see tutorials/cluster.md).
"""

from __future__ import annotations

import argparse
import contextlib
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
from maxjax.checkpoint import (
    CheckpointError,
    CheckpointStore,
    all_finite,
    check_writable_directory,
    restore_target,
    saved_steps,
)
from maxjax.cluster import wait_for_lost_peer
from maxjax.config import Config, ConfigError, check_count, load_config
from maxjax.data import TokenBatches, validation_batches
from maxjax.evaluate import (
    USER_ERRORS,
    data_shard,
    debugging,
    global_batch,
    one_line,
    perplexity,
    quiet_libraries,
    setup_jax,
    validation_loss,
)
from maxjax.optim import learning_rate_schedule, make_optimizer
from maxjax.parallel import (
    Runner,
    TrainState,
    check_backend,
    check_strategy,
    make_runner,
    max_ma_microbatches,
)
from maxjax.parallel.ma.failover import FailoverError, initial_experts
from maxjax.parallel.mesh import fetch
from maxjax.sync.loop import SyncLoop

DEFAULT_CONFIG = "configs/tiny.yaml"
DEFAULT_STRATEGY = "ma"
# What a resume compares (`_check_resume`). A resume is exact, or refuses with one line unless
# --allow-config-change is given: every key that changes what a step computes is run-defining.
#
# Harmless: no warning. When and where the run reports and saves (checkpoint.*, the log and
# validation intervals, the validation batches), descriptive text (training.dataset) and the
# seed's reported results (validation.*) change no step.
_HARMLESS_CHANGES = (
    "checkpoint.",
    "training.log_interval",
    "training.validation_interval",
    "training.validation_batches",
    "training.dataset",
    "validation.",
)
# Run-defining: a change makes the resumed steps differ from those of the run that never stopped.
_RUN_DEFINING = (
    # The batches: their shape, and the tokens in them (source, train/validation split, the
    # vocabulary; the seed also fixes the data order).
    "sequence.",
    "training.source",
    "training.data_dir",
    "training.data_files",
    "training.validation_split",
    "training.vocab_size",
    # The function: the model, its MoE layers (routing, capacity, auxiliary losses, expert
    # dropout), the initial values and dropout keys (seed) and the precision of the products.
    "model.",
    "moe.",
    "training.seed",
    "training.dtype",
    # The update: AdamW's hyperparameters, clipping, and the learning rate of every step
    # (warmup and the cosine that reaches 0 at total_steps).
    "optimizer.",
    "schedule.",
    # The values MA separation sends between its pools: int8 with a scale per row, or float32.
    "ma_separation.synchronization.communication_compression",
)
# Every other key is accepted with a warning naming it, because it changes where arrays live
# or in which order the same sums are taken, as resuming under another strategy does (each
# strategy is tested against the single-device model): the device layout (hardware.*, nodes.*,
# ma_separation.attention.* and .moe.*, transport, baselines.*: a restart after a device
# failure changes it), the micro-batch count and gradient accumulation rounds (the same
# gradient summed in another order; the sync loop re-chooses the count itself with
# rechoose_microbatches), gradient checkpointing (the same layers computed again),
# expert_compute (the same expert products, empty slots skipped) and the sync loop's settings
# (sync_interval, threshold, rechoose_microbatches: expert placement and micro-batch count).


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stopped being finite)."""


class ResumeError(RuntimeError):
    """The checkpoint to resume from was written with other settings of what a step computes."""


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


def _check_resume(saved: dict[str, Any], cfg: Config, step: int, directory: Path) -> list[str]:
    """Raise ResumeError if the run-defining keys differ from the checkpoint's; return the
    other changed keys."""
    changed = _changed_keys(saved, cfg)
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    defining = [k for k in changed if k.startswith(_RUN_DEFINING)]
    if defining:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in defining[:4])
        more = f" and {len(defining) - 4} more" if len(defining) > 4 else ""
        raise ResumeError(
            f"the checkpoint of step {step} in {directory} was written with other settings of "
            f"what a step computes ({shown}{more}); resuming would not continue that run. Pass "
            "--allow-config-change to resume anyway, or use another --checkpoint-dir"
        )
    return changed


def _stop_line(
    problem: str, step: int, store: CheckpointStore, directory: Path, producer: int | None = None
) -> str:
    """One line: what is not finite at `step`, and the newest good checkpoint (a resume's start).

    `producer`: the step whose parameters produced the non-finite loss or gradient; its
    checkpoint, if any, is moved to DIR/damaged so that a resume does not start from it.
    """
    store.wait()
    moved = ""
    if producer is not None and producer in store.steps():
        moved = f" Its checkpoint was moved to {store.set_aside(producer)}."
    kept = store.steps()
    where = (
        f"The newest good checkpoint is step {kept[-1]} in {directory}; a resume starts there"
        if kept
        else "No good checkpoint is left; a resume starts from scratch"
    )
    return f"{problem}; stopped without saving step {step}.{moved} {where}."


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
    host = fetch(metrics)
    out = {}
    for key in [*[k for k in _FIRST_KEYS if k in host], *sorted(set(host) - set(_FIRST_KEYS))]:
        value = host[key]
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else float(value)
    return out


def sync_interval_on(cfg: Config, strategy: str) -> bool:
    """Whether `strategy` runs the sync loop under `cfg` (MA with a sync interval)."""
    return strategy == "ma" and cfg.ma_separation.synchronization.sync_interval > 0


def sync_loop(cfg: Config, strategy: str, runner: Runner, steps: int) -> SyncLoop | None:
    """The run's sync loop (`maxjax.sync.loop`): for "ma" with a sync interval, in one process;
    None when off or when the run ends before its first sync point."""
    if (
        not sync_interval_on(cfg, strategy)
        or steps < cfg.ma_separation.synchronization.sync_interval
    ):
        return None
    if jax.process_count() > 1:
        _note("sync loop off: measuring stage times needs every device in one process")
        return None
    return SyncLoop(cfg, runner)


def parse_failures(items: list[str], cfg: Config, strategy: str) -> dict[int, list[int]]:
    """`--fail-device ID@STEP` values as {step: [device ids]}: the devices fail during that step
    (emulated in one process, `MARunner.fail_devices`). Raises ConfigError naming a bad one."""
    failures: dict[int, list[int]] = {}
    listed: dict[int, str] = {}
    for item in items:
        device, at, step = item.partition("@")
        if not (at and device.strip().isdigit() and step.strip().isdigit()):
            raise ConfigError("--fail-device", f"{item!r} must look like DEVICE@STEP, e.g. 5@6")
        device_id, step_number = int(device), int(step)
        if strategy != "ma":
            raise ConfigError(
                "--fail-device", f"failures are emulated for strategy 'ma' only, not {strategy!r}"
            )
        if device_id not in (*cfg.attention_devices, *cfg.expert_devices):
            raise ConfigError(
                "--fail-device",
                f"device {device_id} is in no pool (attention {list(cfg.attention_devices)}, "
                f"experts {list(cfg.expert_devices)})",
            )
        if step_number < 1:
            raise ConfigError("--fail-device", f"{item!r}: the step must be 1 or later")
        if device_id in listed:
            raise ConfigError(
                "--fail-device",
                f"device {device_id} is listed twice ({listed[device_id]!r} and {item!r}); a "
                "failed device stays failed",
            )
        listed[device_id] = item
        failures.setdefault(step_number, []).append(device_id)
    return failures


def check_fresh_directory(directory: Path) -> None:
    """For a run without checkpoints: raise CheckpointError if `directory` already holds a run
    (checkpoints or a non-empty metrics.jsonl), whose metrics.jsonl the run would replace."""
    steps = saved_steps(directory)
    metrics = directory / "metrics.jsonl"
    held = [f"checkpoints of steps {steps}"] if steps else []
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append("metrics.jsonl")
    if held:
        raise CheckpointError(
            f"--no-checkpoint: {str(directory)!r} already holds a training run "
            f"({' and '.join(held)}), whose metrics.jsonl this run would replace; pass another "
            "--checkpoint-dir, or leave out --no-checkpoint to resume that run"
        )


def interrupted_line(directory: Path | None, checkpoints: bool) -> str:
    """The one line a run stopped by Ctrl-C ends with: the newest intact checkpoint (the
    start of a resume), read after the run closed its checkpoints (saves in flight finish)."""
    if directory is None:
        return "interrupted before training started"
    if not checkpoints:
        return (
            f"interrupted; nothing to resume (--no-checkpoint); the metrics so far are in "
            f"{directory / 'metrics.jsonl'}, so a new run needs another --checkpoint-dir"
        )
    steps = saved_steps(directory)
    if not steps:
        return (
            f"interrupted before the first checkpoint in {directory}; the same command starts "
            "the run again from scratch"
        )
    return (
        f"interrupted; the newest intact checkpoint is step {steps[-1]} in {directory}; run the "
        "same command again to resume from it"
    )


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


def fail_during_step(
    runner: Runner,
    state: TrainState,
    batch: np.ndarray,
    tx: optax.GradientTransformation,
    seed: int,
    devices: list[int],
    lost_experts: Any = None,
) -> tuple[TrainState, dict[str, Any]]:
    """`devices` fail while the step after `state` runs: its forward and backward are computed
    and lost, then the runner fails over (`MARunner.fail_devices`; a failed expert device's
    experts come from `lost_experts`). Returns the rebuilt state (to redo the step on) and the
    failure record."""
    lost = runner.value_and_grad(state.params, global_batch(batch), step_key(seed, state.step))
    jax.block_until_ready(lost)
    del lost
    return runner.fail_devices(state, devices, tx, lost_experts)


def experts_from_checkpoint(cfg: Config, store: CheckpointStore, runner: Runner) -> Any:
    """The source of a failed expert device's experts: the newest checkpoint (read to the host
    in the single-device layout; only the lost experts are taken from it), or their initial
    values when none has been written."""

    def source() -> tuple[dict[str, Any], str]:
        store.wait()
        if not store.steps():
            return initial_experts(runner)()
        step, exported, _, _ = store.restore(model.abstract_params(cfg), warn=_warn)
        trees = {k: jax.tree.map(np.asarray, exported[k]) for k in ("params", "mu", "nu")}
        return trees, f"checkpoint of step {step}"

    return source


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
    allow_config_change: bool = False,
    checkpoints: bool = True,
    failures: dict[int, list[int]] | None = None,
) -> dict[str, Any]:
    """Train to step `steps` (default schedule.total_steps), resuming from `checkpoint_dir`.

    `failures` ({step: [device ids]}, `parse_failures`) makes devices fail during a step: the
    step's work is lost, the runner fails over in place (`MARunner.fail_devices`), the step is
    redone and a failure record is logged; a failure that cannot be survived raises
    FailoverError (checkpoints already written stay as they are).

    With `checkpoints=False` nothing is read from or written to the checkpoint directory but
    metrics.jsonl (a fresh run that cannot be resumed); a directory that already holds a run
    (checkpoints or metrics) is refused with CheckpointError, so its metrics are never lost.

    Returns {step, first_loss, last_loss, val_loss, val_perplexity, history, checkpoint_dir,
    wall_seconds}; `history` holds the metrics.jsonl records of this call.

    Raises TrainingError when the loss, the gradient norm or (checked before every save, on the
    devices) the parameters and optimizer state stop being finite: only finite states are ever
    saved. The loss logged at step s comes from the parameters of step s - 1: a non-finite loss
    or gradient at step s stops before step s is saved and moves the checkpoint of step s - 1
    (the parameters that produced it) to DIR/damaged, so a resume starts from a checkpoint
    whose parameters gave finite losses and gradients. Raises ResumeError when resuming from a
    checkpoint written with a run-defining key changed (`_RUN_DEFINING`: batch, data, model,
    optimizer, schedule, ...), unless `allow_config_change`. Before any work: ConfigError for
    `steps` < 1 (`check_count`), CheckpointError for a directory that is not a writable directory.
    """
    check_count(steps, "--steps")
    steps = cfg.schedule.total_steps if steps is None else steps
    directory = Path(checkpoint_dir or cfg.checkpoint.directory)
    check_strategy(cfg, strategy, cfg.sequence.batch_size)
    check_writable_directory(directory)
    if not checkpoints:
        check_fresh_directory(directory)
    check_backend(cfg, strategy)
    train_data = TokenBatches(cfg, "train", **data_shard())
    val_data = validation_batches(cfg, cfg.training.validation_batches, **data_shard())
    runner = make_runner(cfg, strategy)
    tx = make_optimizer(cfg)
    lr_at = learning_rate_schedule(cfg)
    store = CheckpointStore(directory, cfg.checkpoint.max_to_keep)

    if checkpoints and store.steps():
        start, exported, meta, saved_cfg = store.restore(
            model.abstract_params(cfg), warn=_warn, target=restore_target(runner)
        )
        if allow_config_change:
            changed = _changed_keys(saved_cfg, cfg)
        else:
            changed = _check_resume(saved_cfg, cfg, start, directory)
        for damaged in [s for s in store.steps() if s > start]:
            _warn(f"moved damaged checkpoint of step {damaged} to {store.set_aside(damaged)}")
        if changed:
            _warn(f"resuming with config changes in {', '.join(changed)}")
        state = runner.import_train_state(exported, start, tx, meta["layout"])
        train_data.restore(meta["data"])
        chosen = meta.get("microbatches")
        rechoosing = cfg.ma_separation.synchronization.rechoose_microbatches
        if (
            chosen
            and rechoosing
            and sync_interval_on(cfg, strategy)
            and chosen != runner.microbatches
        ):
            limit = max_ma_microbatches()
            if limit is not None and chosen > limit:
                _note(
                    f"the sync loop last chose {chosen} micro-batches, more than the CPU backend "
                    f"runs; going on with {runner.microbatches}"
                )
            else:
                runner.set_microbatches(chosen)
                _note(f"{chosen} micro-batches per step, as the sync loop last chose")
        _note(f"resumed from the checkpoint of step {start} in {directory}")
    else:
        state = runner.init_train_state(runner.init(cfg.training.seed), tx)
    log = MetricsLog(directory / "metrics.jsonl", keep_through=state.step)

    def save() -> None:
        if not checkpoints:
            return
        if not all_finite((state.params, state.opt_state)):
            raise TrainingError(
                _stop_line(
                    f"the parameters or optimizer state of step {state.step} are not finite",
                    state.step,
                    store,
                    directory,
                )
            )
        meta = {
            "data": train_data.state(),
            "seed": cfg.training.seed,
            "strategy": strategy,
            "layout": runner.storage_layout(),
        }
        if strategy == "ma":
            meta["microbatches"] = runner.microbatches
        store.save(state.step, runner.export_train_state(state), meta, cfg.to_dict())

    sync = sync_loop(cfg, strategy, runner, steps)
    failures = dict(failures or {})
    for past in sorted(s for s in failures if s <= state.step):
        _note(f"--fail-device at step {past}: before the resumed step {state.step}, not injected")
        del failures[past]
    for late in sorted(s for s in failures if s > steps):
        raise ConfigError("--fail-device", f"step {late} is after the last step {steps}")
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
            measured = sync is not None and sync.due(step + 1)
            batch = next(train_data)
            failure = None
            if step + 1 in failures:
                source = experts_from_checkpoint(cfg, store, runner) if checkpoints else None
                state, failure = fail_during_step(
                    runner, state, batch, tx, cfg.training.seed, failures.pop(step + 1), source
                )
            with sync.measuring() if measured else contextlib.nullcontext():
                state, record, seconds = training_step(runner, state, batch, tx, cfg.training.seed)
            if failure is not None:
                failure["redone_step_seconds"] = seconds
                log.write(failure)
                history.append(failure)
                layout = failure["layout"]
                _note(
                    f"step {failure['step']}: device {failure['device']} ({failure['pool']}) "
                    f"failed; recovered in {failure['recovery_seconds']:.2f} s on attention "
                    f"devices {layout['attention_devices']} and expert devices "
                    f"{layout['expert_devices']}, step redone in {seconds:.2f} s"
                )
            bad = [k for k in ("loss", "grad_norm") if not math.isfinite(record.get(k, 0.0))]
            if bad:
                values = ", ".join(f"{k} {record[k]}" for k in bad)
                raise TrainingError(
                    _stop_line(
                        f"{values} at step {state.step} (computed from the parameters of "
                        f"step {step})",
                        state.step,
                        store,
                        directory,
                        producer=step,
                    )
                )
            synced = None
            if sync is not None:
                sync.note_step(record["expert_kept_fraction_by_layer"])
            if measured:
                kept = record["expert_kept_fraction_by_layer"]
                state, synced = sync.observe(state.step, kept, state)
            if state.step % cfg.training.log_interval:
                for per_layer in ("expert_fraction_by_layer", "expert_kept_fraction_by_layer"):
                    record.pop(per_layer, None)  # [L, E]: every log_interval steps
            record["learning_rate"] = float(lr_at(step))
            record["tokens_per_second"] = cfg.sequence.total_tokens_per_batch / seconds
            record["seconds"] = seconds
            log.write(record)
            history.append(record)
            if synced is not None:
                log.write(synced)
                history.append(synced)
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
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train up to this step, 1 or more (default: schedule.total_steps)",
    )
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
    parser.add_argument(
        "--fail-device",
        dest="failures",
        action="append",
        default=[],
        metavar="ID@STEP",
        help="emulate the failure of device ID during step STEP (repeatable; strategy ma): the "
        "run fails over in place and goes on",
    )
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="neither resume from nor write checkpoints (only metrics.jsonl); such a run cannot "
        "be resumed. Refused when the directory already holds a run (checkpoints or metrics), "
        "whose metrics it would replace",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if a key that changes what is computed (batch, sequence length, data, "
        "model, optimizer, schedule, dtype, compression) differs from the checkpoint's",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    directory = None
    try:
        check_count(args.steps, "--steps")
        cfg = load_config(args.config, args.overrides)
        directory = Path(args.checkpoint_dir or cfg.checkpoint.directory)
        setup_jax(cfg)
        failures = parse_failures(args.failures, cfg, args.strategy)
        summary = train(
            cfg,
            args.strategy,
            args.steps,
            args.checkpoint_dir,
            not args.no_progress,
            args.allow_config_change,
            not args.no_checkpoint,
            failures,
        )
    except (*USER_ERRORS, TrainingError, ResumeError, FailoverError) as e:
        if debugging():
            raise
        print(f"maxjax.train: error: {one_line(e)}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError:
        wait_for_lost_peer()
        raise
    except KeyboardInterrupt:
        # Ctrl-C: train() has closed its checkpoints (a save in flight completes), so the
        # newest complete one is where the same command resumes.
        if debugging():
            raise
        print(
            f"maxjax.train: {interrupted_line(directory, not args.no_checkpoint)}",
            file=sys.stderr,
        )
        return 130
    if jax.process_index() == 0:
        losses = (
            f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
            if summary["first_loss"] is not None
            else "nothing left to train, "
        )
        print(
            f"step {summary['step']}: {losses}validation loss {summary['val_loss']:.4f}, "
            f"perplexity {summary['val_perplexity']:.2f}; "
            + (
                f"checkpoints in {summary['checkpoint_dir']}"
                if not args.no_checkpoint
                else f"no checkpoints (metrics in {summary['checkpoint_dir']})"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
