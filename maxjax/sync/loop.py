"""The sync loop of an MA training run (seed section 4.3): measure, score, refit.

Every `ma_separation.synchronization.sync_interval` steps (0: never) the trainer runs one
training step under the profiler (`SyncLoop.measuring`), and `SyncLoop.observe` then

1. turns the trace into stage samples: each attention stage's and each expert device's measured
   time with its features (`maxjax.sync.measure`);
2. scores the time models fitted at the previous sync point on these new samples, which neither
   model has seen: `predictor_mape` (the 3-layer MLP) and `linear_mape` (least squares), and
   `decided_by`, the one a decision uses (the MLP where it does at least as well);
3. refits both models on the samples of the last `WINDOW` sync points;
4. re-places the experts (`SyncLoop.act`): per layer, the expert devices' loads are the
   assignments their experts kept within capacity (the slots their FFNs compute; with dropless
   routing every routed one) averaged over the interval's steps (`note_step`), and the
   model `decided_by` turns each device's load into its predicted expert-stage time
   (`SyncLoop.device_time`). A layer whose devices' predicted times differ by more than
   `load_balancing_threshold` gets the balancer's placement (`balancer.plan_placement`:
   planned from the loads, kept where it evens the predicted times), and
   `MARunner.move_experts` moves its experts with their AdamW moments between the expert
   devices. At the first sync point no model has been scored yet and the loads decide
   (`decided_by: "loads"`). The placement changes what runs where, never what is computed
   (`tests/test_sync_loop.py` compares the losses with and without the loop);
5. with `ma_separation.synchronization.rechoose_microbatches` (off by default: see the key's
   meaning), re-chooses the micro-batch count (`SyncLoop.rechoose_microbatches`) when the
   measured stage times of the two pools differ by more than the threshold: to double or half the
   count in use where the models have no measurement of it yet (`"explore"`: the next sync
   point measures it and the models learn how the stage times scale with the micro-batch
   size), otherwise to the measured count with the smallest predicted step time
   (`SyncLoop.step_time`: attention against the slowest expert device per layer, overlapped as
   `balancer.pingpong_layer_time` says). The count is saved with each checkpoint and restored
   on resume; the step computes the same function, up to the order in which micro-batches'
   losses and gradients are summed;
6. returns the sync record for metrics.jsonl: the measured imbalance of the stage times between
   the expert devices and between the pools, the load imbalance before and (predicted) after
   the re-placement per layer, what moved, and the placement in use after it. The next
   record gives the load imbalance measured over the interval that followed
   (`previous_load_imbalance_after`).

`microbatches` in the record is the count in use from the next step on,
`microbatches_before` the one the measured step ran with.
With `ma_separation.expert_compute: filled_slots` an expert device computes only the slots that
hold tokens, so its time follows the load the placement evens; with `capacity` it computes
every slot whatever the routing, and a placement evens the loads, not the times.
After an expert device fails (`MARunner.fail_devices`) the loop goes on over the surviving
expert devices, their slots (empty ones included) placed as above.
Measuring needs every device's runs in one trace, so the loop runs in single-process runs only.
The trace format is the one of JAX's CPU client (each operation with `device_ordinal` and
`run_id`); a trace without such runs (another backend) gives a record with `"samples": 0` and
an `error`, and training goes on.
The samples and models live in memory: after a resume the first sync point has no held-out
scores yet.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.config import Config
from maxjax.sync import balancer, measure
from maxjax.sync.predictor import (
    fit,
    fit_linear,
    held_out_scores,
    init_predictor,
    predict,
    predict_linear,
)

WINDOW = 4  # sync points whose samples the models are fitted on


class SyncLoop:
    """The sync loop's state across a run: the samples of recent sync points and the models
    fitted on them (see the module docstring)."""

    def __init__(self, cfg: Config, runner: Any):
        self.cfg = cfg
        self.runner = runner
        self.interval = cfg.ma_separation.synchronization.sync_interval
        self.window: list[measure.StageSamples] = []
        self.predictor = None
        self.linear = None
        self._key = jax.random.key(cfg.training.seed)
        self._trace_dir: str | None = None
        self.threshold = cfg.ma_separation.synchronization.load_balancing_threshold
        self.rechoose = cfg.ma_separation.synchronization.rechoose_microbatches
        self._load_sum: np.ndarray | None = None
        self._load_steps = 0
        self._last: dict[str, Any] | None = None  # step and predicted imbalance of the last act

    @property
    def expert_devices(self) -> list[int]:
        """The runner's expert devices now (fewer after an expert device failed)."""
        return [d.id for d in self.runner.expert_mesh.devices.flat]

    def note_step(self, kept_fraction_by_layer: np.ndarray) -> None:
        """Add a step's per-layer shares of kept assignments [L, E] (the metric
        `expert_kept_fraction_by_layer`) to the interval's loads."""
        fractions = np.asarray(kept_fraction_by_layer, np.float64)
        self._load_sum = fractions if self._load_sum is None else self._load_sum + fractions
        self._load_steps += 1

    def interval_loads(self) -> np.ndarray:
        """Each canonical expert's share of the kept assignments per layer [L, E], averaged
        over the steps since the last sync point."""
        return self._load_sum / max(self._load_steps, 1)

    def act(
        self, state: Any, step: int, decided_by: str | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Step 4 of the module docstring: re-place the experts of the layers out of balance,
        judged by the predicted stage times of the time model `decided_by` ("predictor" or
        "linear"), or by the loads (None: no model fitted yet). Returns (state, the record's
        placement keys)."""
        start = time.perf_counter()
        runner, devices = self.runner, len(self.expert_devices)
        loads = self.interval_loads()
        device_time = None if decided_by is None else self.device_time(decided_by)
        order, before, after = balancer.plan_placement(
            loads, runner.experts.order, devices, self.threshold, device_time
        )
        load_before, load_after = (
            balancer.layer_imbalance(loads, o, devices) for o in (runner.experts.order, order)
        )
        previous = None
        if self._last is not None:
            previous = {
                "step": self._last["step"],
                "predicted": self._last["predicted"],
                "measured": load_before.tolist(),
            }
        state, moved = runner.move_experts(state, order)
        self._last = {"step": step, "predicted": load_after.tolist()}
        self._load_sum, self._load_steps = None, 0
        timed = decided_by is not None
        return state, {
            "decided_by": decided_by or "loads",
            "load_imbalance_before": load_before.tolist(),
            "imbalance_after": float(after.max()),
            "load_imbalance_after": load_after.tolist(),
            "predicted_time_imbalance_before": before.tolist() if timed else None,
            "predicted_time_imbalance_after": after.tolist() if timed else None,
            "previous_load_imbalance_after": previous,
            "layers_moved": [int(layer) for layer in np.flatnonzero(after < before)],
            "moved_bytes": int(moved),
            "expert_mapping": [runner.expert_mapping(layer) for layer in range(len(order))],
            "applied": moved > 0,
            "move_seconds": time.perf_counter() - start,
        }

    def due(self, step: int) -> bool:
        """Whether the step that ends at `step` is measured."""
        return self.interval > 0 and step % self.interval == 0

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Profile what runs inside (one training step, finished before the block ends)."""
        self._trace_dir = tempfile.mkdtemp(prefix="maxjax-sync-")
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # device programs only: a smaller trace, less overhead
        options.enable_hlo_proto = False
        jax.profiler.start_trace(self._trace_dir, profiler_options=options)
        try:
            yield
        except BaseException:
            jax.profiler.stop_trace()
            shutil.rmtree(self._trace_dir, ignore_errors=True)
            raise
        jax.profiler.stop_trace()

    def samples(self, kept_fraction_by_layer: np.ndarray) -> measure.StageSamples:
        """The stage samples of the step just measured."""
        cfg, runner = self.cfg, self.runner
        try:
            runs = measure.program_runs(measure.newest_trace(self._trace_dir))
        finally:
            shutil.rmtree(self._trace_dir, ignore_errors=True)
        shape = self._shape()
        assignments = balancer.device_load_rows(
            np.asarray(kept_fraction_by_layer, np.float64) * shape["assignments_per_share"],
            runner.experts.order,
            len(self.expert_devices),
        )
        return measure.stage_samples(
            runs,
            attention_devices=[d.id for d in runner.attention_devices],
            expert_devices=self.expert_devices,
            layers=cfg.model.layers,
            microbatches=runner.microbatches,
            microbatch_sequences=shape["microbatch_sequences"],
            sequence_length=cfg.sequence.length,
            heads_per_attention_device=shape["heads_per_attention_device"],
            experts_per_device=shape["experts_per_device"],
            compression=runner.compress,
            assignments=assignments,
        )

    def _shape(self, microbatches: int | None = None) -> dict[str, Any]:
        """The step's features other than the tokens (`measure.FEATURES`, as the time models see
        them), and `assignments_per_share`: assignments per micro-batch for a share of 1;
        with `microbatches` micro-batches (default: the count in use)."""
        cfg, runner = self.cfg, self.runner
        microbatches = microbatches or runner.microbatches
        sequences = cfg.sequence.batch_size // (microbatches * runner.accumulation)
        return {
            "microbatch_sequences": sequences,
            "sequence_length": cfg.sequence.length,
            "heads_per_attention_device": cfg.model.attention_heads / len(runner.attention_devices),
            "experts_per_device": runner.experts.num_rows // len(self.expert_devices),
            "compression": int(runner.compress),
            "assignments_per_share": sequences * cfg.sequence.length * cfg.moe.top_k,
        }

    def _predicted(self, model: str, features: np.ndarray) -> np.ndarray:
        """Stage times [N] of feature rows [N, len(FEATURES)] by the fitted model `model`."""
        if model == "predictor":
            return np.asarray(predict(self.predictor, jnp.asarray(features, jnp.float32)))[:, 0]
        return predict_linear(self.linear, features)[:, 0]

    def device_time(
        self, model: str, microbatches: int | None = None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Predicted expert-stage time (forward plus backward) of each expert device per
        micro-batch, as a function of the devices' shares of the kept assignments [N, J], by
        the fitted time model `model` ("predictor" or "linear"), with `microbatches`
        micro-batches per step (default: the count in use)."""
        fixed = self._shape(microbatches)
        per_share = fixed.pop("assignments_per_share")

        def times(shares: np.ndarray) -> np.ndarray:
            tokens = np.asarray(shares, np.float64) * per_share
            return sum(
                self._predicted(
                    model, measure.feature_rows(tokens, expert_stage=1, backward=b, **fixed)
                ).reshape(tokens.shape)
                for b in (0, 1)
            )

        return times

    def step_time(self, model: str, microbatches: int, shares: np.ndarray) -> float:
        """Predicted time of a step's two sweeps with `microbatches` micro-batches: per layer,
        the attention stage against the slowest expert device (`shares` [L, J]: their shares of
        the kept assignments), each forward plus backward by the time model `model`, overlapped
        as `balancer.pingpong_layer_time` says."""
        fixed = self._shape(microbatches)
        fixed.pop("assignments_per_share")
        tokens = fixed["microbatch_sequences"] * fixed["sequence_length"]
        per_device = tokens / len(self.runner.attention_devices)
        attention = sum(
            self._predicted(
                model, measure.feature_rows([per_device], expert_stage=0, backward=b, **fixed)
            )[0]
            for b in (0, 1)
        )
        experts = self.device_time(model, microbatches)(shares).max(axis=1)
        return float(
            sum(
                balancer.pingpong_layer_time(
                    microbatches * attention, microbatches * e, microbatches
                )
                for e in experts
            )
        )

    def microbatch_neighbours(self) -> list[int]:
        """The counts a sync point may move the micro-batches to: double and half the count in
        use, where the batch splits into them (in each gradient-accumulation round) and the
        backend runs them (`maxjax.parallel.max_ma_microbatches`)."""
        from maxjax.parallel import max_ma_microbatches

        m, rounds = self.runner.microbatches, self.runner.accumulation
        limit = max_ma_microbatches()
        return [
            c
            for c in (2 * m, m // 2)
            if c >= 1
            and self.cfg.sequence.batch_size % (c * rounds) == 0
            and (limit is None or c <= limit)
        ]

    def _measured_microbatches(self) -> set[int]:
        """The micro-batch counts of the steps the models are fitted on."""
        column = measure.FEATURES.index("microbatch_sequences")
        per_round = self.cfg.sequence.batch_size // self.runner.accumulation
        return {
            per_round // int(round(sequences))
            for samples in self.window
            for sequences in np.unique(samples.features[:, column])
        }

    def rechoose_microbatches(
        self, model: str, shares: np.ndarray, pool_imbalance: float
    ) -> dict[str, Any]:
        """Step 5 of the module docstring: with `rechoose_microbatches` on and the measured pool
        imbalance above the threshold, move to a neighbouring micro-batch count the models have no measurement of
        yet ("explore": the next sync point measures it), or else to the count, among those
        measured, with the smallest predicted step time (`step_time`, by `model`). Returns the
        record's micro-batch keys."""
        runner = self.runner
        before = runner.microbatches
        keys = {"microbatches_before": before, "microbatches_decided_by": None}
        predicted: dict[int, float] = {}
        if self.rechoose and pool_imbalance > self.threshold:
            measured, neighbours = self._measured_microbatches(), self.microbatch_neighbours()
            unexplored = [c for c in neighbours if c not in measured]
            if unexplored:
                runner.set_microbatches(unexplored[0])
                keys["microbatches_decided_by"] = "explore"
            else:
                candidates = measured & {before, *neighbours}
                predicted = {c: self.step_time(model, c, shares) for c in sorted(candidates)}
                runner.set_microbatches(min(predicted, key=predicted.__getitem__))
                keys["microbatches_decided_by"] = model
        return {
            **keys,
            "microbatches": runner.microbatches,
            "predicted_step_seconds": {str(c): t for c, t in predicted.items()} or None,
        }

    def observe(
        self, step: int, kept_fraction_by_layer: np.ndarray, state: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Steps 1-6 of the module docstring for the step just measured (its shares already
        noted): (the state, re-placed where the balancer acted, and the sync record)."""
        start = time.perf_counter()
        new = self.samples(kept_fraction_by_layer)
        if not len(new.times):
            # Traces of other backends may name devices and executions differently: say so in
            # the record, place by the loads and go on training.
            state, placement = self.act(state, step)
            return state, {
                "event": "sync",
                "step": step,
                "samples": 0,
                "error": "the profiler trace held no stage program runs with a device ordinal",
                **placement,
                "seconds": time.perf_counter() - start,
            }
        scores: dict[str, Any] = {"predictor_mape": None, "linear_mape": None, "decided_by": None}
        if self.predictor is not None:
            scores = held_out_scores(self.predictor, self.linear, new.features, new.times[:, None])
        decided_by = scores.pop("decided_by")
        loads = self.interval_loads()
        state, placement = self.act(state, step, decided_by)
        self.window = [*self.window[-(WINDOW - 1) :], new]
        features = np.concatenate([s.features for s in self.window])
        times = np.concatenate([s.times for s in self.window])[:, None]
        self.linear = fit_linear(features, times)
        # Padded to the full window (weight 0), so that the fit compiles once per sample size: a
        # re-chosen micro-batch count or a failed expert device changes the samples per step.
        pad = max(0, WINDOW * len(new.times) - len(times))
        weights = np.concatenate([np.ones(len(times)), np.zeros(pad)])
        self._key, key = jax.random.split(self._key)
        self.predictor, _ = fit(
            init_predictor(key, features.shape[1]),
            np.pad(features, ((0, pad), (0, 0)), mode="edge").astype(np.float32),
            np.pad(times, ((0, pad), (0, 0)), mode="edge").astype(np.float32),
            weights=weights.astype(np.float32),
        )
        devices = len(self.expert_devices)
        measured = measure.measured_imbalance(new, devices)
        experts = new.device >= 0
        shares = balancer.device_load_rows(loads, self.runner.experts.order, devices)
        microbatches = self.rechoose_microbatches(decided_by or "linear", shares, measured["pools"])
        return state, {
            "event": "sync",
            "step": step,
            "imbalance_before": measured["experts"],
            "pool_imbalance": measured["pools"],
            "attention_stage_seconds": float(new.times[~experts].mean()),
            "expert_stage_seconds": [
                float(new.times[new.device == j].mean()) for j in range(devices)
            ],
            "samples": len(new.times),
            **scores,
            **placement,
            **microbatches,
            "seconds": time.perf_counter() - start,
        }
