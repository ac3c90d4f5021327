# ---
# jupyter:
#   execution:
#     timeout: 600
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
# # 04 · Memory per device: the plan beside the seed's §5.4
#
# The seed reports one memory breakdown per GPU (§5.4). This notebook puts beside it the
# package's **memory plan** of the paper configuration, device by device and part by part:
# `python -m maxjax.bench memory` (`maxjax/perf/memory.py`). The plan allocates nothing: every
# array a step holds is sized from its abstract shape and sharding (a leaf counts its shard on
# every device that holds it), and every program's temporaries come from XLA's
# `memory_analysis()` of the program compiled ahead of time on 16 emulated CPU devices. A
# device's total is its largest *phase* of the step (MA: end of a round's forward sweep, backward
# per layer, update; baselines: the loss-and-gradient program, the update; all: right after the
# optimizer state is initialised), and the parts shown are those alive in that phase.
# `tests/test_memory_plan.py` holds the plan to the live buffers of real training steps on the
# tiny config, device by device.
#
# The paper-scale plans take a few minutes to compile, so they are stored in `notebooks/data/`,
# made from the repository root by
#
# ```bash
# python -m maxjax.bench memory --config configs/paper.yaml --strategy ma \
#     --json notebooks/data/memory_plan_paper_ma.json
# ```
#
# and the same for `tp`, `pp`, `tp_pp` and with `--decode` (files `..._decode.json`). At the end
# the notebook recomputes the tiny config's plan live and compares it with the stored one.
#
# **Labels**: *planned* = this package's plan of its own implementation today; *seed* = the
# seed's reported value.

# %%
# 16 emulated devices before JAX starts (for the live plan at the end).
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maxjax import model  # noqa: E402
from maxjax.config import load_config  # noqa: E402
from maxjax.perf.memory import PARTS  # noqa: E402

DATA = Path("data") if Path("data").exists() else Path("notebooks") / "data"
NAMES = ["ma", "tp", "pp", "tp_pp"]
plans = {
    (name, mode): json.loads((DATA / f"memory_plan_paper_{name}{suffix}.json").read_text())
    for name in NAMES
    for mode, suffix in (("training", ""), ("decoding", "_decode"))
}
ma = plans[("ma", "training")]
print(f"stored plans: {len(plans)}; made on {ma['devices']}; capacity {ma['capacity_bytes']:.0e} B")
print("MA training settings:", ma["settings"])
paper = load_config("paper")

# %% [markdown]
# ## 1. The seed's §5.4, as reported

# %%
SEED_GB = {  # seed §5.4 "memory_usage_per_gpu" (GB)
    "model_parameters": 23.1,
    "activations": 18.7,
    "gradients": 23.1,
    "optimizer_states": 46.2,
    "communication_buffers": 12.6,
}
SEED_TOTAL_GB = 123.7
SEED_AVAILABLE_GB = 124  # "80 GB × 1.55 = 124 GB", "with paging"
SEED_UTILIZATION = 0.854
CAPACITY_GB = 80  # A100 80GB (seed §4.2)
for part, gb in SEED_GB.items():
    print(f"  {part:22s} {gb:6.1f} GB  [seed]")
print(f"  {'total':22s} {SEED_TOTAL_GB:6.1f} GB  [seed]")

# %% [markdown]
# ## 2. The plan of MA separation, training, paper config
#
# One row per device; GB (1e9 bytes) of each part alive at the device's peak phase. With
# gradient checkpointing (`training.gradient_checkpointing: true` in the paper config) the part
# `residuals` is what the forward sweep keeps for the backward sweep: every stage's *inputs*
# (layer 0 its token slice, a later layer the token state and the pieces it received, the
# experts the pieces they received), for one round of micro-batches. The part `standby` is,
# on each attention device, the copy of its ring predecessor's parameters and both AdamW moments
# that `ma_separation.attention.replication_factor: 2` keeps for failover; it is alive in every
# phase.

# %%
GB = 1e9
print(
    f"{'dev':>3s} {'pool':10s}"
    + "".join(f"{p[:11]:>12s}" for p in PARTS)
    + "       total  peak phase"
)
for row in ma["per_device"]:
    print(
        f"{row['device']:3d} {row['pool']:10s}"
        + "".join(f"{row[p] / GB:12.2f}" for p in PARTS)
        + f"{row['total_bytes'] / GB:12.1f}  {row['peak_phase']}"
        + ("" if row["fits"] else "  (does not fit 80 GB)")
    )

