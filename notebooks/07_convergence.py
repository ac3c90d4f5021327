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
# # 07 · Convergence: MA separation against the single-device model and the TP × PP baseline
#
# Seed §6 reports a validation perplexity of **12.8** for MA separation against **13.4** for
# the baseline, "**23% faster convergence**" and "**10 independent runs, p < 0.001**".
#
# maxjax can say something sharper than a p-value. MA separation computes *the same function*
# as the single-device model: the parity tests (`tests/test_ma.py`) check logits, losses,
# gradients, dropout masks and a whole AdamW step against the single-device runner; TP × PP
# passes the same checks (`tests/test_baselines.py`). So, from the same seed (same initial
# parameters, same data order, same dropout keys), the three learn identically up to the order of
# floating-point sums, and a difference in convergence can only come from what MA changes on
# purpose: the **int8 compression** of the buffers between the attention and the expert pools.
#
# `python -m maxjax.bench convergence` (`maxjax/bench/convergence.py`) trains four variants
# from the same seeds: `single`, `ma_float32` (MA, compression off), `ma_int8` (MA with the
# seed's 8-bit quantisation) and `tp_pp` (the seed's baseline), and compares them. This notebook
# calls the same function the command calls, `convergence(...)`, on a small instance, then loads a
# larger run made by the command on this machine (if its JSON is in `notebooks/data/`).

# %%
# First: 16 emulated devices, set before JAX starts (restart the kernel to change them).
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} devices")
assert jax.device_count() == 16

# %%
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maxjax.bench.convergence import SEED_SECTION_6, convergence, report_lines  # noqa: E402
from maxjax.evaluate import quiet_libraries  # noqa: E402

quiet_libraries()

# %% [markdown]
# ## 1. A small instance: 4 variants × 3 seeds
#
# The tiny config shrunk so that the run fits a CI job on two CPU cores: 2 layers instead of 4
# (the TP x PP baseline needs a layer count its 2 pipeline stages divide),
# 4 sequences per batch, one micro-batch per MA step (fewer programs to compile; the function is
# the same), 12 steps (3 of warmup), validation every 4 steps on 2 batches. Each variant's runner
# is compiled once and reused for the three seeds; compilation is most of the time. The
# equivalent command line is
#
# ```bash
# python -m maxjax.bench convergence --config tiny --steps 12 --seeds 3 \
#     --set model.layers=2 --set ma_separation.microbatches=1 \
#     --set sequence.batch_size=4 --set sequence.total_tokens_per_batch=128 \
#     --set schedule.total_steps=12 --set schedule.warmup_steps=3 \
#     --set training.validation_interval=4 --set training.validation_batches=2
# ```

# %%
STEPS = 12
SEEDS = 3
overrides = [
    "model.layers=2",
    "ma_separation.microbatches=1",
    "sequence.batch_size=4",
    "sequence.total_tokens_per_batch=128",
    f"schedule.total_steps={STEPS}",
    "schedule.warmup_steps=3",
    "training.validation_interval=4",
    "training.validation_batches=2",
]
start = time.perf_counter()
small = convergence("tiny", overrides, steps=STEPS, seeds=SEEDS, progress=False)
small_seconds = time.perf_counter() - start
print("\n".join(report_lines(small, small["summary"])))
print(f"\nwall time {small_seconds:.0f} s (measured here, compilation included)")

# %% [markdown]
# ## 2. Curves
#
# Left: training loss per step, the mean over seeds as a line and the band from the lowest to the
# highest seed. Middle: validation perplexity at each validation step (mean and min–max band).
# Right: the per-step relative difference of each variant's training loss from `single` for the
# same seed (the largest over seeds), on a log scale: this is where the parity result shows.

# %%
COLOURS = {"single": "black", "ma_float32": "tab:blue", "ma_int8": "tab:red", "tp_pp": "tab:green"}
STYLES = {"single": "-", "ma_float32": "--", "ma_int8": "-", "tp_pp": ":"}


