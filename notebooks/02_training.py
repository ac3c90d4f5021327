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
# # 02 · Training, checkpoints, evaluation and generation
#
# `python -m maxjax.train` is a thin command line over `maxjax.train.train(cfg, strategy, steps,
# checkpoint_dir)`; `python -m maxjax.evaluate` over `maxjax.evaluate.evaluate(checkpoint_dir)`.
# This notebook calls those same functions:
#
# 1. train the tiny model under MA separation on the embedded corpus for a short run, into a
#    temporary checkpoint directory;
# 2. resume the run for a few more steps from its checkpoint;
# 3. plot the training loss and the validation perplexity from the run's `metrics.jsonl`;
# 4. restore the checkpoint, evaluate it, and generate text decoded with the GPT-2 tokenizer.
#
# Everything runs on **16 emulated CPU devices** in a few minutes. The run is far too short
# (and the corpus far too small) to say anything about the seed's training result: its
# validation perplexity of 12.8 is for the full-size model after 50,000 steps on C4.

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
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maxjax.config import load_config  # noqa: E402
from maxjax.data import TokenBatches, decode, encode  # noqa: E402
from maxjax.evaluate import evaluate, quiet_libraries, restore, setup_jax  # noqa: E402
from maxjax.parallel import Runner  # noqa: E402
from maxjax.train import train  # noqa: E402

quiet_libraries()  # keep orbax's progress logs out of the notebook

# %% [markdown]
# ## 1. A short training run
#
# The tiny config (`configs/tiny.yaml`) with a shorter schedule, so that warmup and cosine decay
# both happen within the run: 4 warmup steps, 24 steps in all, validation every 8 steps and a
# checkpoint every 8. The overrides are the same `KEY=VALUE` strings that
# `python -m maxjax.train --set KEY=VALUE` takes. The equivalent command line is
#
# ```bash
# python -m maxjax.train --config configs/tiny.yaml --strategy ma --steps 16 --checkpoint-dir DIR \
#     --set schedule.warmup_steps=4 --set schedule.total_steps=24 --set training.validation_interval=8 \
#     --set checkpoint.interval_steps=8 --set training.dtype=float32
# ```

# %%
overrides = [
    "schedule.warmup_steps=4",
    "schedule.total_steps=24",
    "training.validation_interval=8",
    "checkpoint.interval_steps=8",
    "training.dtype=float32",
]
cfg = load_config("tiny", overrides)  # configs/tiny.yaml of the repository
setup_jax(cfg)  # what the command line does first; a no-op here, JAX already has 16 devices

train_split = TokenBatches(cfg, "train")
print("train split:", train_split.describe())
print("validation split:", TokenBatches(cfg, "validation").describe())

run_dir = Path(tempfile.mkdtemp(prefix="maxjax_nb02_")) / "tiny"
print("checkpoint directory:", run_dir)

# %%
first = train(cfg, strategy="ma", steps=16, checkpoint_dir=run_dir, progress=False)
print(
    f"step {first['step']}: loss {first['first_loss']:.3f} -> {first['last_loss']:.3f}, "
    f"validation perplexity {first['val_perplexity']:.1f}, {first['wall_seconds']:.0f} s "
    "(measured here on 16 emulated CPU devices, compilation included)"
)
print("saved checkpoints:", sorted(p.name for p in run_dir.iterdir() if p.name.isdigit()))

# %% [markdown]
# The loss starts near ln(50265) ≈ 10.8: an untrained model spreads its probability over the
# whole embedding table. Training stopped at step 16 (`steps=16`) while the schedule runs to 24,
# as if the job had been interrupted during its cosine decay; a run always saves a checkpoint at its
# last step.
#
# ## 2. Resume from the checkpoint
#
# Calling `train` again with the same directory continues from the newest checkpoint (step 16)
# with the same data order and dropout keys, exactly like running the same command again.
# A checkpoint holds the parameters and AdamW state in the layout of the runner that wrote it,
# with a description of that layout (`maxjax/checkpoint.py`); restoring into the same layout
# reads each device's shards straight onto that device, and restoring under another strategy
# converts them, so the run can continue under any strategy; `RESUME_STRATEGY` picks which one
# continues it here.

# %%
RESUME_STRATEGY = "ma"
second = train(cfg, strategy=RESUME_STRATEGY, steps=24, checkpoint_dir=run_dir, progress=False)
print(
    f"resumed: steps {second['history'][0]['step']}..{second['step']}, "
    f"loss {second['first_loss']:.3f} -> {second['last_loss']:.3f}, "
    f"validation perplexity {second['val_perplexity']:.1f}"
)
assert second["history"][0]["step"] == 17 and second["step"] == 24

# %% [markdown]
# ## 3. Loss and validation perplexity from `metrics.jsonl`
#
# Every step appends a JSON line (loss, its parts, gradient norm, learning rate, tokens per
# second); every `training.validation_interval` steps and at the end of a call, a line with the
# validation loss and perplexity (over `training.validation_batches` fixed batches).