# %%
rows = ma["per_device"]
devices = [r["device"] for r in rows]
settings = ma["settings"]
micro_size = settings["batch"] // (settings["microbatches"] * settings["gradient_accumulation"])
fig, axes = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 2]})
bottom = np.zeros(len(rows))
for part in PARTS:
    values = np.array([r[part] / GB for r in rows])
    if values.any():
        label = "residuals (stage inputs kept)" if part == "residuals" else part
        axes[0].bar(devices, values, bottom=bottom, label=label)
        bottom += values
axes[0].axhline(CAPACITY_GB, color="red", lw=1.5, label="80 GB (A100)")
axes[0].set_xticks(devices)
axes[0].set_xlabel("device (0-11 attention pool, 12-15 expert pool)")
axes[0].set_ylabel("GB at the device's peak phase")
axes[0].set_title(
    f"planned: MA separation, training step, paper config\n"
    f"({settings['gradient_accumulation']} rounds × {settings['microbatches']} micro-batches "
    f"of {micro_size} sequences, stages recomputed in the backward sweep)"
)
axes[0].legend(fontsize=8)

# Seed parts against the plan's, for an attention and an expert device. The seed's
# "activations" are set against the stage inputs kept for the backward sweep, the token states
# and the programs' temporaries, its "communication buffers" against the pieces in transfer.
mapping = {
    "model_parameters": ["parameters"],
    "gradients": ["gradients"],
    "optimizer_states": ["optimizer_state"],
    "activations": ["residuals", "token_states", "temporaries"],
    "communication_buffers": ["transfer_buffers"],
}
attention_row, expert_row = rows[0], rows[12]
xs = np.arange(len(mapping))
for offset, (label, values) in enumerate(
    [
        ("seed (per GPU)", [SEED_GB[k] for k in mapping]),
        (
            "planned, attention device 0",
            [sum(attention_row[p] for p in ps) / GB for ps in mapping.values()],
        ),
        (
            "planned, expert device 12",
            [sum(expert_row[p] for p in ps) / GB for ps in mapping.values()],
        ),
    ]
):
    axes[1].bar(xs + (offset - 1) * 0.27, values, 0.27, label=label)
axes[1].set_yscale("log")
axes[1].axhline(CAPACITY_GB, color="red", lw=1.5)
axes[1].set_xticks(xs, list(mapping), rotation=25, ha="right")
axes[1].set_ylabel("GB (log scale)")
axes[1].set_title("seed §5.4 vs planned at the peak phase, by part")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What dominates now, per pool: the parts of a device at its peak phase, largest first, and the
# temporaries of the programs the pool runs (the largest one sets the part `temporaries`).

# %%
print(f"VJP residual leaves stored: {len(ma['residual_leaves'])} (stage inputs kept instead)")
for row in (attention_row, expert_row):
    parts = sorted(PARTS, key=lambda p: -row[p])
    print(
        f"\ndevice {row['device']} ({row['pool']} pool), {row['total_bytes'] / GB:.2f} GB at "
        f"'{row['peak_phase']}':"
    )
    for part in parts:
        if row[part]:
            print(f"   {part:17s} {row[part] / GB:6.2f} GB")
    programs = sorted(
        (
            (name, p["temp_bytes_per_device"])
            for name, p in ma["programs"].items()
            if row["device"] in p["devices"]
        ),
        key=lambda item: -item[1],
    )
    print("   temporaries of its largest programs:")
    for name, temp in programs[:3]:
        print(f"      {name:24s} {temp / GB:6.2f} GB")

# %% [markdown]
# On the attention devices the largest part is the temporaries of `middle_recompute` (6.67 GB:
# a layer's attention stage run again on one micro-batch of 32 sequences, then its VJP), then
# the stage inputs kept for the backward sweep (4.13 GB on device 0), the pieces in transfer
# (2.68 GB), the token states (1.08 GB) and the standby copy (0.71 GB); parameters, gradient
# sums and AdamW moments of the attention layers are below half a gigabyte each. On the expert
# devices it is the other way round: the float32 AdamW moments of the device's experts
# (17.18 GB), the temporaries of `experts_recompute_acc` (17.18 GB) and the parameters and the
# gradient sums (8.59 GB each) make almost all of the 54.23 GB; the stage inputs kept are
# 2.15 GB.
#
# ### What gets the paper configuration under 80 GB
#
# Four things, each visible in the stored plan and the paper config:

# %%
rounds, micro = settings["gradient_accumulation"], settings["microbatches"]
print(
    f"1. a step's {settings['batch']} sequences = {rounds} rounds × {micro} micro-batches × "
    f"{micro_size} sequences; gradients summed over the rounds, so one round's "
    f"{micro * micro_size} sequences have activations alive"
)
kept = {row["pool"]: max(r["residuals"] for r in rows if r["pool"] == row["pool"]) for row in rows}
print(
    "   stage inputs kept for the backward sweep, largest per pool: "
    + ", ".join(f"{pool} {v / GB:.2f} GB" for pool, v in kept.items())
    + f"; the same for all {settings['batch']} sequences at once: "
    + ", ".join(f"{pool} {rounds * v / GB:.1f} GB" for pool, v in kept.items())
)
recompute = {
    name: p["temp_bytes_per_device"] / GB
    for name, p in ma["programs"].items()
    if "recompute" in name
}
print(
    f"2. training.gradient_checkpointing = {paper.training.gradient_checkpointing}: the forward "
    f"sweep keeps stage inputs only ({len(ma['residual_leaves'])} VJP residual leaves); the "
    "backward programs recompute each stage:"
)
for name, gb in recompute.items():
    print(f"      {name:24s} {gb:6.2f} GB of temporaries per device")
abstract = model.abstract_params(paper)
param_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(abstract)})
expert_params = sum(
    int(np.prod(leaf.shape))
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    if "experts" in jax.tree_util.keystr(path)
)
expert_devices = settings["split"]["expert_devices"]
print(
    f"3. compute dtype (training.dtype) {paper.training.dtype}; parameters {param_dtypes}: "
    f"{expert_params / 1e9:.2f} B expert parameters / {expert_devices} expert devices × 4 B = "
    f"{4 * expert_params / expert_devices / GB:.2f} GB [computed] = planned parameters of device "
    f"12 {expert_row['parameters'] / GB:.2f} GB; gradient sums {expert_row['gradients'] / GB:.2f} GB, "
    f"AdamW moments {expert_row['optimizer_state'] / GB:.2f} GB: "
    f"{(expert_row['parameters'] + expert_row['gradients'] + expert_row['optimizer_state']) / GB:.2f}"
    f" of its {expert_row['total_bytes'] / GB:.2f} GB"
)
total_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
at_init = [r["phase_totals"]["optimizer init"] / GB for r in rows]
print(
    f"4. optimizer state placed like the parameters at init: right after init device 0 holds "
    f"{at_init[0]:.2f} GB, an expert device {max(at_init):.2f} GB; every AdamW moment of the "
    f"model on one device would be 2 × 4 B × {total_params / 1e9:.2f} B = "
    f"{8 * total_params / GB:.1f} GB [computed]"
)
print(
    f"\nplanned peak: attention devices {min(r['total_bytes'] for r in rows[:12]) / GB:.2f}-"
    f"{max(r['total_bytes'] for r in rows[:12]) / GB:.2f} GB, expert devices "
    f"{max(r['total_bytes'] for r in rows[12:]) / GB:.2f} GB; "
    f"{sum(r['fits'] for r in rows)}/16 fit {CAPACITY_GB} GB"
)

# %% [markdown]
# A step of 1024 sequences runs as 8 rounds of 4 micro-batches of 32 sequences
# (`ma_separation.gradient_accumulation`, `ma_separation.microbatches`): only one round's
# activations are alive, and the sums of the rounds' gradients take the place of the gradients.
# The forward sweep keeps each stage's inputs, not its VJP residuals, and the backward programs
# (`first_recompute`, `middle_recompute`, `experts_recompute`; `_acc` when adding to the sums)
# compute each stage again: their temporaries (up to 17.18 GB on an expert device) are the price.
# The stages compute in bfloat16, while the parameters, gradient sums and AdamW moments stay
# float32: on an expert device those take 34.36 of its 54.23 GB. And the optimizer state is made
# where its parameters live, so no device holds the model's 74.2 GB of AdamW moments after init.
# Every device fits: the attention devices plan 15.83-16.23 GB, the expert devices 54.23 GB.

# %% [markdown]
# ## 3. Which of the seed's §5.4 figures cannot hold

