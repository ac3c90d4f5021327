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
# # 06 · Projection to 16 A100s, and an audit of the seed's numbers
#
# No GPU cluster is at hand, and CPU emulation shows work and overhead, not parallel speed
# (notebook 03). This notebook uses the package's performance model, `maxjax.perf`:
#
# 1. every device's stage programs (attention of its heads over a micro-batch, routing and
#    dispatch, the FFNs of the experts it holds, the LM-head shard, AdamW), built from the
#    model's own math at the real per-device shapes and compiled ahead of time for their
#    `cost_analysis` (flops, bytes) and `memory_analysis`;
# 2. a roofline per program against a hardware spec (`configs/hardware/a100-80gb.yaml`: every
#    figure cites its source or says it is an assumption);
# 3. a discrete-event simulation of the schedule: MA ping-pong of micro-batches between the
#    pools, transfers over NVLink or InfiniBand, the baselines' all-reduces and pipeline sends,
#    the GPipe bubble.
#
# The paper-scale projection takes minutes, so it is cached in `notebooks/data/` by the command
# stored inside it; only cheap parts are recomputed here. **Every number below is labelled:
# projected (the model), measured here (CPU), or the seed's value.**

# %%
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402

data_path = Path("data/projection_paper_a100.json")
if not data_path.exists():
    data_path = Path("notebooks") / data_path
proj = json.loads(data_path.read_text())
rows = {r["strategy"]: r for r in proj["strategies"]}
names = list(rows)
hw = proj["hardware"]
print("cached projection made by:", proj["command"])
print(
    f"hardware: {hw['name']}, {hw['nics_per_node']} NIC(s) per node; "
    f"decoding at {proj['decode_sequences']} sequences, context {proj['context']}"
)

# %% [markdown]
# ## Where the FLOPs are
#
# Recomputed live from single-sequence forward programs of the paper config (cheap compiles).

# %%
from maxjax.bench.project import flop_shares  # noqa: E402
from maxjax.config import load_config  # noqa: E402
from maxjax.perf.programs import Shapes  # noqa: E402

shares = flop_shares(Shapes.of(load_config("paper")))
print(
    f"expert share of a forward pass's FLOPs: {100 * shares['expert_share']:.1f}% "
    f"(of a decoder layer's: {100 * shares['expert_share_of_layer']:.1f}%), "
    f"expert share of the parameters: {100 * shares['expert_param_share']:.1f}%  [computed]"
)
assert abs(shares["expert_share"] - proj["flops"]["expert_share"]) < 1e-9

# %% [markdown]
# With 16 experts per layer on 4 of 16 devices, the seed's split gives a quarter of the devices
# most of the arithmetic: the expert pool is the projected bottleneck.
#
# ## Projected Table 1 and the strategies side by side

# %%
from maxjax.bench.project import SEED_TABLE1  # noqa: E402

fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
axes[0].bar(names, [rows[n]["train_tokens_per_s"] for n in names], color="tab:blue")
axes[0].set_title("training tokens/s (projected)")
axes[1].bar(names, [rows[n]["tpot_ms"] for n in names], color="tab:orange", label="projected")
axes[1].scatter(
    names, [SEED_TABLE1[n]["tpot_ms"] for n in names], color="k", zorder=3, label="seed"
)
axes[1].set_title("TPOT ms (decoding)")
axes[1].legend()
axes[2].bar(
    names, [100 * rows[n]["busy_mean"] for n in names], color="tab:green", label="projected"
)
axes[2].scatter(names, [SEED_TABLE1[n]["util"] for n in names], color="k", zorder=3, label="seed")
axes[2].set_title("device busy % (training)")
axes[2].legend()
plt.tight_layout()
plt.show()
for n in names:
    r = rows[n]
    print(
        f"{n:6s} train {r['train_tokens_per_s']:9.0f} tok/s  TPOT {r['tpot_ms']:7.2f} ms  "
        f"memory {r['memory_bytes_max'] / 1e9:6.1f} GB/device  "
        f"energy {r['energy_mj_per_token']:.3f} mJ/training token  [projected]"
    )

# %% [markdown]
# ## Busy time per pool, and one layer's ping-pong
#
# Busy = time a device spends running programs / step time, averaged over the pool.