def plot_result(result: dict, title: str) -> None:
    """Loss, validation perplexity and relative difference from single, for every variant."""
    fig, (loss_ax, ppl_ax, diff_ax) = plt.subplots(1, 3, figsize=(16, 4.2))
    reference = result["variants"]["single"]["runs"]
    for name, variant in result["variants"].items():
        runs = variant["runs"]
        style = {"color": COLOURS.get(name), "linestyle": STYLES.get(name, "-"), "label": name}
        losses = np.array([r["train_loss"] for r in runs])
        steps = np.arange(1, losses.shape[1] + 1)
        loss_ax.plot(steps, losses.mean(0), **style)
        loss_ax.fill_between(steps, losses.min(0), losses.max(0), color=style["color"], alpha=0.12)
        ppl = np.array([r["val_perplexity"] for r in runs])
        val_steps = runs[0]["val_steps"]
        ppl_ax.plot(val_steps, ppl.mean(0), marker="o", **style)
        ppl_ax.fill_between(val_steps, ppl.min(0), ppl.max(0), color=style["color"], alpha=0.12)
        if name != "single":
            rel = np.abs(losses - np.array([r["train_loss"] for r in reference]))
            rel = (rel / np.array([r["train_loss"] for r in reference])).max(0)
            diff_ax.semilogy(steps, np.maximum(rel, 1e-9), **style)
    diff_ax.axhline(np.finfo(np.float32).eps, color="grey", linewidth=0.8)
    diff_ax.annotate("float32 eps", (1, np.finfo(np.float32).eps * 1.3), color="grey")
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss (band: seeds)")
    ppl_ax.set(xlabel="step", ylabel="validation perplexity", yscale="log")
    ppl_ax.set_title("validation perplexity (band: seeds)")
    diff_ax.set(xlabel="step", ylabel="|loss - loss_single| / loss_single", ylim=(1e-9, 1))
    diff_ax.set_title("difference from single, same seed")
    loss_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    plt.show()


plot_result(small, f"small instance, measured here on CPU: {STEPS} steps, {SEEDS} seeds")

# %% [markdown]
# ## 3. A larger run, made by the same command on this machine
#
# `notebooks/data/convergence_*.json` holds the output of `python -m maxjax.bench convergence`,
# with the exact command inside. It is loaded and plotted if present; nothing here recomputes it.

# %%
data_dir = next((p for p in (Path("data"), Path("notebooks/data")) if p.is_dir()), None)
stored = sorted(data_dir.glob("convergence_*.json")) if data_dir else []
larger = json.loads(stored[-1].read_text()) if stored else None
if larger is None:
    print("no stored run in notebooks/data/ (make one with the command in its docstring)")
else:
    print(f"{stored[-1].name}, made with:\n  {larger['command']}")
    print(f"wall time {larger['wall_seconds'] / 60:.1f} min (measured here)\n")
    print("\n".join(report_lines(larger, larger["summary"])))
    plot_result(larger, f"stored run: {larger['steps']} steps, seeds {larger['seeds']}")

# %% [markdown]
# ### Where the float32 runs part
#
# For each seed: the largest relative loss difference from `single` over the first steps, and the
# first step at which it exceeds 10⁻⁴ ("-": never). Float32 rounding alone is ~10⁻⁷; a jump
# from there to 10⁻⁴ within one step is a discrete event, a token whose top-2 choice or capacity
# cut-off sat on a near-tie and fell the other way. From that step on the two runs are different
# trajectories of the same function.


# %%
def parting_steps(result: dict, threshold: float = 1e-4) -> None:
    reference = {r["seed"]: np.array(r["train_loss"]) for r in result["variants"]["single"]["runs"]}
    for name, variant in result["variants"].items():
        if name == "single":
            continue
        cells = []
        for run in variant["runs"]:
            ref = reference[run["seed"]]
            rel = np.abs(np.array(run["train_loss"]) - ref) / ref
            above = np.flatnonzero(rel > threshold)
            first = "-" if above.size == 0 else str(above[0] + 1)
            until = above[0] if above.size else rel.size
            agree = f"{rel[:until].max():.1e}" if until else "above from the start"
            cells.append(f"seed {run['seed']}: {agree} until step {first}")
        print(f"  {name:10s} " + "; ".join(cells))


