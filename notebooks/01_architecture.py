# ---
# jupyter:
#   execution:
#     timeout: 900
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
# # 01 · The architecture of MA separation
#
# MoE–Attention separation ("MA separation") runs the attention layers of a Mixture-of-Experts
# transformer on one pool of devices and its experts on another. The seed's deployment uses
# 16 A100s in 4 nodes of 4: nodes 0–2 (12 GPUs) do attention, node 3 (4 GPUs) holds the 16
# experts of every layer, and capacity-bucketed token buffers travel between the pools once each
# way per layer.
#
# This notebook walks through it with the package's own code, on **16 emulated CPU devices**:
#
# 1. the config: the seed's values (`configs/paper.yaml`) beside the CPU-sized twin
#    (`configs/tiny.yaml`);
# 2. the 16-device mesh and its two submeshes, drawn;
# 3. where every parameter lives, measured on the tiny model and computed from shapes at paper
#    scale;
# 4. one routed batch: which experts each token chose, the capacity, what was dropped, and the
#    load on each expert device;
# 5. the MA-separation forward pass equals the single-device reference.
#
# It runs in a minute or two on a 2-core CPU.

# %%
# First: 16 emulated devices, set before JAX starts (restart the kernel to change them).
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} devices")
assert jax.device_count() == 16

# %%
import math  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from maxjax import model  # noqa: E402
from maxjax.config import load_config, with_overrides  # noqa: E402
from maxjax.data import TokenBatches, decode  # noqa: E402
from maxjax.model import ops  # noqa: E402
from maxjax.parallel import STRATEGIES, make_runner  # noqa: E402
from maxjax.parallel.mesh import attention_submesh, expert_submesh, full_mesh  # noqa: E402

print("strategies:", STRATEGIES)

# %% [markdown]
# ## 1. The config: paper vs tiny
#
# `configs/paper.yaml` holds the seed's values exactly; `configs/tiny.yaml` keeps the structure
# (layers, heads, experts, top-k, the 12 + 4 device split, the head distribution and the expert
# mapping) and shrinks the widths, the sequence, the batch and the step counts.
# `tutorials/configs.md` explains every key and its checks.
#
# The notebook uses float32 everywhere (the paper config asks for bfloat16 matmuls on GPUs).

# %%
# A name resolves to configs/<name>.yaml of the repository, from any working directory.
paper = load_config("paper")
tiny = load_config("tiny", ["training.dtype=float32"])

rows = [
    ("model.layers", lambda c: c.model.layers),
    ("model.hidden_dim", lambda c: c.model.hidden_dim),
    ("model.attention_heads", lambda c: c.model.attention_heads),
    ("model.head_dim", lambda c: c.model.head_dim),
    ("moe.experts_per_layer", lambda c: c.moe.experts_per_layer),
    ("moe.expert_hidden_dim", lambda c: c.moe.expert_hidden_dim),
    ("moe.top_k", lambda c: c.moe.top_k),
    ("moe.capacity_factor", lambda c: c.moe.capacity_factor),
    ("sequence.length", lambda c: c.sequence.length),
    ("sequence.batch_size", lambda c: c.sequence.batch_size),
    ("sequence.total_tokens_per_batch", lambda c: c.sequence.total_tokens_per_batch),
    ("capacity per expert and sequence", lambda c: model.group_capacity(c, c.sequence.length)),
    ("training.vocab_size", lambda c: c.training.vocab_size),
    ("training.dtype", lambda c: c.training.dtype),
    ("attention devices", lambda c: f"{c.attention_devices[0]}..{c.attention_devices[-1]}"),
    ("head_distribution", lambda c: list(c.ma_separation.attention.head_distribution)),
    ("expert devices", lambda c: list(c.expert_devices)),
    ("ma_separation.microbatches", lambda c: c.ma_separation.microbatches),
    (
        "communication_compression",
        lambda c: c.ma_separation.synchronization.communication_compression,
    ),
    ("optimizer.learning_rate", lambda c: c.optimizer.learning_rate),
    ("schedule.warmup_steps", lambda c: c.schedule.warmup_steps),
    ("schedule.total_steps", lambda c: c.schedule.total_steps),
]
print(f"{'key':34s} {'paper (seed values)':>38s} {'tiny (CPU-sized)':>38s}")
for name, get in rows:
    print(f"{name:34s} {str(get(paper)):>38s} {str(get(tiny)):>38s}")


