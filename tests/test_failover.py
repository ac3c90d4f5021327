"""Attention replicas and in-place failover (`maxjax.parallel.ma.failover`)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax import optim
from maxjax.checkpoint import CheckpointStore
from maxjax.config import ConfigError, with_overrides
from maxjax.parallel import make_runner
from maxjax.parallel.ma import ExpertOrder, failover
from maxjax.parallel.ma.layout import layer_of
from maxjax.parallel.runner import tree_paths
from maxjax.sync.balancer import plan_placement

# Without int8 compression unless a test says otherwise: with `failover: standby` the layout
# over the survivors sums attention's partial outputs in another order (float32 rounding, ~1e-7
# relative); with int8, a value that lands near a rounding boundary can flip by one
# quantisation step, and training amplifies that. (A spare expert device keeps every sum.)
NO_COMPRESSION = "ma_separation.synchronization.communication_compression=none"


@pytest.fixture
def cfg(tiny_cfg):
    return with_overrides(tiny_cfg, ["model.layers=2", NO_COMPRESSION])


def batches(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 50257, (8, 33), np.int32) for _ in range(count)]


def canonical_state(runner, state) -> dict:
    exported = runner.export_train_state(state)
    return {name: runner.gather(exported[name]) for name in ("params", "mu", "nu")} | {
        "count": int(exported["count"])
    }


def poisoned(tree, device):
    """`tree` with every shard on `device` replaced by NaN (a failed device's memory)."""

    def poison(x):
        if not isinstance(x, jax.Array) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        shards = [
            jax.device_put(jnp.full(s.data.shape, jnp.nan, x.dtype), device)
            if s.device == device
            else s.data
            for s in x.addressable_shards
        ]
        return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)

    return jax.tree.map(poison, tree)


def test_surviving_config_gives_a_failed_devices_heads_to_its_standby(cfg):
    heads = list(cfg.ma_separation.attention.head_distribution)
    after = failover.surviving_config(cfg, [5])
    att = after.ma_separation.attention
    assert list(att.devices) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert att.gpus == 11 and after.hardware.failed_devices == (5,)
    assert list(att.head_distribution) == heads[:5] + [heads[5] + heads[6]] + heads[7:]
    # The ring closes: the last device's standby is the first.
    wrapped = failover.surviving_config(cfg, [11]).ma_separation.attention
    assert wrapped.head_distribution[0] == heads[0] + heads[11]
    # A second failure on the survivors' ring: device 6 now holds 5's heads too, 7 its copy.
    twice = failover.surviving_config(after, [6]).ma_separation.attention
    assert twice.head_distribution[5] == heads[5] + heads[6] + heads[7]
    with pytest.raises(failover.FailoverError, match="5 and 6 failed together"):
        failover.surviving_config(cfg, [5, 6])
    single_copy = with_overrides(cfg, ["ma_separation.attention.replication_factor=1"])
    with pytest.raises(failover.FailoverError, match="replication_factor is 1"):
        failover.surviving_config(single_copy, [5])
    with pytest.raises(ConfigError, match="hardware.failed_devices"):
        with_overrides(cfg, ["hardware.failed_devices=[3]"])


def test_a_spare_expert_device_takes_a_failed_attention_devices_place(cfg):
    """The layout after attention failures with `failover: spare_expert_device`: the last
    surviving expert devices take the failed devices' positions (head distribution unchanged),
    their experts spread over the rest; 'standby' once no expert device can be spared."""
    heads = list(cfg.ma_separation.attention.head_distribution)
    after, order, spares = failover.failover_config(cfg, ExpertOrder.from_config(cfg), [5])
    att, pool = after.ma_separation.attention, after.ma_separation.moe
    assert spares == [15] and list(att.devices) == [0, 1, 2, 3, 4, 15, *range(6, 12)]
    assert list(att.head_distribution) == heads and after.hardware.failed_devices == (5,)
    assert list(pool.devices) == [12, 13, 14] and pool.experts_per_gpu == 6
    assert sorted(e for m in pool.expert_mapping.values() for e in m) == list(range(16))
    assert order.num_rows == 18 and sorted(e for e in order.order[0] if e >= 0) == list(range(16))
    # An attention and an expert device together: the spare is the last one that survives.
    both, _, spares = failover.failover_config(cfg, ExpertOrder.from_config(cfg), [3, 15])
    assert spares == [14] and both.ma_separation.attention.devices[3] == 14
    assert list(both.ma_separation.moe.devices) == [12, 13]
    assert both.hardware.failed_devices == (3, 15)
    # Three spares leave one expert device; a fourth failure falls back to the standby.
    order = ExpertOrder.from_config(cfg)
    for failed, spare in ((5, 15), (1, 14), (9, 13)):
        cfg, order, spares = failover.failover_config(cfg, order, [failed])
        assert spares == [spare]
    assert list(cfg.expert_devices) == [12] and cfg.ma_separation.moe.experts_per_gpu == 16
    last, _, spares = failover.failover_config(cfg, order, [2])
    assert spares == [] and last.ma_separation.attention.gpus == 11
    assert last.hardware.failed_devices == (1, 2, 5, 9)
    with pytest.raises(failover.FailoverError, match="3 and 4 failed together"):
        failover.failover_config(cfg, order, [3, 4])