# %%
fig, ax = plt.subplots(figsize=(8, 3))
labels, values = [], []
for n in names:
    for pool, v in rows[n]["busy"].items():
        labels.append(f"{n}\n{pool}")
        values.append(100 * v)
ax.bar(labels, values, color="tab:purple")
ax.set_ylabel("% of step (projected)")
plt.tight_layout()
plt.show()

# %%
tl = rows["ma"]["timeline"]
lanes = sorted(
    {r for t in tl for r in t["resources"]},
    key=lambda r: (r.split(":")[0], int(r.split(":")[-1]) if r.split(":")[-1].isdigit() else 0),
)
colors = {
    "compute": "tab:blue",
    "attention": "tab:orange",
    "moe_transfer": "tab:red",
    "embedding": "tab:gray",
    "head": "tab:gray",
}
fig, ax = plt.subplots(figsize=(12, 0.28 * len(lanes) + 1))
for t in tl:
    for r in t["resources"]:
        ax.barh(
            lanes.index(r),
            t["end"] - t["start"],
            left=t["start"],
            color=colors.get(t["kind"], "tab:green"),
            edgecolor="white",
            linewidth=0.3,
        )
ax.set_yticks(range(len(lanes)))
ax.set_yticklabels(lanes, fontsize=7)
ax.set_xlabel("seconds (projected); blue compute, orange attention collectives, red pool crossings")
ax.set_title("MA, seed layout: the first layer's forward, every micro-batch")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The audit: every number of Table 1 and §5.2-§5.8
#
# Verdicts come from rules evaluated below, not typed in: *consistent* when our figure is within
# a factor of 1.5 of the seed's, *inconsistent* otherwise, *physically implausible* when the
# seed's figure breaks a physical bound (memory above the card's, energy below the idle floor,
# work above peak), *not measurable* when nothing here can produce it.

# %%
from maxjax.bench.project import (  # noqa: E402
    SEED_COMM_SHARE,
    SEED_ENERGY_MJ_PER_TOKEN,
    SEED_TPOT_BY_CONTEXT,
)

devices = rows["ma"]["devices"]
capacity_gb = hw["memory_capacity_bytes"] / 1e9
idle_floor_mj = {n: 1e3 * devices * hw["idle_w"] / rows[n]["decode_tokens_per_s"] for n in names}
audit = []


def compare(item, seed, ours, source="projected", unit=""):
    if ours is None:
        audit.append((item, seed, "-", "not measurable", source))
        return
    ratio = max(seed, ours) / max(min(seed, ours), 1e-12)
    verdict = "consistent" if ratio <= 1.5 else "inconsistent"
    audit.append((item, seed, f"{ours:.4g}{unit}", verdict, f"{source}; ratio {ratio:.2f}"))


def implausible(item, seed, ours, reason):
    audit.append((item, seed, ours, "physically implausible", reason))


table_keys = [
    ("tpot_ms", "TPOT ms", lambda r: r["tpot_ms"]),
    ("tps", "TPS tok/s/GPU", lambda r: r["tps_per_device"]),
    ("throughput", "throughput tok/s", lambda r: r["decode_tokens_per_s"]),
    ("util", "GPU utilisation %", lambda r: 100 * r["busy_mean"]),
]
for n in names:
    for key, label, ours in table_keys:
        compare(f"T1 {label} {n}", SEED_TABLE1[n][key], ours(rows[n]))
    seed_mem = SEED_TABLE1[n]["mem_eff"]
    compare(
        f"T1 memory efficiency % {n}",
        seed_mem,
        100 * rows[n]["memory_efficiency"],
        "projected (CPU-compiled temp sizes: an upper estimate)",
    )
    ratio = SEED_TABLE1[n]["throughput"] / SEED_TABLE1[n]["tps"]
    audit.append(
        (
            f"T1 throughput/TPS {n}",
            f"{ratio:.2f}",
            "-",
            "consistent" if abs(ratio - devices) < 0.05 else "inconsistent",
            "throughput is exactly 16 x TPS: derived, not a second measurement",
        )
    )
