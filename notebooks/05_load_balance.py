# ---
# jupyter:
#   execution:
#     timeout: 1200
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: execution
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Load balance: expert utilisation, measured stage times, the time models, the balancer
#
# Seed §4.3 keeps the two pools in balance with a 3-layer MLP that predicts stage times: every
# `sync_interval` (100) iterations the system re-balances when the predicted difference exceeds
# `load_balancing_threshold` (5%). Seed §5.5 reports the outcome as expert utilisation: standard
# deviation **0.023**, least-used expert **5.8%**, most-used **8.9%** of the routed assignments,
# load-balancing loss **0.0082**.
#
# This notebook shows what maxjax does of this today, on the tiny config and 16 emulated CPU
# devices:
#
# 1. **utilisation per expert and layer** during an MA training run (`expert_fraction_by_layer`
#    in metrics.jsonl every `training.log_interval` steps), with the seed's three statistics;
# 2. **the sync loop** of that run (`maxjax.sync.loop`, every `sync_interval` steps, here 10):
#    one step measured under the profiler, each attention stage's and each expert device's time,
#    the imbalance between the expert devices and between the pools;
# 3. **the two time models** scored on each sync point's measurements before they are refit on
#    them (held out): the seed's MLP and a least-squares linear model, and which one decides;
# 4. **the balancer acting**: at each sync point the layers whose expert devices' stage times,
#    as the deciding model predicts them from the loads (the assignments each expert kept
#    within its capacity: the slots it computes), differ by more than the
#    threshold get a new placement (`sync.plan_placement`; at the first sync point, with no
#    model yet, the loads decide), and the experts move with their AdamW moments
#    (`MARunner.move_experts`); the device loads before and after each sync point;
# 5. **a skewed router**: the model with a router biased toward one expert device's experts,
#    trained with the balancer acting on the loads, against the same steps with it off: the
#    devices even out to within the threshold and the losses stay the same.
#
# The same sync points re-choose the micro-batch count when the pools' measured stage times
# differ by more than the threshold: a neighbouring count (double, half) is measured first, then
# the models' predicted step times pick one (section 4).
#
# What is not here: the bytes an expert device receives do not follow its load (the buffers
# have static shapes), only its computation does.

# %%
# First: 16 emulated devices, set before JAX starts (restart the kernel to change them).
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} devices")
assert jax.device_count() == 16

# %%
import tempfile  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maxjax import model, sync  # noqa: E402
from maxjax.config import load_config  # noqa: E402
from maxjax.evaluate import quiet_libraries  # noqa: E402
from maxjax.train import train  # noqa: E402

quiet_libraries()
SEED_5_5 = {"std_dev": 0.023, "min_usage": 0.058, "max_usage": 0.089, "load_balancing_loss": 0.0082}

# %% [markdown]
# ## 1 · A training run with the sync loop on
#
# The tiny config (`configs/tiny.yaml`: the paper's 4 layers, 32 heads, 16 experts, top-2 and
# device split at small widths), MA separation, 40 steps; a sync point every 10 steps and each
# layer's expert shares every 5. The expert devices compute only the filled slots
# (`ma_separation.expert_compute: filled_slots`; the default, `capacity`, computes every slot,
# which is faster at these widths on CPU), and the loop also re-chooses the micro-batch count
# (`ma_separation.synchronization.rechoose_microbatches`, off by default because a changed count
# sums the micro-batches in another order).

# %%
cfg = load_config(
    "tiny",
    [
        "training.dtype=float32",
        "ma_separation.synchronization.sync_interval=10",
        "ma_separation.synchronization.rechoose_microbatches=true",
        "ma_separation.expert_compute=filled_slots",
        "training.log_interval=5",
        "schedule.warmup_steps=4",
    ],
)
run_dir = tempfile.mkdtemp(prefix="maxjax-05-")
result = train(cfg, "ma", steps=40, checkpoint_dir=run_dir, progress=False, checkpoints=False)
steps = [r for r in result["history"] if "loss" in r]
syncs = [r for r in result["history"] if r.get("event") == "sync"]
print(
    f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; sync points at",
    [r["step"] for r in syncs],
)

# %% [markdown]
# ## 2 · Expert utilisation per expert and layer
#
# An expert's utilisation is its share of the routed assignments (top-2: two per token). With 16
# experts an even router gives each 1/16 = 6.25%. Left: every layer's shares at the last logged
# step. Right: over training, per layer, the standard deviation, minimum and maximum of the
# shares, the three statistics of seed §5.5, whose values are the dashed lines.