@pytest.mark.parametrize(
    ("policy", "compression"),
    [("spare_expert_device", "8-bit quantization"), ("standby", "none")],
)
def test_standby_is_exact_and_failover_continues_the_same_run(tiny_cfg, policy, compression):
    """Two successive attention failures. With a spare expert device taking each failed
    device's place the attention layout is unchanged and the run computes the same bits as
    the one without failures, int8 traffic included; with the standby taking over the heads
    the pool's sums are taken in another order (float32 traffic: within 1e-5)."""
    cfg = with_overrides(
        tiny_cfg,
        [
            "model.layers=2",
            f"ma_separation.synchronization.communication_compression={compression}",
            f"ma_separation.attention.failover={policy}",
        ],
    )
    spare = policy == "spare_expert_device"
    tx = optim.make_optimizer(cfg)
    data = batches(5)

    def step(runner, state, i):
        state, metrics = runner.train_step(state, data[i], tx, jax.random.key(i))
        return state, float(metrics["loss"])

    reference = make_runner(cfg, "ma")
    state = reference.init_train_state(reference.init(0), tx)
    want = []
    for i in range(5):
        state, loss = step(reference, state, i)
        want.append(loss)
    del reference, state

    runner = make_runner(cfg, "ma")
    state = runner.init_train_state(runner.init(0), tx)
    got = []
    for i in range(2):
        state, loss = step(runner, state, i)
        got.append(loss)

    # Every attention device's standby holds its ring predecessor's shards, bit for bit.
    devices = runner.attention_devices
    source = failover.standby_source(runner, {"params": state.params, **failover.moments(state)})
    checked = 0
    for name in failover.STANDBY_TREES:
        for (path, own), (_, copy) in zip(
            tree_paths(source[name]), tree_paths(runner.standby[name]), strict=True
        ):
            owned = {s.device: np.asarray(s.data) for s in own.addressable_shards}
            copied = {s.device: np.asarray(s.data) for s in copy.addressable_shards}
            for a, device in enumerate(devices):
                standby = devices[failover.standby_position(a, len(devices))]
                np.testing.assert_array_equal(copied[standby], owned[device], str(path))
                checked += 1
    assert checked > 0
    assert runner.standby_bytes() > 0
    del source, own, copy, owned, copied

    # Device 5 fails: whatever it held is garbage now; nothing may read it.
    dead = jax.devices()[5]
    before = canonical_state(runner, state)
    state = poisoned_state = state._replace(
        params=poisoned(state.params, dead), opt_state=poisoned(state.opt_state, dead)
    )
    runner.standby = poisoned(runner.standby, dead)
    state, record = runner.fail_device(state, 5, tx)
    assert record["event"] == "failure" and record["pool"] == "attention"
    assert record["device"] == 5 and record["tokens_served_fraction"] == 1.0
    assert record["recovery_seconds"] > 0
    if spare:
        assert record["spare_expert_devices"] == [15]
        assert record["layout"]["attention_devices"] == [0, 1, 2, 3, 4, 15, *range(6, 12)]
        assert record["layout"]["head_distribution"] == list(
            cfg.ma_separation.attention.head_distribution
        )
        assert record["layout"]["expert_devices"] == [12, 13, 14]
    else:
        assert "spare_expert_devices" not in record
        assert record["layout"]["attention_devices"] == [0, 1, 2, 3, 4, *range(6, 12)]
    after = canonical_state(runner, state)
    for name in ("params", "mu", "nu"):
        for (path, a), (_, b) in zip(
            tree_paths(before[name]), tree_paths(after[name]), strict=True
        ):
            np.testing.assert_array_equal(a, b, f"{name} {path}")
    assert after["count"] == before["count"]
    # Nothing the run holds is on the failed device, and what it held there is deleted.
    held = (state, runner.standby, runner._constants, runner.transport._templates)
    on_dead = [x for x in jax.tree.leaves(held) if isinstance(x, jax.Array) and dead in x.devices()]
    assert not on_dead, [x.shape for x in on_dead]
    old = [x for x in jax.tree.leaves(poisoned_state) if isinstance(x, jax.Array)]
    assert old and all(x.is_deleted() for x in old)

    state, loss = step(runner, state, 2)
    got.append(loss)
    # A second failure on the new ring: device 6 (the standby of 5's place) fails. The
    # micro-batch count in use (as the sync loop may have re-chosen it) outlives the failover.
    # (Another count sums the micro-batches in another order: only where exactness is not asked.)
    microbatches = runner.microbatches if spare else 1
    runner.set_microbatches(microbatches)
    state, second = runner.fail_device(state, 6, tx)
    if spare:
        assert second["layout"]["attention_devices"] == [0, 1, 2, 3, 4, 15, 14, *range(7, 12)]
        assert second["layout"]["expert_devices"] == [12, 13]
    else:
        assert second["layout"]["attention_devices"] == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert second["layout"]["failed_devices"] == [5, 6]
    assert runner.microbatches == microbatches
    for i in (3, 4):
        state, loss = step(runner, state, i)
        got.append(loss)
    if spare:
        assert got == want
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_padded_expert_layout_computes_the_same_function(cfg):
    # 16 experts on the 3 expert devices left after device 13 fails: 6 slots each, 2 empty.
    three, order = failover.surviving_experts(cfg, ExpertOrder.from_config(cfg), [13])
    assert three.ma_separation.moe.experts_per_gpu == 6 and three.expert_devices == (12, 14, 15)
    assert order.num_rows == 18 and np.sum(order.order < 0) == 2 * cfg.model.layers
    four_runner, three_runner = make_runner(cfg, "ma"), make_runner(three, "ma")
    canonical = four_runner.gather(four_runner.init(0))
    tokens, key = batches(1)[0], jax.random.key(0)
    want_metrics, want = four_runner.value_and_grad(
        four_runner.from_canonical(canonical), tokens, key
    )
    got_metrics, got = three_runner.value_and_grad(
        three_runner.from_canonical(canonical), tokens, key
    )
    assert abs(float(got_metrics["loss"]) / float(want_metrics["loss"]) - 1) <= 1e-6
    for (path, a), (_, b) in zip(
        tree_paths(four_runner.gather(want)), tree_paths(three_runner.gather(got)), strict=True
    ):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), path