seed_impr = {"TPOT": (2.76 - 1.82) / 2.76, "TPS": 13289 / 8696 - 1}
ours_impr = {
    "TPOT": (rows["tp_pp"]["tpot_ms"] - rows["ma"]["tpot_ms"]) / rows["tp_pp"]["tpot_ms"],
    "TPS": rows["ma"]["decode_tokens_per_s"] / rows["tp_pp"]["decode_tokens_per_s"] - 1,
}
for key, seed_v in zip(("TPOT", "TPS"), (34.2, 52.8), strict=True):
    audit.append(
        (
            f"T1 improvement {key} % (vs TP+PP)",
            seed_v,
            f"{100 * ours_impr[key]:.1f}",
            "consistent"
            if (ours_impr[key] > 0) == (seed_v > 0)
            and abs(100 * ours_impr[key] - seed_v) < 0.5 * abs(seed_v)
            else "inconsistent",
            f"seed's own arithmetic gives {100 * seed_impr[key]:.1f}%; projected",
        )
    )
for label, seed_v in (("GPU utilisation", 25.9), ("memory efficiency", 15.2)):
    audit.append(
        (
            f"T1 improvement {label} %",
            seed_v,
            "-",
            "not measurable",
            "relative to an unstated baseline column",
        )
    )

# §5.2
sc = {r["gpus"]: r for r in proj.get("scaling", [])}
if 16 in sc:
    compare("5.2 speedup at 16 GPUs (MA/TP+PP)", 1.528, sc[16]["ma_speedup_over_tp_pp"])
    compare(
        "5.2 scaling efficiency at 16",
        0.87,
        sc[16]["ma_efficiency_vs_first"],
        "projected; per-GPU tokens/s at 16 vs 8",
    )
    even = [g for g, r in sc.items() if r["ma_speedup_over_tp_pp"] >= 1.0]
    audit.append(
        (
            "5.2 break-even point (GPUs)",
            8,
            str(min(even)) if even else "none",
            "consistent" if even and min(even) == 8 else "inconsistent",
            "projected: fewest GPUs where MA beats TP+PP",
        )
    )
    audit.append(
        (
            "5.2 linear scaling limit (GPUs)",
            16,
            "-",
            "not measurable",
            "undefined in the seed; see the scaling rows printed by the command",
        )
    )
    audit.append(
        (
            "5.2 >20 GPUs communication dominates",
            "claim",
            "-",
            "not measurable",
            "no communication share at >20 GPUs is given to compare",
        )
    )
# §5.3
ma_comm = rows["ma"]["communication"]
compare(
    "5.3 total communication % of time",
    SEED_COMM_SHARE["total"],
    100 * rows["ma"]["communication_time_share"],
    "projected (wall time with any transfer)",
)
compare(
    "5.3 attention all-reduce %",
    SEED_COMM_SHARE["attention_all_reduce"],
    100 * ma_comm.get("attention", {}).get("time_share", 0.0),
    "projected: MA's AG/RS",
)
compare(
    "5.3 MoE all-to-all %",
    SEED_COMM_SHARE["moe_all_to_all"],
    100 * ma_comm.get("moe_transfer", {}).get("time_share", 0.0),
    "projected: pool crossings",
)
compare(
    "5.3 gradient sync %",
    SEED_COMM_SHARE["gradient_sync"],
    100 * ma_comm.get("gradient_sync", {}).get("time_share", 0.0),
    "projected",
)
audit.append(
    (
        "5.3 parameter broadcast %",
        1.3,
        "-",
        "not measurable",
        "no parameter broadcast happens in a training step",
    )
)
for key, label in (("attention", "attention"), ("moe_transfer", "MoE")):
    gb = ma_comm.get(key, {}).get("bytes_per_layer", 0.0) / 1e9
    compare(f"5.3 {label} GB per layer", 16.8, gb, "computed from shapes (whole step, all devices)")
compare(
    "5.3 total GB per layer",
    33.6,
    sum(v["bytes_per_layer"] for v in ma_comm.values()) / 1e9,
    "computed from shapes",
)
# §5.4
mem = rows["ma"]["memory_per_device"]
worst = max(mem.values(), key=lambda v: v["state_bytes"])
for label, seed_v, ours in (
    ("parameters", 23.1, worst["state_bytes"] / 4e9),
    ("gradients", 23.1, worst["state_bytes"] / 4e9),
    ("optimizer states", 46.2, worst["state_bytes"] / 2e9),
    ("activations", 18.7, worst["activation_bytes"] / 1e9),
):
    source = "projected estimate" if label == "activations" else "computed (float32, AdamW)"
    compare(f"5.4 {label} GB per GPU", seed_v, ours, source + "; expert device")
