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
# 4. **the balancer** (`maxjax.sync.plan`) on a router skewed toward one expert device's
#    experts: the placement it proposes and the device loads before and after.
#
# What is not here yet: the trainer does not apply the balancer's plan (the placement and the
# micro-batch count stay as configured; each sync record says `"applied": false`), so step 4
# shows the proposal computed from measured loads, not a run in which it was applied.

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

import jax.numpy as jnp  # noqa: E402
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
# layer's expert shares every 5.

# %%
cfg = load_config(
    "tiny",
    [
        "training.dtype=float32",
        "ma_separation.synchronization.sync_interval=10",
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
# devices (the worst layer) and between the pools. On CPU all 16 emulated devices share the
# machine's cores, so the per-device times carry that contention: the expert devices compute
# equal capacity buffers here, and the differences between them are the machine's noise.

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
# samples; their mean absolute percentage errors are `predictor_mape` and `linear_mape`. A
# decision uses the MLP only where it does at least as well (`decided_by`).

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
# ## 5 · The balancer on a skewed router
#
# Double the router weights of the four experts of expert device 12 in every layer (their logits
# spread wider, so they win the top-2 more often: about 40% of the assignments instead of 25%),
# route one batch through the model, and give each layer's expert shares to the balancer. It
# proposes a new placement per layer (heaviest expert first onto the least-loaded device, four
# per device) when the devices' loads differ by more than the threshold. The loads after are
# those of the proposed placement for the same routing.

# %%
params = model.init_params(cfg, 0)
device_12 = list(cfg.ma_separation.moe.expert_mapping["gpu_12"])
skewed = jax.tree.map(lambda x: x, params)
for key in skewed["layers"]:
    router = skewed["layers"][key]["moe"]["router"]
    router["kernel"] = router["kernel"].at[:, jnp.array(device_12)].multiply(2.0)
tokens = jax.random.randint(jax.random.key(0), (8, cfg.sequence.length), 0, 50257)
_, aux = model.apply(cfg, skewed, tokens)
mapping = dict(cfg.ma_separation.moe.expert_mapping)
fig, axes = plt.subplots(1, layers, figsize=(13, 3), sharey=True)
for layer in range(layers):
    load = np.asarray(aux.expert_fraction[layer])
    proposal = sync.plan(
        load,
        mapping,
        cfg.ma_separation.moe.experts_per_gpu,
        cfg.ma_separation.synchronization.load_balancing_threshold,
        cfg.ma_separation.microbatches,
    )
    before = sync.device_loads(load, mapping)
    after = sync.device_loads(load, proposal.expert_mapping) if proposal else before
    names = list(before)
    axes[layer].bar(np.arange(4) - 0.2, [before[d] for d in names], 0.4, label="configured")
    axes[layer].bar(np.arange(4) + 0.2, [after[d] for d in names], 0.4, label="proposed")
    axes[layer].set_xticks(range(4), [d.replace("gpu_", "") for d in names])
    title = (
        f"layer {layer}: {proposal.imbalance_before:.0%} -> {proposal.imbalance_after:.0%}"
        if proposal
        else f"layer {layer}: balanced"
    )
    axes[layer].set(title=title, xlabel="expert device")
    if proposal:
        print(f"layer {layer}: proposed placement {proposal.expert_mapping}")
axes[0].set_ylabel("share of assignments")
axes[0].legend(fontsize=7)
fig.tight_layout()
