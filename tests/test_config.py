"""Config loading: the seed's values, overrides, and one failing example per rule."""

import pytest

from maxjax.config import ConfigError, load_config, with_overrides


def test_paper_config_equals_the_seed(paper_cfg):
    c = paper_cfg
    assert (c.model.layers, c.model.hidden_dim, c.model.attention_heads, c.model.head_dim) == (
        4,
        4096,
        32,
        128,
    )
    assert c.model.type == "MoE Transformer"
    m = c.moe
    assert (m.experts_per_layer, m.expert_hidden_dim, m.top_k, m.capacity_factor) == (
        16,
        16384,
        2,
        1.0,
    )
    assert (m.load_balancing_loss, m.router_z_loss, m.expert_dropout) == (0.01, 0.001, 0.1)
    assert (c.sequence.length, c.sequence.batch_size, c.sequence.total_tokens_per_batch) == (
        2048,
        1024,
        2_097_152,
    )
    h = c.hardware
    assert (h.total_gpus, h.gpu_type, h.gpu_memory) == (16, "NVIDIA A100 80GB", "80GB HBM2e")
    assert h.interconnect.intra_node == "NVLink 3.0 (600 GB/s)"
    assert h.interconnect.inter_node == "InfiniBand HDR (200 Gb/s)"
    assert c.nodes.architecture == "4 nodes × 4 GPUs"
    assert (c.nodes.cpu, c.nodes.system_memory) == ("AMD EPYC 7763 64-Core", "1TB DDR4")
    assert dict(c.nodes.gpu_mapping) == {
        f"node_{i}": tuple(range(4 * i, 4 * i + 4)) for i in range(4)
    }
    a = c.ma_separation.attention
    assert a.gpus == 12 and a.devices == tuple(range(12))
    assert a.head_distribution == (3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2)
    assert a.replication_factor == 2
    p = c.ma_separation.moe
    assert p.gpus == 4 and p.devices == (12, 13, 14, 15) and p.experts_per_gpu == 4
    assert dict(p.expert_mapping) == {
        "gpu_12": (0, 1, 2, 3),
        "gpu_13": (4, 5, 6, 7),
        "gpu_14": (8, 9, 10, 11),
        "gpu_15": (12, 13, 14, 15),
    }
    s = c.ma_separation.synchronization
    assert (
        s.time_prediction_model,
        s.sync_interval,
        s.load_balancing_threshold,
        s.communication_compression,
    ) == ("3-layer MLP", 100, 0.05, "8-bit quantization")
    t = c.training
    assert (t.dataset, t.validation_split, t.vocab_size) == (
        "C4 (Colossal Clean Crawled Corpus)",
        0.1,
        50265,
    )
    o = c.optimizer
    assert (o.type, o.learning_rate, o.betas, o.weight_decay, o.gradient_clipping) == (
        "AdamW",
        1e-4,
        (0.9, 0.95),
        0.1,
        1.0,
    )
    assert (c.schedule.warmup_steps, c.schedule.total_steps, c.schedule.decay) == (
        5000,
        50000,
        "cosine",
    )
    assert (c.validation.perplexity, c.validation.convergence_speed) == (12.8, 23)


def test_tiny_keeps_the_paper_structure(paper_cfg, tiny_cfg):
    for get in [
        lambda c: c.model.layers,
        lambda c: c.model.attention_heads,
        lambda c: c.moe.experts_per_layer,
        lambda c: c.moe.top_k,
        lambda c: c.moe.capacity_factor,
        lambda c: c.ma_separation.attention.devices,
        lambda c: c.ma_separation.moe.devices,
        lambda c: c.ma_separation.attention.head_distribution,
        lambda c: c.ma_separation.moe.expert_mapping,
        lambda c: c.training.vocab_size,
    ]:
        assert get(paper_cfg) == get(tiny_cfg)
    assert tiny_cfg.model.hidden_dim < paper_cfg.model.hidden_dim
    assert tiny_cfg.to_dict().keys() == paper_cfg.to_dict().keys()


def test_overrides_parse_yaml_values(paper_cfg):
    c = with_overrides(
        paper_cfg,
        [
            "moe.top_k=1",
            "ma_separation.attention.head_distribution=[3,3,3,3,3,3,3,3,3,3,1,1]",
            "optimizer.learning_rate=3e-4",
        ],
    )
    assert c.moe.top_k == 1
    assert c.ma_separation.attention.head_distribution[-1] == 1
    assert c.optimizer.learning_rate == 3e-4
    assert load_config("configs/tiny.yaml", ["moe.top_k=1"]).moe.top_k == 1


def test_config_is_hashable_and_round_trips(paper_cfg):
    from maxjax.config import config_from_dict

    assert hash(paper_cfg) == hash(config_from_dict(paper_cfg.to_dict()))
    assert config_from_dict(paper_cfg.to_dict()) == paper_cfg


BAD = [
    ("moe.topk=2", "moe.topk", "unknown key"),
    ("modle.layers=2", "modle", "unknown key"),
    ("model.layers=four", "model.layers", "integer"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate", "number"),
    ("model.hidden_dim=4100", "model.hidden_dim", "divisible"),
    ("model.layers=0", "model.layers", "positive"),
    ("sequence.batch_size=-1", "sequence.batch_size", "positive"),
    (
        "ma_separation.attention.head_distribution=[3,3,3,3,3,3,3,3,3,3,3,3]",
        "ma_separation.attention.head_distribution",
        "sum",
    ),
    (
        "ma_separation.attention.head_distribution=[4,4,4,4,4,4,4,4]",
        "ma_separation.attention.head_distribution",
        "one entry per attention device",
    ),
    (
        "ma_separation.moe.expert_mapping.gpu_12=[0,1,2,4]",
        "ma_separation.moe.expert_mapping",
        "partition",
    ),
    (
        "ma_separation.moe.expert_mapping.gpu_12=[0,1,2]",
        "ma_separation.moe.expert_mapping.gpu_12",
        "experts_per_gpu",
    ),
    (
        "ma_separation.moe.experts_per_gpu=3",
        "ma_separation.moe.experts_per_gpu",
        "experts_per_layer",
    ),
    ("ma_separation.moe.devices=[11,13,14,15]", "ma_separation.moe.devices", "overlap"),
    (
        "ma_separation.attention.gpus=11;ma_separation.attention.devices=[0,1,2,3,4,5,6,7,8,9,10];"
        "ma_separation.attention.head_distribution=[3,3,3,3,3,3,3,3,3,3,2]",
        "ma_separation.moe.gpus",
        "add up",
    ),
    ("hardware.total_gpus=20", "nodes.gpu_mapping", "every device"),
    ("moe.top_k=0", "moe.top_k", "1..experts_per_layer"),
    ("moe.top_k=17", "moe.top_k", "1..experts_per_layer"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate", "positive"),
    ("optimizer.learning_rate=-1e-4", "optimizer.learning_rate", "positive"),
    (
        "ma_separation.synchronization.communication_compression=4-bit",
        "ma_separation.synchronization.communication_compression",
        "one of",
    ),
]


@pytest.mark.parametrize("override,key,rule", BAD, ids=[b[0][:60] for b in BAD])
def test_invalid_configs_name_key_and_rule(paper_cfg, override, key, rule):
    with pytest.raises(ConfigError) as err:
        with_overrides(paper_cfg, override.split(";"))
    assert err.value.key == key
    assert rule in err.value.rule
    assert key in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    partial = tmp_path / "partial.yaml"
    partial.write_text("model:\n  layers: 2\n")
    with pytest.raises(ConfigError, match="required"):
        load_config(partial)