for label, result in [("small instance", small)] + ([("stored run", larger)] if larger else []):
    print(f"{label} (measured here):")
    parting_steps(result)

# %% [markdown]
# ## 4. The seed's §6 numbers beside ours

# %%
runs = [("small instance", small)] + ([("stored run", larger)] if larger else [])
s6 = SEED_SECTION_6
print(f"{'':34s} {'MA':>22s} {'baseline (TP x PP)':>22s}")
print(
    f"{'seed §6 (paper model, C4, 50k st.)':34s} {s6['ma_perplexity']:>22} "
    f"{s6['baseline_perplexity']:>22}   (seed's values)"
)
for label, result in runs:
    finals = result["summary"]["variants"]
    for ma in ("ma_float32", "ma_int8"):
        m, b = finals[ma]["final_perplexity"], finals["tp_pp"]["final_perplexity"]
        print(
            f"{label + ', ' + ma:34s} {m['mean']:>13.3f} ± {m['std']:<6.3f} "
            f"{b['mean']:>13.3f} ± {b['std']:<6.3f}   (measured here)"
        )
print(
    f"\nseed: {s6['faster_convergence_percent']}% faster convergence; "
    f"{s6['runs']} runs, p {s6['p_value']}"
)
for label, result in runs:
    for c in result["summary"]["comparisons"]:
        if c["against"] == "tp_pp" or (c["variant"], c["against"]) == ("ma_int8", "single"):
            t = c["paired_t_test"]
            faster = c["fewer_steps_to_target_percent"]
            print(
                f"{label}: {c['variant']} vs {c['against']}: paired t-test p = {t['p']:.3g} "
                f"(n = {t['n']}); fewer steps to perplexity "
                f"{result['summary']['target_perplexity']:.1f}: "
                + ("n/a" if faster is None else f"{faster:+.0f}%")
                + " (measured here)"
            )

# %% [markdown]
# **What can be compared at this scale.** The *mechanism*: whether separating attention from
# the experts changes what the model learns. It does not: float32 MA and TP × PP follow the
# single-device run to float32 rounding (right-hand panels, and the table above) until a routing
# near-tie falls the other way; after that the runs are different trajectories of the same
# function, and their distance grows (compare the final perplexities above with the spread over
# seeds). A paired test of final perplexities then speaks of rounding and routing ties, not of
# learning. The only thing that can move MA's curve by design is the int8 round trip of the
# buffers between the pools; its per-step effect from the first step on is the
# `ma_int8 vs single` line above (max per-step relative loss difference), and the paired test
# says whether its effect on the final perplexity is consistent across seeds. Read this way, a
# 12.8 vs 13.4 gap cannot be produced by MA separation as a change of *where* the computation
# runs; if it is real, it has to come from a difference in *what* is computed (data order,
# hyperparameters, precision, or the compression acting as a regulariser), which a controlled
# comparison like this one isolates.
#
# **What cannot.** The absolute perplexities: the seed's 12.8 and 13.4 are for its paper model
# (`configs/paper.yaml`) after 50,000 steps on C4; ours are for a 2-layer, 256-wide model after
# tens of steps on a small embedded corpus, far from converged (the perplexities printed above).
# Likewise "23% faster convergence" and "p < 0.001": with 3 seeds and runs this short,
# the steps-to-target figure has the resolution of the validation interval and the test has
# little power.
#
# **What a GPU cluster is needed for.** The same command at the seed's scale:
#
# ```bash
# python -m maxjax.bench convergence --config paper --steps 50000 --seeds 10 \
#     --set training.source=c4 --set training.data_dir=/path/to/tfds
# ```
#
# i.e. 4 variants × 10 runs × 50,000 steps of the paper model on 16 GPUs (40 full training
# runs; `single` needs the whole paper model on one GPU: where it does not fit, leave it out with
# `--variants ma_float32,ma_int8,tp_pp` and compare against float32 MA, which computes the same
# function). Only such a run can test the seed's absolute
# perplexities and its convergence-speed claim on its own terms; what this notebook shows is the
# prediction it would have to meet: float32 MA ≡ baseline up to rounding, and int8 MA within the
# quantisation noise measured above.