def test_expert_device_failover_moves_its_experts_to_the_survivors(cfg):
    tx = optim.make_optimizer(cfg)
    data = batches(4)
    runner = make_runner(cfg, "ma")
    state = runner.init_train_state(runner.init(0), tx)
    for i in range(2):
        state, _ = runner.train_step(state, data[i], tx, jax.random.key(i))
    before = canonical_state(runner, state)
    dead = jax.devices()[13]
    state = poisoned_state = state._replace(
        params=poisoned(state.params, dead), opt_state=poisoned(state.opt_state, dead)
    )
    state, record = runner.fail_device(state, 13, tx)
    assert record["pool"] == "experts" and record["tokens_served_fraction"] == 1.0
    assert record["experts_restored_from"] == "initial values"
    assert record["layout"]["expert_devices"] == [12, 14, 15]
    assert record["layout"]["expert_slots_per_device"] == 6
    lost = record["experts_restored"]
    assert lost == [[4, 5, 6, 7]] * cfg.model.layers  # device 13's experts (expert_mapping)
    # The survivors' experts and everything else as they were; the lost experts at their
    # initial values with zero moments; nothing on the failed device.
    after = canonical_state(runner, state)
    fresh = make_runner(cfg, "ma")
    initial = fresh.gather(fresh.init(cfg.training.seed))
    for name in ("params", "mu", "nu"):
        for (path, a), (_, b) in zip(
            tree_paths(before[name]), tree_paths(after[name]), strict=True
        ):
            if "experts" not in path:
                np.testing.assert_array_equal(a, b, f"{name} {path}")
                continue
            gone = lost[int(path[1])]
            kept = [e for e in range(a.shape[0]) if e not in gone]
            np.testing.assert_array_equal(a[kept], b[kept], f"{name} {path}")
            restored = dict(tree_paths(initial))[path][gone] if name == "params" else 0.0
            np.testing.assert_array_equal(b[gone], np.broadcast_to(restored, b[gone].shape))
    held = (state, runner.standby, runner._constants, runner.transport._templates)
    assert not [
        x for x in jax.tree.leaves(held) if isinstance(x, jax.Array) and dead in x.devices()
    ]
    old = [x for x in jax.tree.leaves(poisoned_state) if isinstance(x, jax.Array)]
    assert old and all(x.is_deleted() for x in old)

    # The sync loop goes on over the survivors: hot experts spread over the 3 devices' slots,
    # the empty slots hold zeros, and the same loss and gradients are computed.
    key = jax.random.key(2)
    metrics, grads = runner.value_and_grad(state.params, data[2], key)
    want_loss, want_grads = float(metrics["loss"]), runner.gather(grads)
    del grads
    loads = np.tile(np.geomspace(1.0, 0.05, 16), (cfg.model.layers, 1))
    order, imbalance_before, imbalance_after = plan_placement(
        loads / loads.sum(1, keepdims=True), runner.experts.order, 3, threshold=0.05
    )
    assert np.all(imbalance_after < imbalance_before / 2), (imbalance_before, imbalance_after)
    state, moved = runner.move_experts(state, order)
    assert moved > 0 and np.array_equal(runner.experts.order, order)
    for path, leaf in tree_paths(runner.split_pools(state.params)["experts"]):
        empty = order[layer_of(path)] < 0
        assert empty.sum() == 2 and not np.asarray(leaf)[empty].any(), path
    metrics, grads = runner.value_and_grad(state.params, data[2], key)
    assert float(metrics["loss"]) == want_loss
    for (path, a), (_, b) in zip(
        tree_paths(want_grads), tree_paths(runner.gather(grads)), strict=True
    ):
        np.testing.assert_array_equal(a, b, str(path))
    del grads
    for i in (2, 3):
        state, metrics = runner.train_step(state, data[i], tx, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))