audit.append(
    (
        "5.4 communication buffers GB",
        12.6,
        "-",
        "not measurable",
        "buffer lifetime depends on the runtime's allocator",
    )
)
implausible(
    "5.4 total GB per GPU",
    123.7,
    f"{worst['total_bytes'] / 1e9:.1f}",
    f"exceeds the {capacity_gb:.0f} GB card; GPUs do not page HBM to 124 GB",
)
implausible(
    "5.4 utilisation ratio",
    0.854,
    "-",
    "123.7/124 is a ratio over a capacity the card does not have",
)
# §5.5
for label, seed_v in (
    ("expert utilisation std", 0.023),
    ("min usage %", 5.8),
    ("max usage %", 8.9),
    ("load balancing loss", 0.0082),
    ("active experts %", 94.2),
    ("routing balance", 0.994),
):
    audit.append(
        (
            f"5.5 {label}",
            seed_v,
            "-",
            "not measurable",
            "needs the seed's trained router on C4 (training statistics, not speed)",
        )
    )
audit.append(
    (
        "5.5 min/max usage brackets 1/16",
        "5.8-8.9",
        f"{100 / 16:.2f}",
        "consistent" if 5.8 <= 100 / 16 <= 8.9 else "inconsistent",
        "computed: the mean share of 16 experts must lie between min and max",
    )
)
# §5.7
for ctx, seed_v in SEED_TPOT_BY_CONTEXT.items():
    compare(f"5.7 TPOT ms at context {ctx}", seed_v, rows["ma"]["tpot_ms_by_context"].get(str(ctx)))
# §5.8
for n, seed_v in (
    ("ma", SEED_ENERGY_MJ_PER_TOKEN["ma"]),
    ("tp_pp", SEED_ENERGY_MJ_PER_TOKEN["baseline"]),
):
    floor = 1e3 * devices * hw["idle_w"] / (SEED_TABLE1[n]["throughput"])
    if seed_v < floor:
        implausible(
            f"5.8 energy mJ/token {n}",
            seed_v,
            f"{rows[n]['decode_energy_mj_per_token']:.3g}",
            f"below idle power alone at the seed's own throughput: {floor:.2f} mJ/token",
        )
    else:
        compare(f"5.8 energy mJ/token {n}", seed_v, rows[n]["decode_energy_mj_per_token"])
for label, seed_v in (("improvement %", 33.9), ("PUE", 1.08), ("carbon reduction %", 34.2)):
    audit.append(
        (
            f"5.8 {label}",
            seed_v,
            "-",
            "not measurable",
            "facility figures; no data-centre metering here",
        )
    )

print(f"{'item':44s} {'seed':>10s} {'ours':>12s}  {'verdict':24s} reason")
for item, seed_v, ours, verdict, why in audit:
    print(f"{item:44s} {str(seed_v):>10s} {str(ours):>12s}  {verdict:24s} {why}")
counts = {
    v: sum(1 for a in audit if a[3] == v)
    for v in ("consistent", "inconsistent", "physically implausible", "not measurable")
}
print(counts)

# %% [markdown]
# ## What the projection rests on
#
# - Program costs are XLA's `cost_analysis` of programs compiled **for the CPU** at the paper's
#   per-device shapes: flops are exact for the model's math; bytes and temporary memory follow
#   the CPU compiler's fusion, which is coarser than a GPU's, so memory figures are upper
#   estimates.
# - Efficiency factors per kind of program (matmul 86% of peak from a measured A100 GEMM;
#   attention, token gathers, memory and links are stated assumptions in the spec).
# - The cluster has the NICs the spec says (`nics_per_node`); `--nics 4` reruns the command
#   with four per node.
# - The model was checked against measured CPU steps: `python -m maxjax.bench project
#   --validate` prints predicted vs measured times of `single` and `ma` on the tiny config;
#   `--measure-gpu` does the same against one GPU when one is available.