# %%
logged = [r for r in steps if "expert_fraction_by_layer" in r]
shares = np.array([r["expert_fraction_by_layer"] for r in logged])  # [logged steps, L, E]
layers, experts = shares.shape[1:]
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
im = axes[0].imshow(shares[-1], aspect="auto", cmap="viridis")
axes[0].set(xlabel="expert", ylabel="layer", title=f"expert shares at step {logged[-1]['step']}")
fig.colorbar(im, ax=axes[0], label="share of routed assignments")
x = [r["step"] for r in logged]
for layer in range(layers):
    (line,) = axes[1].plot(x, shares[:, layer].std(axis=1), label=f"layer {layer} std")
    axes[1].fill_between(
        x,
        shares[:, layer].min(axis=1),
        shares[:, layer].max(axis=1),
        alpha=0.12,
        color=line.get_color(),
    )
for key, style in (("std_dev", "--"), ("min_usage", ":"), ("max_usage", ":")):
    axes[1].axhline(SEED_5_5[key], color="gray", ls=style, lw=1)
axes[1].axhline(1 / experts, color="black", lw=0.8, label="even (1/16)")
axes[1].set(xlabel="step", ylabel="share", title="std (lines), min-max (bands); seed §5.5 dashed")
axes[1].legend(fontsize=7, ncol=2)
fig.tight_layout()

last = shares[-1]
coef = cfg.moe.load_balancing_loss
print("                      this run (last logged step, all layers)   seed §5.5")
print(f"std of shares         {last.std(axis=1).mean():.4f}                                 0.023")
print(f"least-used expert     {last.min():.2%}                                  5.8%")
print(f"most-used expert      {last.max():.2%}                                  8.9%")
print(
    f"load-balancing loss   {coef * steps[-1]['load_balancing_loss']:.4f} (coefficient "
    f"{coef} x {steps[-1]['load_balancing_loss']:.3f})         0.0082"
)

# %% [markdown]
# After 40 steps from a random router at the tiny config's learning rate, a few experts per
# layer take most of the assignments: far from the seed's figures, which are those of its
# trained model after 50,000 steps (not reproduced here).

# %% [markdown]
# ## 3 · Measured stage times at each sync point
#
# At a sync point the step runs under `jax.profiler`; every program execution on every device
# becomes a run, and each attention stage (the slowest attention device's time) and each expert
# device's stage is a sample. Left: the mean time of an attention stage and of each expert
# device's stage. Right: the imbalance, (slowest - fastest) / slowest, between the expert
# devices (the worst layer) and between the pools. An expert device computes only the filled
# slots of its experts, so its time follows the tokens they serve; on CPU all 16 emulated
# devices share the machine's cores, so the per-device times also carry that contention.

# %%
sync_steps = [r["step"] for r in syncs]
per_device = np.array([r["expert_stage_seconds"] for r in syncs]) * 1e3
fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
for j in range(per_device.shape[1]):
    axes[0].plot(sync_steps, per_device[:, j], "o-", label=f"expert device {12 + j}")
axes[0].plot(
    sync_steps, [1e3 * r["attention_stage_seconds"] for r in syncs], "ks--", label="attention"
)
axes[0].set(xlabel="step", ylabel="ms per stage", title="measured stage times")
axes[0].legend(fontsize=7)
axes[1].plot(sync_steps, [r["imbalance_before"] for r in syncs], "o-", label="expert devices")
axes[1].plot(sync_steps, [r["pool_imbalance"] for r in syncs], "s-", label="pools")
axes[1].axhline(cfg.ma_separation.synchronization.load_balancing_threshold, color="gray", ls="--")
axes[1].set(xlabel="step", ylabel="imbalance", title="measured imbalance (threshold dashed)")
axes[1].legend()
fig.tight_layout()

# %% [markdown]
# ## 4 · The MLP against a linear model, on measurements neither has seen
#
# Before refitting at a sync point, both models fitted at the previous one predict the new
# samples; their mean absolute percentage errors are `predictor_mape` and `linear_mape`. The
# better one (the MLP where it does at least as well, `decided_by`) decides the re-placement
# below: it predicts each expert device's stage time from its load, and a layer is re-placed
# when those times differ by more than the threshold. At the first sync point no model has
# been scored yet and the loads decide.