def count_params(cfg):
    """Parameter count from the model's abstract shapes (nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model.abstract_params(cfg)))


for name, cfg in [("paper", paper), ("tiny", tiny)]:
    n = count_params(cfg)
    print(f"{name}: {n / 1e6:,.1f} M parameters = {4 * n / 1e9:,.2f} GB in float32 (from shapes)")

# %% [markdown]
# Two numbers of the seed to read carefully:
#
# - **Vocabulary.** GPT-2's tokenizer has **50257** tokens (`<|endoftext|>` is id 50256); the
#   seed's 50265 is the size of the embedding table. The 8 rows above 50256 are never produced by
#   the tokenizer and stay unused.
# - **Capacity.** `ceil(tokens · top_k · capacity_factor / experts)`, per routing group of one
#   sequence: 2048 · 2 · 1.0 / 16 = **256** slots per expert at paper scale, 32 · 2 / 16 = **4**
#   in tiny.

# %% [markdown]
# ## 2. The mesh and its two submeshes
#
# `full_mesh(cfg)` arranges the 16 devices as (node 4, gpu 4) from `nodes.gpu_mapping`.
# `attention_submesh(cfg)` is the 1-D mesh of the 12 attention devices, `expert_submesh(cfg)` the
# 1-D mesh of the 4 expert devices. They are disjoint.

# %%
mesh = full_mesh(tiny)
att_mesh = attention_submesh(tiny)
exp_mesh = expert_submesh(tiny)
index = {d: i for i, d in enumerate(jax.devices())}
print("full mesh", dict(mesh.shape), "\n", np.vectorize(lambda d: index[d])(mesh.devices))
print("attention submesh", dict(att_mesh.shape), [index[d] for d in att_mesh.devices.flat])
print("expert submesh   ", dict(exp_mesh.shape), [index[d] for d in exp_mesh.devices.flat])
assert not set(att_mesh.devices.flat) & set(exp_mesh.devices.flat)

# %%
heads_of = dict(
    zip(tiny.attention_devices, tiny.ma_separation.attention.head_distribution, strict=True)
)
layout = np.vectorize(lambda d: index[d])(mesh.devices)
ATT_COLOR, EXP_COLOR = "#8fb8de", "#f4b183"

fig, ax = plt.subplots(figsize=(9, 6.2))
for node in range(layout.shape[0]):
    for gpu in range(layout.shape[1]):
        d = int(layout[node, gpu])
        x, y = gpu * 1.1, (layout.shape[0] - 1 - node) * 1.25
        if d in heads_of:
            color, label = ATT_COLOR, f"{heads_of[d]} heads"
        else:
            experts = tiny.experts_of_device(d)
            color, label = EXP_COLOR, "experts\n" + ", ".join(map(str, experts))
        ax.add_patch(Rectangle((x, y), 1.0, 1.0, facecolor=color, edgecolor="black"))
        ax.text(x + 0.5, y + 0.68, f"device {d}", ha="center", fontsize=10, weight="bold")
        ax.text(x + 0.5, y + 0.3, label, ha="center", va="center", fontsize=9)
    ax.text(
        -0.15,
        (layout.shape[0] - 1 - node) * 1.25 + 0.5,
        f"node {node}",
        ha="right",
        va="center",
        fontsize=11,
    )
ax.set_xlim(-1.1, 4.5)
ax.set_ylim(-0.2, 5.1)
ax.set_xticks([i * 1.1 + 0.5 for i in range(4)], [f"gpu {i}" for i in range(4)])
ax.set_yticks([])
ax.set_xlabel("GPU index within a node (mesh axis 'gpu')")
ax.set_title(
    "16 devices = 4 nodes × 4 GPUs: attention pool (12) and expert pool (4)\n"
    "heads per attention device from head_distribution, experts from expert_mapping"
)
ax.legend(
    handles=[
        Patch(color=ATT_COLOR, label="attention pool (heads, embedding, norms, router, LM head)"),
        Patch(color=EXP_COLOR, label="expert pool (expert FFNs of all 4 layers)"),
    ],
    loc="upper center",
    bbox_to_anchor=(0.5, -0.08),
    ncol=1,
    frameon=False,
)
for side in ("top", "right", "left"):
    ax.spines[side].set_visible(False)
plt.tight_layout()
plt.show()

# %% [markdown]
# 32 heads do not divide evenly over 12 devices: 8 devices hold 3 heads and 4 hold 2. The
# MA runner pads every attention device to 3 head *slots*; the padded slots are masked, so they
# change neither the output nor any gradient. Every expert device holds 4 experts of every layer.
# Intra-node links are NVLink (600 GB/s); the expert pool is a node of its own, so every token
# buffer between the pools crosses InfiniBand HDR (200 Gb/s = 25 GB/s per link).

# %% [markdown]
# ## 3. Where every parameter lives
#
# `runner.layout_report(params)` reads the bytes each device holds from the arrays' shardings.
# First the tiny model, initialised for real under "single" (all on device 0) and "ma".

# %%
t0 = time.perf_counter()
single = make_runner(tiny, "single")
ma = make_runner(tiny, "ma")
params_single = single.init(0)
params_ma = ma.init(0)
print(f"initialised both in {time.perf_counter() - t0:.1f} s")

report = ma.layout_report(params_ma)
print(report.format())
print("\nleaves on attention device 0:", sorted(set(report.leaves_per_device[0]))[:6], "...")
print("leaves on expert device 12:  ", sorted(set(report.leaves_per_device[12])))
assert all(
    "experts" not in leaf for d in tiny.attention_devices for leaf in report.leaves_per_device[d]
), "an expert weight sits on an attention device"
assert all(
    "experts" in leaf for d in tiny.expert_devices for leaf in report.leaves_per_device[d]
), "something other than experts sits on an expert device"


# %% [markdown]
# At paper scale nothing is allocated: `MARunner.abstract_params()` gives every leaf's shape,
# dtype and sharding, and each device's bytes follow from the shard shapes. (Building the paper
# runner needs only the 16 devices, not the 37.1 GB of its float32 parameters.)


# %%
def bytes_per_device_abstract(abstract_tree):
    """Bytes each device would hold, from ShapeDtypeStructs with shardings (nothing allocated)."""
    out = np.zeros(jax.device_count())
    for leaf in jax.tree.leaves(abstract_tree):
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for device in leaf.sharding.device_set:
            out[index[device]] += shard
    return out


ma_paper = make_runner(paper, "ma")
paper_bytes = bytes_per_device_abstract(ma_paper.abstract_params())
tiny_bytes = np.array([report.bytes_per_device.get(d, 0) for d in range(16)])
# Cross-check the abstract computation against the real arrays of the tiny model.
assert np.allclose(bytes_per_device_abstract(ma.abstract_params()), tiny_bytes)

devices = np.arange(16)
colors = [ATT_COLOR if d in heads_of else EXP_COLOR for d in devices]
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for ax, values, unit, scale, title in [
    (axes[0], tiny_bytes, "MiB", 2**20, "tiny config, 'ma' (measured from the arrays)"),
    (axes[1], paper_bytes, "GB", 1e9, "paper config, 'ma' (computed from shapes)"),
]:
    ax.bar(devices, values / scale, color=colors, edgecolor="black")
    ax.set_xticks(devices)
    ax.set_xlabel("device")
    ax.set_ylabel(f"parameter bytes per device ({unit}, float32)")
    ax.set_title(title)
axes[0].legend(
    handles=[
        Patch(color=ATT_COLOR, label="attention pool"),
        Patch(color=EXP_COLOR, label="expert pool"),
    ]
)
plt.tight_layout()
plt.show()

print(
    f"paper, computed from shapes: {paper_bytes[0] / 1e9:.2f} GB of parameters per attention "
    f"device, {paper_bytes[12] / 1e9:.2f} GB per expert device "
    f"({paper_bytes.sum() / 1e9:.1f} GB in all, float32)."
)
print(
    f"  the expert pool holds {paper_bytes[12:].sum() / paper_bytes.sum():.1%} of the parameter bytes"
)
print(
    f"  x4 with gradients and AdamW's two moments: {4 * paper_bytes[12] / 1e9:.1f} GB per "
    "expert device (computed from shapes)"
)
print("seed (5.4): model_parameters 23.1 GB, gradients 23.1 GB, optimizer_states 46.2 GB per GPU")

# %% [markdown]
# The expert pool holds almost all the bytes: the experts are 16 × 2 × 4096 × 16384 weights per
# layer, over 90% of the model (the share is printed above). Under MA separation each expert device carries a quarter of them
# (8.6 GB of float32 weights at paper scale), each attention device about 0.24 GB.
#
# **The seed's memory table does not add up.** Its section 5.4 lists, per GPU, 23.1 GB of
# parameters, 18.7 GB of activations, 23.1 GB of gradients, 46.2 GB of optimizer state and 12.6 GB
# of communication buffers: **123.7 GB on an 80 GB GPU**. It reconciles this as
# "80 GB × 1.55 = 124 GB with paging" and reports 85.4% memory efficiency. No layout of this
# model gives 23.1 GB of parameters on every GPU; we do not copy those numbers, we compute ours
# from the shapes, as above.

# %% [markdown]
# ## 4. One routed batch
#
# Routing works per *group* of one sequence. The router maps each token's hidden vector to 16
# logits; each token picks its top 2 experts, with gate weights = softmax over those two logits.
# Every expert has `capacity` slots per sequence; first choices fill slots before second choices,
# earlier tokens first. An assignment past capacity is **dropped**; a token whose assignments are
# all dropped passes through the residual unchanged.
#
# Below: the first validation batch of the embedded corpus, through layer 0 of the freshly
# initialised tiny model, using the model's own modules and `ops.route`.

# %%
batch = next(iter(TokenBatches(tiny, "validation")))  # int32 [8, 32]
tokens = jnp.asarray(batch[:, :-1])  # what the model sees in training: [8, 31]
print("sequence 0:", repr(decode(batch[0].tolist())[:120]))

net = model.bind(tiny, params_single)  # the single-device model as NNX modules
layer0 = net.layers[0]
positions = jnp.arange(tokens.shape[1])
x = net.embed.embedding[...][tokens]
h = x + layer0.attention(layer0.attention_norm(x), positions)
capacity = model.group_capacity(tiny, tokens.shape[1])
r = ops.route(layer0.moe_norm(h), layer0.moe.router.kernel[...], tiny.moe.top_k, capacity)
aux = ops.routing_aux(r)

E = tiny.moe.experts_per_layer
expert_index, gates, keep = (np.asarray(a) for a in (r.expert_index, r.gates, r.keep))
print(
    f"tokens per sequence {tokens.shape[1]}, top_k {tiny.moe.top_k}, experts {E} -> "
    f"capacity ceil({tokens.shape[1]}*2*1.0/{E}) = {capacity} slots per expert and sequence"
)
print(
    f"assignments dropped: {int((~keep).sum())} of {keep.size} "
    f"({float(aux.dropped_fraction):.1%}); tokens with every assignment dropped: "
    f"{int((~keep).all(axis=-1).sum())} of {keep.shape[0] * keep.shape[1]}"
)
print(
    f"load-balancing loss {float(aux.load_balancing_loss):.3f} (1.0 = balanced), "
    f"router z-loss {float(aux.router_z_loss):.5f}"
)

# %%
seq = 0
chosen = np.zeros((tokens.shape[1], E))
for t in range(tokens.shape[1]):
    for j in range(tiny.moe.top_k):
        chosen[t, expert_index[seq, t, j]] = gates[seq, t, j]
counts = np.bincount(expert_index[seq].reshape(-1), minlength=E)
kept_counts = np.bincount(expert_index[seq][keep[seq]], minlength=E)

fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.2, 1]})
im = axes[0].imshow(chosen, aspect="auto", cmap="viridis", interpolation="nearest")
dropped_t, dropped_j = np.nonzero(~keep[seq])
axes[0].scatter(
    expert_index[seq][dropped_t, dropped_j],
    dropped_t,
    marker="x",
    color="red",
    s=40,
    label="dropped (past capacity)",
)
axes[0].set_xlabel("expert")
axes[0].set_ylabel("token position in sequence 0")
axes[0].set_xticks(range(E))
axes[0].set_title("top-2 choices of each token (colour = gate weight)")
axes[0].legend(loc="upper right", fontsize=8)
fig.colorbar(im, ax=axes[0], label="gate weight (0 = not chosen)")

axes[1].bar(range(E), kept_counts, color="tab:blue", label="kept")
axes[1].bar(range(E), counts - kept_counts, bottom=kept_counts, color="tab:red", label="dropped")
axes[1].axhline(capacity, color="black", ls="--", label=f"capacity = {capacity}")
axes[1].set_xlabel("expert")
axes[1].set_ylabel("assignments in sequence 0 (tokens)")
axes[1].set_xticks(range(E))
axes[1].set_title("assignments per expert, sequence 0")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# What each expert device receives is the capacity buffer of its 4 experts: `[4 experts,
# sequences, capacity, hidden]`, whatever the tokens chose. The *useful* load is the number of
# kept assignments in it; the rest of the buffer is zero padding.

# %%
kept_per_expert = np.bincount(expert_index[keep], minlength=E)
all_per_expert = np.bincount(expert_index.reshape(-1), minlength=E)
slots_per_device = tiny.ma_separation.moe.experts_per_gpu * capacity * tokens.shape[0]
names, kept_dev, all_dev = [], [], []
for d in tiny.expert_devices:
    experts = list(tiny.experts_of_device(d))
    names.append(f"device {d}\nexperts {experts[0]}–{experts[-1]}")
    kept_dev.append(kept_per_expert[experts].sum())
    all_dev.append(all_per_expert[experts].sum())
    print(
        f"expert device {d} (experts {experts}): {all_dev[-1]} assignments chosen, "
        f"{kept_dev[-1]} kept, in {slots_per_device} buffer slots "
        f"({kept_dev[-1] / slots_per_device:.0%} full)"
    )

fig, ax = plt.subplots(figsize=(8, 4))
ax.bar(names, kept_dev, color=EXP_COLOR, edgecolor="black", label="kept assignments")
ax.bar(
    names,
    np.array(all_dev) - np.array(kept_dev),
    bottom=kept_dev,
    color="tab:red",
    alpha=0.6,
    label="dropped assignments",
)
ax.axhline(slots_per_device, color="black", ls="--", label="buffer slots per device")
ax.set_ylabel("token assignments in the batch (8 sequences)")
ax.set_xlabel("expert device")
ax.set_title("load per expert device, layer 0 of the initial tiny model")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# With capacity factor 1.0 there are exactly as many slots as assignments on average, so any
# imbalance drops assignments. At initialisation the router is untrained and uneven, so a large
# share is dropped (printed above); the load-balancing loss is above its balanced value of 1. The load-balancing loss pushes the router towards equal use; the
# seed's balancer also moves experts between expert devices when the predicted times differ by
# more than 5%.
#
# The tokens cross between the pools as this buffer, once each way per layer.
# `MARunner.transfer_bytes` gives the bytes from shapes and dtypes; with
# `communication_compression: 8-bit quantization` each token row travels as int8 plus one float32
# scale.


# %%
def human(nbytes):
    for unit, size in [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)]:
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes} B"


for name, cfg, runner in [("tiny", tiny, ma), ("paper", paper, ma_paper)]:
    # Training feeds length - 1 positions per sequence (inputs tokens[:, :-1]).
    tb = runner.transfer_bytes(cfg.sequence.batch_size, cfg.sequence.length - 1)
    print(
        f"{name:5s} buffer [E, B, C, M] = {tb['buffer_shape']} per layer and step, computed "
        f"from shapes: {human(tb['attention_to_experts'])} attention -> experts as int8 + scales, "
        f"{human(tb['uncompressed_each_way'])} as float32; the same again back"
    )
print("seed (5.3): moe_communication 16.8 GB per layer (all-to-all), attention all-reduce 16.8 GB")

# %% [markdown]
# ## 5. MA separation computes the same function as the single-device model
#
# Both runners start from the same parameter values (`init(0)`; the MA layout pads the heads and
# the vocabulary and permutes the experts, `to_canonical` undoes it). With compression switched
# off, the logits must match the single-device reference up to float32 rounding. With 8-bit
# compression they differ by the quantisation of the buffers, which we measure too.

# %%
exact = with_overrides(tiny, ["ma_separation.synchronization.communication_compression=none"])
ma_exact = make_runner(exact, "ma")

# The same values in both layouts.
canonical = ma.gather(params_ma)
reference = jax.device_get(params_single)
worst = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(canonical), jax.tree.leaves(reference), strict=True)
)
print(f"parameters: max |ma - single| = {worst:.3g}")
assert worst == 0.0

t0 = time.perf_counter()
logits_single = np.asarray(single.forward(params_single, tokens))
logits_exact = np.asarray(ma_exact.forward(params_ma, tokens))
logits_int8 = np.asarray(ma.forward(params_ma, tokens))
print(
    f"three forward passes (with compilation) in {time.perf_counter() - t0:.1f} s; "
    f"logits {logits_single.shape}"
)


def compare(name, got, want):
    """Print max abs diff, max abs diff relative to the largest |logit|, and normwise error."""
    diff = np.abs(got - want)
    rel = diff.max() / np.abs(want).max()
    norm = np.linalg.norm(got - want) / np.linalg.norm(want)
    agree = np.mean(got.argmax(-1) == want.argmax(-1))
    print(
        f"{name:24s} max |diff| {diff.max():.2e}   max |diff| / max |logit| {rel:.2e}   "
        f"||diff|| / ||logits|| {norm:.2e}   same argmax {agree:.1%}"
    )
    return diff.max(), rel, norm


abs_exact, rel_exact, _ = compare("ma, no compression", logits_exact, logits_single)
abs_int8, rel_int8, norm_int8 = compare("ma, 8-bit compression", logits_int8, logits_single)
np.testing.assert_allclose(logits_exact, logits_single, atol=1e-4, rtol=1e-4)
assert rel_exact < 1e-5, rel_exact
assert norm_int8 < 0.2, norm_int8  # measured: about 0.07

# %% [markdown]
# The uncompressed MA forward pass matches the reference to float32 rounding: the padded head
# slots, the vocabulary-split embedding and LM head, the expert permutation and the transport
# between the pools change where the work runs, not what is computed. The tests in `tests/` check
# the same parity for the loss and every gradient, for every strategy.
#
# Int8 compression is a different function. Each buffer element moves by at most half a
# quantisation step (`max|row| / 254`), but the error does not stay that small: the next layer's
# router sees slightly different inputs, a token whose 2nd and 3rd logits were nearly tied may
# pick another expert, and that shifts the capacity slots of the tokens after it, so a few tokens
# get different experts or get dropped. That is why the compressed logits differ by a few percent
# (normwise) and the most likely next token changes at some positions, printed above. Training
# uses the compressed forward with a straight-through gradient; whether it costs accuracy is a
# question for a real training run, not for this check.
#
# Next: `02_training` trains this model through `python -m maxjax.train`'s code path.