def run_train(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maxjax.train", "--config", "configs/tiny.yaml", "--no-progress"]
        + ["--checkpoint-dir", str(tmp_path), "--set", "model.layers=2"]
        + ["--set", "checkpoint.interval_steps=1", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_restores_a_failed_expert_devices_experts_from_the_newest_checkpoint(tmp_path):
    """...and the sync loop goes on over the surviving expert devices."""
    sync = "ma_separation.synchronization.sync_interval=2"
    done = run_train(["--steps", "4", "--fail-device", "13@3", "--set", sync], tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    (failure,) = [r for r in records if r.get("event") == "failure"]
    assert failure["step"] == 3 and failure["pool"] == "experts"
    assert failure["experts_restored_from"] == "checkpoint of step 2"
    assert failure["recovery_seconds"] > 0 and failure["tokens_served_fraction"] == 1.0
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    synced = {r["step"]: r for r in records if r.get("event") == "sync"}
    assert sorted(synced) == [2, 4]
    for step, devices in ((2, [12, 13, 14, 15]), (4, [12, 14, 15])):
        for mapping in synced[step]["expert_mapping"]:
            assert sorted(mapping) == [f"gpu_{d}" for d in devices]
            assert sorted(e for experts in mapping.values() for e in experts) == list(range(16))
    assert len(synced[4]["expert_stage_seconds"]) == 3 and synced[4]["samples"] > 0


def test_train_ends_with_one_line_when_both_copies_are_lost(tmp_path):
    # A run that fails over and goes on is notebook 09's (train with failures, its records and
    # losses checked there); here the runs that cannot go on.
    lost = run_train(
        ["--steps", "3", "--fail-device", "5@2", "--fail-device", "6@2"], tmp_path / "both"
    )
    assert lost.returncode == 1
    lines = lost.stderr.strip().splitlines()
    assert len(lines) == 1 and "5 and 6 failed together" in lines[0], lost.stderr
    assert "Traceback" not in lost.stderr
    assert CheckpointStore(tmp_path / "both").steps() == [1]  # step 1's checkpoint is intact

    for bad, says in [("20@2", "in no pool"), ("5", "DEVICE@STEP"), ("5@0", "1 or later")]:
        refused = run_train(["--steps", "3", "--fail-device", bad], tmp_path / "refused")
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.count("\n") == 1 and says in refused.stderr, refused.stderr