# %%
scored = [r for r in syncs if r["predictor_mape"] is not None]
width = 1.6
xs = np.array([r["step"] for r in scored], float)
plt.figure(figsize=(7, 3.4))
plt.bar(xs - width / 2, [r["predictor_mape"] for r in scored], width, label="3-layer MLP")
plt.bar(xs + width / 2, [r["linear_mape"] for r in scored], width, label="linear")
plt.xlabel("sync point (step)")
plt.ylabel("held-out MAPE")
plt.legend()
plt.title("time models on the next sync point's measurements")
for r in scored:
    print(
        f"step {r['step']}: MLP {r['predictor_mape']:.1%}, linear {r['linear_mape']:.1%} -> "
        f"{r['decided_by']} decides"
    )

# %% [markdown]
# With `rechoose_microbatches` on, the same sync points re-choose the micro-batch count while
# the pools' measured times differ by more than the threshold: first to a neighbouring count
# (double or half) that no measurement covers yet (`explore`: the next sync point measures it),
# then, with two counts measured, to the one whose predicted step time (`predicted_step_seconds`: per layer the
# attention stage against the slowest expert device, overlapped as the ping-pong schedule
# overlaps them) is smaller. On two shared CPU cores the emulated devices do not run in
# parallel, so the overlap the schedule assumes is not what the measured times show here.

# %%
for r in syncs:
    predicted = r["predicted_step_seconds"] or {}
    times = ", ".join(f"{m}: {t * 1e3:.0f} ms" for m, t in predicted.items())
    print(
        f"step {r['step']}: pools {r['pool_imbalance']:.2f} apart; micro-batches "
        f"{r['microbatches_before']} -> {r['microbatches']} "
        f"({r['microbatches_decided_by'] or 'kept: pools within the threshold'})"
        + (f"; predicted step {times}" if times else "")
    )

# %% [markdown]
# ## 5 · The balancer acting in that run
#
# At each sync point, per layer: the expert devices' loads (kept assignments over the
# interval) under the placement in use (`load_imbalance_before`), the imbalance the new
# placement gives the same loads (`load_imbalance_after`, predicted), and at the next sync
# point what the interval after it measured (`previous_load_imbalance_after`). The printout
# gives what decided each sync point and, where a time model did, the predicted imbalance of
# the expert-stage times before and after.

# %%
fig, axes = plt.subplots(1, layers, figsize=(13, 3), sharey=True)
for layer in range(layers):
    axes[layer].plot(
        sync_steps, [r["load_imbalance_before"][layer] for r in syncs], "o-", label="before"
    )
    axes[layer].plot(
        sync_steps, [r["load_imbalance_after"][layer] for r in syncs], "s--", label="after (pred.)"
    )
    measured = [r["previous_load_imbalance_after"] for r in syncs[1:]]
    axes[layer].plot(
        [m["step"] for m in measured],
        [m["measured"][layer] for m in measured],
        "x:",
        label="after (measured next interval)",
    )
    axes[layer].axhline(cfg.ma_separation.synchronization.load_balancing_threshold, color="gray")
    axes[layer].set(title=f"layer {layer}", xlabel="sync point (step)")
axes[0].set_ylabel("load imbalance between expert devices")
axes[0].legend(fontsize=7)
fig.tight_layout()
for r in syncs:
    timed, after = r["predicted_time_imbalance_before"], r["predicted_time_imbalance_after"]
    times = ""
    if timed is not None:
        pairs = ", ".join(f"{b:.2f}->{a:.2f}" for b, a in zip(timed, after, strict=True))
        times = f" predicted time imbalance {pairs};"
    print(
        f"step {r['step']} ({r['decided_by']} decide{'s' if timed else ''}):{times} moved "
        f"layers {r['layers_moved']}, {r['moved_bytes'] / 2**20:.1f} MiB "
        f"in {r['move_seconds'] * 1e3:.0f} ms"
    )

