"""The memory plan against what a real training step holds (tiny config, 16 emulated devices).

At each phase the test can stop at (right after `init_train_state`; between MA's forward and
backward sweeps, when every stage's residuals are alive; after the loss-and-gradient call, when
the gradients are), it sums the distinct buffers alive on each device (`jax.live_arrays`, each
buffer once however many arrays share it), adds the temporaries of the programs that run there
(`memory_analysis` of the programs compiled from the real arguments) and compares with the
plan's phase, device by device. The backward phases are sums of the parts checked here.
"""

import gc
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax import optim
from maxjax.bench import memory as bench_memory
from maxjax.config import with_overrides
from maxjax.parallel import make_runner
from maxjax.parallel.collectives import abstract
from maxjax.perf import memory

# Measured deviations are under 0.1% (the plan reads the same shapes and XLA's own temp sizes);
# 5% keeps the checks below able to see a missing part of the size of the residuals.
TOLERANCE = 0.05


def live_buffers() -> dict[tuple[int, int], tuple[int, int]]:
    """{(device id, buffer address): (device index, bytes)} of every live array's shards.
    Unreachable arrays are collected first: freed later, their addresses could be reused by
    arrays the caller means to count."""
    gc.collect()
    index = {d: i for i, d in enumerate(jax.devices())}
    out = {}
    for array in jax.live_arrays():
        if array.is_deleted():
            continue
        for shard in array.addressable_shards:
            data = shard.data
            out[(shard.device.id, data.unsafe_buffer_pointer())] = (
                index[shard.device],
                data.nbytes,
            )
    return out


def live_bytes(before: dict) -> np.ndarray:
    """Bytes per device of the buffers alive now that were not alive in `before`."""
    out = np.zeros(len(jax.devices()))
    for key, (device, nbytes) in live_buffers().items():
        if key not in before:
            out[device] += nbytes
    return out


def temp_per_device(compiled_programs) -> np.ndarray:
    """Per device, the largest temporaries among these compiled programs."""
    return np.max(
        [memory.ProgramMemory.of("", c, len(jax.devices())).temp for c in compiled_programs],
        axis=0,
    )


def update_programs(runner, state, grads, tx):
    """The AdamW update programs, compiled from the step's real arrays."""
    params, opt, grads = (
        runner.split_pools(state.params),
        state.opt_state,
        runner.split_pools(grads),
    )
    out = []
    for name in grads:
        mesh = jax.tree.leaves(grads[name])[0].sharding.mesh
        norm = jax.device_put(np.float32(0), NamedSharding(mesh, P()))
        update = runner._update_fn(name, tx)
        out.append(
            update.lower(params[name], opt[name], grads[name], [norm] * len(grads)).compile()
        )
    return out


def assert_close(measured: np.ndarray, planned: np.ndarray, what: str) -> None:
    worst = np.max(np.abs(measured / planned - 1))
    print(f"{what}: measured vs planned, largest deviation over devices {100 * worst:.2f}%")
    for device, (m, p) in enumerate(zip(measured, planned, strict=True)):
        assert abs(m - p) <= TOLERANCE * p, (
            f"{what}, device {device}: measured {m:,.0f} bytes, planned {p:,.0f} "
            f"({100 * (m / p - 1):+.1f}%)"
        )


@pytest.fixture
def tiny_two_layers(tiny_cfg):
    return with_overrides(tiny_cfg, ["model.layers=2"])


