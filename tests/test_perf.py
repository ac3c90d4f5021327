"""The performance model: simulator, roofline, program costs, planner and `bench project`."""

import dataclasses
import json

import pytest

from maxjax.perf import programs as P
from maxjax.perf.hardware import load_hardware, spec_from_dict
from maxjax.perf.model import (
    BaselineLayout,
    Work,
    program_time,
    ring_factor,
    run,
)
from maxjax.perf.simulate import Task, simulate, union_length


def test_two_stage_pipeline_has_known_makespan_and_overlap():
    # Stage A takes 1 s per micro-batch on dev0, stage B 2 s on dev1; two micro-batches.
    tasks = [
        Task("a0", ("dev:0",), 1.0),
        Task("b0", ("dev:1",), 2.0, ("a0",)),
        Task("a1", ("dev:0",), 1.0),
        Task("b1", ("dev:1",), 2.0, ("a1",)),
    ]
    tl = simulate(tasks)
    assert tl.start == {"a0": 0.0, "b0": 1.0, "a1": 1.0, "b1": 3.0}
    assert tl.makespan == 5.0
    assert tl.busy("dev:1") == 4.0 and tl.busy("dev:0") == 2.0
    # a1 runs while b0 does: one second of overlap.
    assert tl.active_time(lambda t: True) == 5.0
    assert tl.active_time(lambda t: t.name in ("a1", "b0")) == 2.0


def test_a_task_on_two_resources_waits_for_both():
    tasks = [
        Task("x", ("dev:0",), 3.0),
        Task("y", ("dev:1",), 1.0),
        Task("send", ("dev:0", "dev:1"), 2.0),
        Task("after", ("dev:1",), 1.0),
    ]
    tl = simulate(tasks)
    assert tl.start["send"] == 3.0 and tl.start["after"] == 5.0


def test_a_ready_transfer_takes_an_earlier_gap_on_a_link():
    tasks = [
        Task("compute", ("dev:0",), 5.0),
        Task("late_send", ("nic:0",), 1.0, ("compute",)),  # waits for its input until t=5
        Task("early_send", ("nic:0",), 2.0),  # ready now: runs first on the link
        Task("long_send", ("nic:0",), 4.0),  # does not fit before t=5: after late_send
    ]
    tl = simulate(tasks)
    assert tl.start == {"compute": 0.0, "late_send": 5.0, "early_send": 0.0, "long_send": 6.0}


def test_simulate_rejects_a_dependency_submitted_later():
    with pytest.raises(ValueError, match="not submitted before"):
        simulate([Task("a", ("dev:0",), 1.0, ("b",)), Task("b", ("dev:0",), 1.0)])


def test_union_length():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_length([]) == 0


def _spec(**changes):
    hw = load_hardware("a100-80gb")
    return dataclasses.replace(hw, **changes)


def test_roofline_compute_and_memory_bound():
    hw = _spec(
        matmul_flops=100.0,
        memory_bytes_per_s=10.0,
        efficiency={"matmul": 0.5, "attention": 0.5, "token": 0.5, "memory": 1.0, "link": 1.0},
    )
    compute_bound = P.ProgramCost(1000.0, 10.0, 0, 0, 0)
    memory_bound = P.ProgramCost(10.0, 1000.0, 0, 0, 0)
    assert program_time(compute_bound, "matmul", hw) == pytest.approx(20.0)
    assert program_time(memory_bound, "matmul", hw) == pytest.approx(100.0)
    serial = dataclasses.replace(hw, overlap=False)
    assert program_time(compute_bound, "matmul", serial) == pytest.approx(21.0)


def test_ring_factors():
    assert ring_factor("all_reduce", 4) == 1.5
    assert ring_factor("all_gather", 4) == 0.75
    assert ring_factor("all_reduce", 1) == 0.0


def test_spec_names_a_missing_key():
    with pytest.raises(ValueError, match="lacks tdp_w"):
        data = dataclasses.asdict(load_hardware("a100-80gb"))
        del data["tdp_w"]
        spec_from_dict(data)


