"""One process of the 4-process MA test: 4 CPU devices each, gloo collectives.

Usage: python tests/ma_multiprocess_worker.py PROCESS_ID PORT OUT_DIR. Every process builds the
same MA runner (pieces cross processes by collective permutes), runs the forward pass and the
loss (with gradients), and compares what it holds (its shards of the logits, the replicated
loss) with the single-device reference computed on its own first device. It writes OUT_DIR/result_<id>.json.
"""

from __future__ import annotations

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

OVERRIDES = [
    "training.dtype=float32",
    "model.hidden_dim=64",
    "model.head_dim=2",
    "moe.expert_hidden_dim=128",
    "model.layers=2",
    "ma_separation.microbatches=1",
    "ma_separation.synchronization.communication_compression=none",
]


def main(process_id: int, port: int, out_dir: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=4, process_id=process_id
    )
    import numpy as np

    from maxjax import model
    from maxjax.config import load_config
    from maxjax.parallel.ma import MARunner
    from maxjax.parallel.single import SingleRunner

    cfg = load_config("tiny", OVERRIDES)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 9), 0, 50257))
    canonical = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(cfg, 0))())

    reference = SingleRunner(cfg, device=jax.local_devices()[0])
    ref_params = reference.from_canonical(canonical)
    ref_logits = np.asarray(reference.forward(ref_params, tokens[:, :-1]))
    ref_loss, _ = jax.jit(functools.partial(model.loss_fn, cfg))(ref_params, tokens)

    runner = MARunner(cfg)
    params = runner.from_canonical(canonical)
    logits = runner.forward(params, tokens[:, :-1])
    metrics, _ = runner.value_and_grad(params, tokens)

    scale = float(np.abs(ref_logits).max())
    logits_error = 0.0
    for shard in logits.addressable_shards:
        part = np.asarray(shard.data)
        logits_error = max(
            logits_error, float(np.abs(part - ref_logits[shard.index]).max()) / scale
        )
    loss_shards = metrics["loss"].addressable_shards
    loss = float(np.asarray(loss_shards[0].data)) if loss_shards else None
    result = {
        "process": process_id,
        "logit_shards": len(logits.addressable_shards),
        "logits_error": logits_error,
        "loss": loss,
        "reference_loss": float(ref_loss),
    }
    with open(os.path.join(out_dir, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