# %%
print(
    f"parameters of the paper model: {total_params / 1e9:.2f} B "
    f"= {4 * total_params / GB:.1f} GB in float32, {2 * total_params / GB:.1f} GB in bfloat16 [computed]"
)
largest = {
    name: max(r["parameters"] for r in plans[(name, "training")]["per_device"]) / GB
    for name in NAMES
}
print(
    "largest parameter bytes on any device, planned:",
    {k: f"{v:.2f} GB" for k, v in largest.items()},
)

checks = [
    (
        "total 123.7 GB fits an 80 GB A100",
        SEED_TOTAL_GB <= CAPACITY_GB,
        f"{SEED_TOTAL_GB} GB > {CAPACITY_GB} GB; paging to host memory does not add HBM",
    ),
    (
        "the parts add up to the total",
        abs(sum(SEED_GB.values()) - SEED_TOTAL_GB) < 0.05,
        f"sum = {sum(SEED_GB.values()):.1f} GB",
    ),
    (
        "85.4% = total / available",
        abs(SEED_TOTAL_GB / SEED_AVAILABLE_GB - SEED_UTILIZATION) < 0.005,
        f"{SEED_TOTAL_GB} / {SEED_AVAILABLE_GB} = {SEED_TOTAL_GB / SEED_AVAILABLE_GB:.3f}; "
        f"85.4% of 124 GB is {SEED_UTILIZATION * SEED_AVAILABLE_GB:.1f} GB, of 80 GB "
        f"{SEED_UTILIZATION * CAPACITY_GB:.1f} GB",
    ),
    (
        "23.1 GB of parameters on a GPU",
        any(abs(v - SEED_GB["model_parameters"]) < 1 for v in largest.values()),
        f"the whole model is {4 * total_params / GB:.1f} GB (float32); 16 × 23.1 GB = "
        f"{16 * 23.1:.0f} GB; no device of any layout holds more than "
        f"{max(largest.values()):.2f} GB",
    ),
    (
        "gradients = parameters, optimizer = 2 × parameters",
        SEED_GB["gradients"] == SEED_GB["model_parameters"]
        and SEED_GB["optimizer_states"] == 2 * SEED_GB["model_parameters"],
        "float32 gradients and AdamW's two float32 moments: consistent, so they inherit the "
        "parameter figure",
    ),
]
for claim, holds, why in checks:
    print(f"[{'holds' if holds else 'CANNOT HOLD'}] {claim}: {why}")
planned_as = {
    "activations": "stage inputs kept, token states, temporaries",
    "communication_buffers": "pieces in transfer",
}
for seed_part, what in planned_as.items():
    planned = [sum(row[p] for p in mapping[seed_part]) / GB for row in (attention_row, expert_row)]
    print(
        f"{seed_part}: seed {SEED_GB[seed_part]} GB; planned ({what}) {planned[0]:.2f} GB on "
        f"attention device 0, {planned[1]:.2f} GB on expert device 12"
    )

# %% [markdown]
# So: the 123.7 GB total cannot be held by an 80 GB card, and the 85.4% "utilisation" follows
# from neither 80 GB nor the 124 GB it names. The parameter figure (and with it the gradient and
# optimizer figures) cannot be a per-GPU figure of this model: 23.1 GB on each of 16 GPUs is
# 370 GB, ten times the whole model's float32 parameters (37.1 GB), and no layout gives it (MA:
# 0.24 GB on an attention device, 8.59 GB on an expert device; TP 4.64, PP 18.54, TP×PP 2.32 GB).
# The seed's 18.7 GB of activations and 12.6 GB of buffers are not impossible as such. With one
# round of 4 micro-batches of 32 sequences alive and the stages recomputed in the backward sweep
# (section 2), the plan's activations are of the same order: 11.88 GB on an attention device,
# 19.33 GB on an expert device. Its pieces in transfer (2.68 and 0.54 GB) are well below the
# seed's 12.6 GB of communication buffers.
#
# ## 4. The four strategies, like for like
#
# The same plan for every strategy, training and decoding (decoding: the config's 1024
# sequences, caches of 2048 positions, a 1024-token prompt; MA prefills the prompts in parts of
# its training micro-batch). In the baselines the forward activations live inside one
# loss-and-gradient program, so they appear as temporaries; they run the whole batch at once,
# without MA's rounds. Every strategy donates its KV caches to the program that returns their
# update, so the caches are held once.