@pytest.mark.parametrize("remat", [False, True], ids=["residuals", "recompute"])
def test_ma_plan_matches_a_training_step(tiny_two_layers, remat):
    # Recomputing, in two rounds of gradient accumulation: how the paper config trains.
    overrides = [f"training.gradient_checkpointing={str(remat).lower()}"]
    if remat:
        overrides.append("ma_separation.gradient_accumulation=2")
    cfg = with_overrides(tiny_two_layers, overrides)
    before = live_buffers()
    runner = make_runner(cfg, "ma")
    tx = optim.make_optimizer(cfg)
    state = runner.init_train_state(runner.init(0), tx)
    measured = {"optimizer init": live_bytes(before)}

    tokens = np.random.default_rng(0).integers(0, 50257, (cfg.sequence.batch_size, 33), np.int32)
    rng = jax.random.key(0)
    state, _ = runner.train_step(state, tokens, tx, rng)  # moves AdamW's state onto the pools

    calls = {}
    run = runner._run

    def recording_run(program, *args):
        # One entry per compiled variant (e.g. with and without a gradient sum to add to).
        calls.setdefault((program, jax.tree.structure(args)), abstract(args))
        return run(program, *args)

    runner._run = recording_run
    # The last round's (with several rounds, the sums of the earlier rounds' gradients too).
    runner.between_sweeps = lambda: measured.__setitem__("forward end", live_bytes(before))
    metrics, grads = runner.value_and_grad(state.params, tokens, rng)
    measured["update"] = live_bytes(before)
    runner._run, runner.between_sweeps = run, None

    stage_programs = [
        program.lower(*args).compile()
        for (program, _), args in calls.items()
        if hasattr(program, "lower")
    ]
    temps = {
        "optimizer init": 0,
        "forward end": temp_per_device(stage_programs),
        "update": temp_per_device(update_programs(runner, state, grads, tx)),
    }
    # Planned after the steps, so that its ahead-of-time compiles find the step's programs.
    plan = memory.plan(cfg, "ma", runner=runner, tx=tx)
    for name, live in measured.items():
        assert_close(live + temps[name], plan.phase(name).total, name)
    # The residuals weigh on both pools between the sweeps (on the attention pool over 10% of
    # its total): a plan without them would fail the check above. Recomputing, every stage
    # keeps only its inputs.
    forward = plan.phase("forward end").parts
    for pool in ("attention", "experts"):
        devices = [i for i, name in enumerate(plan.pools) if name == pool]
        assert devices and (forward["residuals"][devices] > 0).all(), pool
    experts = [i for i, pool in enumerate(plan.pools) if pool == "experts"]
    share = 0.0 if remat else 0.2
    assert (forward["residuals"][experts] > share * forward["parameters"][experts]).all()
    attention = [i for i, name in enumerate(plan.pools) if name == "attention"]
    if not remat:
        total = plan.phase("forward end").total[attention]
        assert (forward["residuals"][attention] > TOLERANCE * total).all()


def test_tp_pp_plan_matches_a_training_step(tiny_two_layers):
    cfg = tiny_two_layers
    before = live_buffers()
    runner = make_runner(cfg, "tp_pp")
    batch = 16
    tx = optim.make_optimizer(cfg)
    state = runner.init_train_state(runner.init(0), tx)
    tokens = np.random.default_rng(0).integers(0, 50257, (batch, 33), np.int32)
    rng = jax.random.key(0)
    state, _ = runner.train_step(state, tokens, tx, rng)

    metrics, grads = runner.value_and_grad(state.params, tokens, rng)
    live = live_bytes(before)
    step = runner._value_and_grad.lower(state.params, tokens, rng).compile()
    update = temp_per_device(update_programs(runner, state, grads, tx))
    plan = memory.plan(cfg, "tp_pp", runner=runner, batch=batch, tx=tx)
    assert_close(
        live + temp_per_device([step]), plan.phase("loss and gradients").total, "loss and grads"
    )
    assert_close(live + update, plan.phase("update").total, "update")

    # What `python -m maxjax.bench memory --json` writes and prints for this plan.
    result = json.loads(json.dumps(plan.to_json()))
    assert [row["device"] for row in result["per_device"]] == list(range(16))
    for row in result["per_device"]:
        assert row["total_bytes"] == pytest.approx(sum(row[p] for p in memory.PARTS))
    table = bench_memory.format_table(result)
    assert len(table.splitlines()) == 3 + 16 + 1 and "16 of 16 devices fit 80 GB" in table


def test_device_bytes_counts_each_shard_where_it_lives():
    from jax.sharding import Mesh

    devices = jax.devices()
    mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b"))
    split = jax.ShapeDtypeStruct((8, 6), np.float32, sharding=NamedSharding(mesh, P("a")))
    whole = jax.ShapeDtypeStruct((3,), np.int8, sharding=NamedSharding(mesh, P()))
    out = memory.device_bytes({"split": split, "whole": whole}, len(devices))
    assert out[:4].tolist() == [4 * 6 * 4 + 3] * 4
    assert not out[4:].any()