# %% [markdown]
# The predicted imbalance after a move is low, the measured one over the next interval is
# higher: early in training the router changes fast (the learning rate is warming up), so the
# loads a placement was planned for do not last. Section 6 holds the router nearly still to
# show the placement alone.
#
# ## 6 · A skewed router, trained with the balancer acting
#
# The model as initialised, with its router biased toward expert device 12's experts
# (`router_biased_toward`: every token gets a component along one of two directions, by
# token-id parity, and each layer's router sends the two classes to two of the device's four
# experts each). With one capacity slot per expert and sequence (`moe.capacity_factor` 0.25),
# each of those four experts fills its slot in every sequence that holds a token of its class,
# and no other expert gets a token: device 12 does all the expert work. A batch of 64 sequences
# of 32 tokens at a learning rate of 1e-6 (routing stays as it is; this is about placement), 6
# steps; the loop acts once, after step 2, on the loads of steps 1 and 2. The same 6 steps
# without acting give the losses to compare.
#
# (The natural skew of the model as initialised, with its hottest experts moved onto one
# device, is not placement alone: which experts are hot changes with the text from step to
# step, so the loads of the next steps differ from those a placement was planned on by more
# than the 5% threshold at this batch size: a placement evens the loads it was planned on, not
# the text's variation.)

# %%
from maxjax import optim  # noqa: E402
from maxjax.bench.ma_step import router_biased_toward  # noqa: E402
from maxjax.data.pipeline import TokenBatches  # noqa: E402
from maxjax.parallel.ma import MARunner  # noqa: E402
from maxjax.sync.loop import SyncLoop  # noqa: E402

skew_cfg = load_config(
    "tiny",
    [
        "training.dtype=float32",
        "model.hidden_dim=64",
        "model.head_dim=2",
        "moe.expert_hidden_dim=256",
        "sequence.length=32",
        "sequence.batch_size=64",
        "sequence.total_tokens_per_batch=2048",
        "moe.capacity_factor=0.25",
        "optimizer.learning_rate=1e-6",
        "ma_separation.expert_compute=filled_slots",
    ],
)
canonical = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(skew_cfg, 0))())
canonical = router_biased_toward(canonical, skew_cfg.experts_of_device(12), skew_cfg.moe.top_k)


def skewed_run(act: bool) -> tuple[list[float], np.ndarray]:
    """6 steps on the skewed model; the losses and each step's per-layer device loads."""
    runner, tx = MARunner(skew_cfg), optim.make_optimizer(skew_cfg)
    state = runner.init_train_state(runner.from_canonical(canonical), tx)
    loop, data = SyncLoop(skew_cfg, runner), TokenBatches(skew_cfg, "train")
    losses, loads = [], []
    for step in range(1, 7):
        state, metrics = runner.train_step(state, next(data), tx)
        shares = np.asarray(metrics["expert_kept_fraction_by_layer"])
        loop.note_step(shares)
        losses.append(float(metrics["loss"]))
        loads.append(sync.device_load_rows(shares, runner.experts.order, 4))
        if act and step == 2:
            state, placement = loop.act(state, step)
            print(
                f"after step {step}: layers {placement['layers_moved']} re-placed, "
                f"{placement['moved_bytes'] / 2**20:.1f} MiB moved; predicted imbalance "
                f"{np.round(placement['load_imbalance_after'], 3).tolist()}"
            )
    return losses, np.array(loads)


acting_losses, acting_loads = skewed_run(act=True)
still_losses, still_loads = skewed_run(act=False)
print(
    "largest loss difference, balancer acting vs not:",
    max(abs(a - b) for a, b in zip(acting_losses, still_losses, strict=True)),
)

# %%
fig, axes = plt.subplots(1, layers, figsize=(13, 3), sharey=True)
step_axis = np.arange(1, 7)
for layer in range(layers):
    for j in range(4):
        (line,) = axes[layer].plot(
            step_axis, acting_loads[:, layer, j], "-", label=f"device {12 + j}, acting"
        )
        axes[layer].plot(step_axis, still_loads[:, layer, j], ":", color=line.get_color())
    axes[layer].axvline(2.5, color="gray", lw=0.8)
    axes[layer].set(title=f"layer {layer}", xlabel="step")
axes[0].set_ylabel("share of kept assignments (solid: acting; dotted: not)")
axes[0].legend(fontsize=6)
fig.tight_layout()
imbalance = lambda loads: [sync.imbalance(row) for row in loads[2:].mean(0)]  # noqa: E731
print(
    "device-load imbalance per layer over steps 3-6, acting:", np.round(imbalance(acting_loads), 3)
)
print("                                        not acting:", np.round(imbalance(still_loads), 3))
threshold = skew_cfg.ma_separation.synchronization.load_balancing_threshold
assert max(imbalance(acting_loads)) <= threshold < min(imbalance(still_loads))
assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(acting_losses, still_losses, strict=True))