# %%
print(
    f"{'strategy':8s} {'mode':9s} {'min GB':>10s} {'max GB':>10s} {'fit 80 GB':>10s}  peak phases"
)
for (name, mode), plan in plans.items():
    totals = [r["total_bytes"] / GB for r in plan["per_device"]]
    fits = sum(r["fits"] for r in plan["per_device"])
    phases = sorted({r["peak_phase"] for r in plan["per_device"]})
    print(
        f"{name:8s} {mode:9s} {min(totals):10.1f} {max(totals):10.1f} {fits:7d}/16  {', '.join(phases)}"
    )
init = {
    name: [
        r["phase_totals"]["optimizer init"] / r["parameters"]
        for r in plans[(name, "training")]["per_device"]
    ]
    for name in NAMES
}
print("right after init_train_state (optimizer state placed like the parameters):")
for name in NAMES:
    at_init = [
        r["phase_totals"]["optimizer init"] / GB for r in plans[(name, "training")]["per_device"]
    ]
    print(
        f"   {name:8s} device 0 {at_init[0]:6.2f} GB, largest {max(at_init):6.2f} GB; "
        f"held at init = {min(init[name]):.3f}-{max(init[name]):.3f} × the device's parameters "
        "(AdamW moments, and MA's standby copy)"
    )

# %%
modes = ("training", "decoding")
fig, ax = plt.subplots(figsize=(10, 4.5))
width = 0.38
for m, mode in enumerate(modes):
    xs = np.arange(len(NAMES)) + (m - 0.5) * width
    largest_total = [
        max(r["total_bytes"] for r in plans[(name, mode)]["per_device"]) / GB for name in NAMES
    ]
    ax.bar(xs, largest_total, width, label=f"{mode}: largest device")
    for x, name in zip(xs, NAMES, strict=True):
        totals = [r["total_bytes"] / GB for r in plans[(name, mode)]["per_device"]]
        ax.scatter([x] * len(totals), totals, color="black", s=10, zorder=3)
ax.axhline(CAPACITY_GB, color="red", lw=1.5, label="80 GB (A100)")
ax.set_yscale("log")
ax.set_xticks(np.arange(len(NAMES)), NAMES)
ax.set_ylabel("GB at the peak phase (log scale)")
ax.set_title("planned: per-device totals of every strategy, paper config (dots: each device)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Only MA separation fits 80 GB, in training (15.8-54.2 GB) and in decoding (15.6-43.9 GB): the
# baselines hold the activations of the whole batch of 1024 sequences in one program (TP, PP and
# TP×PP plan 1134.4, 795.6 and 1891.2 GB per device in training). Right after
# `init_train_state` the optimizer state is placed like the parameters
# (`maxjax.parallel.runner.optimizer_init`): each device holds the AdamW moments of its own
# parameters, twice their bytes, so it holds three times its parameter bytes (25.77 GB on an
# MA expert device) before the first step's activations. MA's attention devices hold in addition
# the standby copy of their ring predecessor's parameters and both moments (0.71 GB), so MA's
# device 0 holds 1.43 GB right after init, about six times its parameter bytes; the ratio printed
# above counts that copy as well.
#
# ## 5. Keeping the stored plans honest: the tiny config, live
#
# The stored tiny plan was made by
# `python -m maxjax.bench memory --config configs/tiny.yaml --strategy ma --json notebooks/data/memory_plan_tiny_ma.json`.
# Recomputing it here (the stored plan took 12 s on 16 emulated devices on two cores) must give
# the same shape-derived parts byte for byte; the temporaries come from this machine's XLA and
# may differ a little.

# %%
import time  # noqa: E402

from maxjax.perf import memory  # noqa: E402

stored = json.loads((DATA / "memory_plan_tiny_ma.json").read_text())
start = time.perf_counter()
live = memory.plan(load_config("tiny"), "ma", config_name="configs/tiny.yaml").to_json()
print(f"planned live in {time.perf_counter() - start:.0f} s")
worst = 0.0
for old, new in zip(stored["per_device"], live["per_device"], strict=True):
    for part in PARTS:
        if part != "temporaries":
            assert old[part] == new[part], (old["device"], part, old[part], new[part])
    change = abs(new["total_bytes"] / old["total_bytes"] - 1)
    worst = max(worst, change)
print(f"shape-derived parts equal on all 16 devices; largest change of a total: {100 * worst:.2f}%")
assert worst < 0.1