def test_expert_program_flops_match_the_einsums(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    e, b, c = 2, 3, 4
    cost = P.forward_cost("experts", s, e, b, c, False)
    matmuls = 2 * 2 * e * b * c * s.hidden * s.expert_hidden
    assert matmuls <= cost.flops < 1.2 * matmuls
    back = P.backward_cost("experts", s, e, b, c, False, recompute=True)
    assert back.flops > 2.5 * matmuls  # VJP recomputes the forward: about 3x


def test_buffer_bytes_with_and_without_compression(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    assert P.buffer_bytes(s, 16, 8, 4, False) == 16 * 8 * 4 * 256 * 4
    assert P.buffer_bytes(s, 16, 8, 4, True) == 16 * 8 * 4 * (256 + 4)


def _seed_ma(cfg, m=2):
    from maxjax.perf.planner import seed_layout

    return dataclasses.replace(seed_layout(cfg), microbatches=m)


def test_ma_ping_pong_overlaps_the_pools(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    # Free links and no launch cost: only the programs' own times remain.
    hw = _spec(intra_node_bytes_per_s=1e18, nic_bytes_per_s=1e18, program_overhead_s=0.0)
    metrics, tl = run(s, hw, _seed_ma(tiny_cfg, 2), Work(True, s.batch, s.seq_len))
    attention = [t for t in tl.tasks if t.name.startswith("attention@0")]
    experts = [t for t in tl.tasks if t.name.startswith("experts@12")]
    # Attention of micro-batch 1 runs while the expert pool works on micro-batch 0.
    assert tl.start[attention[1].name] < tl.end[experts[0].name]
    assert tl.end[attention[1].name] > tl.start[experts[0].name]
    for pool in ("attention", "experts"):
        assert 0 < metrics["busy_pool"][pool] <= 1
    assert metrics["tokens_per_s"] == pytest.approx(s.batch * s.seq_len / metrics["time_s"])
    assert metrics["energy_mj_per_token"] > 0


def test_ma_step_moves_buffers_between_the_pools(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    metrics, _ = run(s, _spec(), _seed_ma(tiny_cfg, 2), Work(True, s.batch, s.seq_len))
    crossing = metrics["communication"]["moe_transfer"]
    cap = s.capacity(s.seq_len)
    # one crossing each way per layer, forward and backward: 4 buffers of the whole batch
    per_layer = 4 * P.buffer_bytes(s, s.experts, s.batch, cap, True)
    assert crossing["bytes_per_layer"] == pytest.approx(per_layer, rel=0.1)


def test_compression_shrinks_the_crossing(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    hw = _spec()
    lay = _seed_ma(tiny_cfg)
    work = Work(True, s.batch, s.seq_len)
    on = run(s, hw, dataclasses.replace(lay, compression=True), work)[0]["communication"]
    off = run(s, hw, dataclasses.replace(lay, compression=False), work)[0]["communication"]
    assert on["moe_transfer"]["bytes_per_step"] < 0.3 * off["moe_transfer"]["bytes_per_step"]


def test_pipeline_bubble_ticks(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    hw = _spec()
    one = run(s, hw, BaselineLayout("pp", 1, 2, 8, 1), Work(True, s.batch, s.seq_len))[0]
    four = run(s, hw, BaselineLayout("pp", 1, 2, 8, 4), Work(True, s.batch, s.seq_len))[0]
    # 1 micro-batch: half of the stage-ticks are bubble, 4: 1/5; more micro-batches use
    # smaller programs, so busy fractions are what can be compared.
    assert four["busy_mean"] > 0 and one["busy_mean"] > 0
    assert four["communication"]["pipeline_send"]["bytes_per_step"] > 0


def test_planner_overrides_pass_the_config_and_mark_projected_only(tiny_cfg):
    from maxjax.config import with_overrides
    from maxjax.perf.planner import candidate_layouts, executable, overrides_of, seed_layout

    s = dataclasses.replace(P.Shapes.of(tiny_cfg), batch=64)  # room for data-parallel attention
    ok, _ = executable(tiny_cfg, seed_layout(tiny_cfg))
    assert ok
    back = with_overrides(tiny_cfg, overrides_of(tiny_cfg, seed_layout(tiny_cfg)))
    assert back.ma_separation == tiny_cfg.ma_separation
    layouts = candidate_layouts(s, 16, 4, microbatches=(2,))
    modes = {desc.split()[1] for desc, _ in layouts}
    assert {"head_split", "data_parallel", "per_node"} <= modes
    for desc, lay in layouts:
        runs, why = executable(tiny_cfg, lay)
        assert runs == (lay.attention_groups == 1), (desc, why)


def test_bench_project_writes_all_strategies_and_the_planner(tmp_path, capsys):
    from maxjax.bench import project

    out = tmp_path / "p.json"
    project.main(
        [
            "--config",
            "tiny",
            "--set",
            "model.layers=2",
            "--no-scaling",
            "--planner-microbatches",
            "2",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert 0 < data["flops"]["expert_share"] < 1
    assert [r["strategy"] for r in data["strategies"]] == ["ma", "tp", "pp", "tp_pp"]
    for r in data["strategies"]:
        for key in (
            "train_tokens_per_s",
            "tpot_ms",
            "busy",
            "memory_bytes_max",
            "energy_mj_per_token",
        ):
            assert key in r and r[key] is not None
        assert r["train_tokens_per_s"] > 0 and r["tpot_ms"] > 0
    assert data["planner"]["best"]["train_tokens_per_s"] > 0
    assert "Table 1" in capsys.readouterr().out


def test_measure_gpu_tiny_runs_on_cpu(tmp_path):
    from maxjax.bench import project

    out = tmp_path / "g.json"
    project.main(["--measure-gpu", "--size", "tiny", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["programs"]) >= {"train_step", "attention", "experts", "lm_head"}
    for r in data["programs"].values():
        assert r["measured_s"] > 0 and r["predicted_s"] > 0


def test_costs_are_affine_in_the_batch(tiny_cfg):
    s = P.Shapes.of(tiny_cfg)
    direct = P._compiled("attention", (s, 3, 7, s.seq_len), False)
    extrapolated = P.forward_cost("attention", s, 3, 7, s.seq_len)
    assert extrapolated.flops == pytest.approx(direct.flops, rel=1e-6)
    assert extrapolated.bytes_accessed == pytest.approx(direct.bytes_accessed, rel=0.02)
    direct = P._compiled("experts", (s, 2, 7, 4, False), True)
    extrapolated = P._cost("experts", (s, 2, 7, 4, False), True)
    assert extrapolated.flops == pytest.approx(direct.flops, rel=1e-6)