# %%
records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in records if "loss" in r]
vals = [r for r in records if "val_loss" in r]
print(
    "one step record:",
    {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in steps[-1].items()
        if not k.startswith("expert_fraction")
    },
)
print("validation records:", [(r["step"], round(r["val_perplexity"], 1)) for r in vals])

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
x = [r["step"] for r in steps]
axes[0].plot(x, [r["loss"] for r in steps], label="training loss (with auxiliary losses)")
axes[0].plot(x, [r["lm_loss"] for r in steps], label="language-model loss", ls="--")
axes[0].plot(
    [r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", label="validation loss"
)
axes[0].axvline(16, color="grey", ls=":", label="resumed from checkpoint")
axes[0].set_xlabel("step")
axes[0].set_ylabel("cross-entropy (nats per token)")
axes[0].set_title("loss")
axes[0].legend(fontsize=8)

axes[1].semilogy([r["step"] for r in vals], [r["val_perplexity"] for r in vals], "o-")
axes[1].set_xlabel("step")
axes[1].set_ylabel("validation perplexity (log scale)")
axes[1].set_title("validation perplexity")

axes[2].plot(x, [r["learning_rate"] for r in steps], color="tab:green")
axes[2].set_xlabel("step")
axes[2].set_ylabel("learning rate")
axes[2].set_title("warmup + cosine schedule")
plt.tight_layout()
plt.show()

# %% [markdown]
# The same file carries the routing statistics: the fraction of assignments that went to each
# expert (averaged over layers) and the fraction dropped past capacity.

# %%
fraction = np.array([r["expert_fraction"] for r in steps])  # [steps, experts]
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
im = axes[0].imshow(
    fraction.T,
    aspect="auto",
    cmap="viridis",
    origin="lower",
    extent=(x[0] - 0.5, x[-1] + 0.5, -0.5, fraction.shape[1] - 0.5),
)
axes[0].set_xlabel("step")
axes[0].set_ylabel("expert")
axes[0].set_title("share of assignments per expert")
fig.colorbar(im, ax=axes[0], label="fraction of top-2 assignments")
axes[1].plot(x, [100 * r["dropped_fraction"] for r in steps], label="dropped past capacity")
axes[1].plot(
    x, [r["load_balancing_loss"] for r in steps], label="load-balancing loss (1 = balanced)"
)
axes[1].set_xlabel("step")
axes[1].set_ylabel("dropped assignments (%) / loss value")
axes[1].set_title("routing balance")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Restore, evaluate, generate
#
# A checkpoint stores the parameters and AdamW state in the strategy's own layout together
# with the run's config, so it restores under any strategy. `evaluate(dir)` is what
# `python -m maxjax.evaluate --checkpoint-dir DIR` prints.

# %%
result = evaluate(run_dir)
print(result)
print(
    f"validation perplexity {result['perplexity']:.1f} at step {result['step']} "
    "(measured here on 16 emulated CPU devices, tiny model); seed: "
    f"{cfg.validation.perplexity} (full-size model, 50,000 steps on C4: not comparable)"
)
assert result["step"] == 24
assert abs(result["val_loss"] - second["val_loss"]) < 1e-4

# %% [markdown]
# `restore(dir)` returns the config saved with the checkpoint, a runner of the strategy that
# wrote it, and the train state. Generation uses a KV cache and routes without dropping (capacity
# raised to the group size), so the continuation does not depend on the batch it runs in.
# The MA runner implements `generate` (`MARunner.generate` in `maxjax/parallel/ma/schedule.py`:
# the attention pool keeps the KV caches, the experts stay on the expert pool), so the restored MA
# runner generates here. The cell falls back to the single-device runner only for a runner
# without its own `generate`; the parameters are the same.

# %%
saved_cfg, runner, state, meta = restore(run_dir)
print("restored step", state.step, "written by strategy", meta["strategy"], "->", runner.name)
if type(runner).generate is Runner.generate:
    saved_cfg, runner, state, meta = restore(run_dir, strategy="single")
    print("generating with the", runner.name, "runner")

prompts = ["The return statement", "A class definition"]
ids = [encode(p) for p in prompts]
length = min(len(i) for i in ids)
prompt = np.array([i[:length] for i in ids], dtype=np.int32)  # equal lengths: one batch
out = np.asarray(runner.generate(state.params, prompt, max_new_tokens=24, temperature=0.0))
for row in out:
    print(repr(decode(row[:length].tolist())), "->", repr(decode(row[length:].tolist())))

# %% [markdown]
# After 24 steps the model has learned little more than the corpus's most frequent tokens, so
# expect the greedy continuation to be made of them. The full default job
# (`python -m maxjax.train`, 200 steps) gets further; a GPU run of the paper config is what the
# seed describes.
#
# The temporary directory is removed at the end.

# %%
import shutil  # noqa: E402

shutil.rmtree(run_dir.parent)
