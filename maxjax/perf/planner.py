"""A search over MA layouts: pool sizes, head split vs data-parallel attention, expert placement,
micro-batches and compression, ranked by projected training tokens/s among layouts whose
parameter, gradient and optimizer state fits the device."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from maxjax.config import Config, ConfigError, with_overrides
from maxjax.perf import programs as P
from maxjax.perf.hardware import HardwareSpec
from maxjax.perf.model import ADAMW_STATE_BYTES, MALayout, Work, run


def seed_layout(cfg: Config) -> MALayout:
    """The layout the config describes (the seed's 12/4 for configs/paper.yaml)."""
    ma = cfg.ma_separation
    return MALayout(
        attention_devices=tuple(ma.attention.devices),
        head_distribution=tuple(ma.attention.head_distribution),
        attention_groups=1,
        expert_devices=tuple(ma.moe.devices),
        experts_per_device=ma.moe.experts_per_gpu,
        microbatches=ma.microbatches,
        compression=ma.synchronization.communication_compression != "none",
    )


def candidate_layouts(
    s: P.Shapes, devices: int, gpus_per_node: int, microbatches=(2, 4, 8)
) -> list[tuple[str, MALayout]]:
    """(description, layout) for every layout in the search space."""
    out = []
    nodes = max(1, devices // gpus_per_node)
    for experts_devs in (x for x in (1, 2, 4, 8) if s.experts % x == 0 and x < devices):
        attn = devices - experts_devs
        for placement in ("packed", "spread"):
            if placement == "packed":
                expert_ids = tuple(range(devices - experts_devs, devices))
            else:
                if experts_devs % nodes and nodes % experts_devs:
                    continue
                step = devices // experts_devs
                expert_ids = tuple(sorted(devices - 1 - i * step for i in range(experts_devs)))
            if placement == "spread" and expert_ids == tuple(
                range(devices - experts_devs, devices)
            ):
                continue
            attn_ids = tuple(d for d in range(devices) if d not in expert_ids)
            attn_nodes = len({d // gpus_per_node for d in attn_ids})
            for mode, groups in (
                ("head_split", 1),
                ("per_node", attn_nodes),
                ("data_parallel", attn),
            ):
                if attn % groups or attn // groups > s.heads:
                    continue
                if mode == "per_node" and groups in (1, attn):
                    continue
                heads = tuple(P.even_split(s.heads, attn // groups))
                for m, comp in itertools.product(microbatches, (True, False)):
                    if s.batch % m or s.batch // m < groups:
                        continue
                    lay = MALayout(
                        attn_ids, heads, groups, expert_ids, s.experts // experts_devs, m, comp
                    )
                    desc = (
                        f"{attn}/{experts_devs} {mode} experts-{placement} m={m} "
                        f"{'int8' if comp else 'no-compression'}"
                    )
                    out.append((desc, lay))
    return out


def overrides_of(cfg: Config, lay: MALayout) -> list[str]:
    """`--set` overrides that make the trainer run `lay` (head-split layouts only)."""
    mapping = {}
    for j, d in enumerate(lay.expert_devices):
        first = j * lay.experts_per_device
        mapping[f"gpu_{d}"] = list(range(first, first + lay.experts_per_device))
    flow = ", ".join(f"{k}: {v}" for k, v in mapping.items())
    comp = "8-bit quantization" if lay.compression else "none"
    return [
        f"ma_separation.attention.gpus={len(lay.attention_devices)}",
        f"ma_separation.attention.devices={list(lay.attention_devices)}",
        f"ma_separation.attention.head_distribution={list(lay.head_distribution)}",
        f"ma_separation.moe.gpus={len(lay.expert_devices)}",
        f"ma_separation.moe.devices={list(lay.expert_devices)}",
        f"ma_separation.moe.experts_per_gpu={lay.experts_per_device}",
        f"ma_separation.moe.expert_mapping={{{flow}}}",
        f"ma_separation.microbatches={lay.microbatches}",
        f"ma_separation.synchronization.communication_compression={comp}",
    ]


def executable(cfg: Config, lay: MALayout) -> tuple[bool, str]:
    """Whether the MA runner can run `lay` today, and why not."""
    if lay.attention_groups != 1:
        return False, "projected only: the runner splits heads over the whole attention pool"
    try:
        with_overrides(cfg, overrides_of(cfg, lay))
    except ConfigError as e:
        return False, f"projected only: {e}"
    return True, "runs with the overrides"


def plan(
    cfg: Config, s: P.Shapes, hw: HardwareSpec, devices: int, microbatches=(2, 4, 8)
) -> dict[str, Any]:
    """Every candidate's projection, the best one, and the seed's layout for comparison."""
    work = Work(True, s.batch, s.seq_len)
    rows = []
    seed = seed_layout(cfg)
    layouts = [("seed " + "config layout", seed)] + candidate_layouts(
        s, devices, hw.gpus_per_node, microbatches
    )
    for desc, lay in layouts:
        metrics, _ = run(s, hw, lay, work)
        state = max(v["state_bytes"] for v in metrics["memory"].values())
        ok, why = executable(cfg, lay)
        rows.append(
            {
                "layout": desc,
                "train_tokens_per_s": metrics["tokens_per_s"],
                "step_time_s": metrics["time_s"],
                "busy": metrics["busy_pool"],
                "state_bytes_max": state,
                "state_fits": state <= hw.memory_capacity_bytes,
                "executable": ok,
                "note": why,
                "overrides": overrides_of(cfg, lay) if ok else [],
                "spec": dataclasses.asdict(lay),
            }
        )
    fitting = [r for r in rows[1:] if r["state_fits"]] or rows[1:]
    best = max(fitting, key=lambda r: r["train_tokens_per_s"])
    runnable = [r for r in fitting if r["executable"]]
    best_runnable = max(runnable, key=lambda r: r["train_tokens_per_s"]) if runnable else None
    return {
        "searched": len(rows) - 1,
        "state_bytes_per_param": ADAMW_STATE_BYTES,
        "seed": rows[0],
        "best": best,
        "best_executable": best_runnable,
        "candidates": sorted(rows[1:], key=lambda r: -r["train_tokens_per_s"]),
    }
