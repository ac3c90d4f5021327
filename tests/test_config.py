"""Config loading: the seed's values, overrides, inheritance, and one failing example per rule."""

import re
from pathlib import Path

import pytest
import yaml

from maxjax import config
from maxjax.config import ConfigError, load_config, with_overrides

REPO = Path(__file__).resolve().parent.parent


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
    ("nodes.gpu_mapping.gpu_3=[16]", "nodes.gpu_mapping.gpu_3", "unknown node name"),
    (
        "nodes.gpu_mapping={node_0: [0,1,2,3,4,5], node_1: [6,7], node_2: [8,9,10,11], "
        "node_3: [12,13,14,15]}",
        "nodes.gpu_mapping",
        "same number of devices",
    ),
    ("ma_separation.microbatches=3", "ma_separation.microbatches", "must divide"),
    ("moe.top_k=0", "moe.top_k", "1..experts_per_layer"),
    ("moe.top_k=17", "moe.top_k", "1..experts_per_layer"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate", "positive"),
    ("optimizer.learning_rate=-1e-4", "optimizer.learning_rate", "positive"),
    (
        "ma_separation.synchronization.communication_compression=4-bit",
        "ma_separation.synchronization.communication_compression",
        "one of",
    ),
    ("training.seed=99999999999999999999", "training.seed", "must be in 0..4294967295"),
    ("training.seed=4294967296", "training.seed", "must be in 0..4294967295"),
    ("training.seed=-1", "training.seed", "must be in 0..4294967295"),
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
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_tiny_states_only_what_differs_from_paper(paper_cfg, tiny_cfg):
    text = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert text.pop("base") == "paper.yaml"
    paper = config._flat(paper_cfg.to_dict())
    tiny = config._flat(tiny_cfg.to_dict())
    stated = config._flat(text)
    assert stated and all(stated[k] != paper[k] for k in stated), "tiny.yaml repeats paper values"
    assert {k for k in tiny if tiny[k] != paper[k]} == set(stated)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bases_chain_and_errors_name_the_file(tmp_path):
    paper = (REPO / "configs" / "paper.yaml").resolve()
    _write(tmp_path / "middle.yaml", f"base: {paper}\nmodel:\n  layers: 2\n")
    child = _write(tmp_path / "child.yaml", "base: middle.yaml\nschedule:\n  total_steps: 9000\n")
    cfg, sources = config.load_config_with_sources(child)
    assert cfg.model.layers == 2 and cfg.schedule.total_steps == 9000
    assert cfg.model.hidden_dim == 4096 and cfg.schedule.warmup_steps == 5000
    assert sources["model.layers"].endswith("middle.yaml")
    assert sources["schedule.total_steps"].endswith("child.yaml")
    assert sources["model.hidden_dim"].endswith("paper.yaml")

    bad = _write(tmp_path / "bad.yaml", "base: middle.yaml\nmodel:\n  layers: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config key 'model.layers': must be positive"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"--set: config key 'model.layers': must be positive"):
        load_config(child, ["model.layers=0"])
    assert load_config(child, ["ma_separation.synchronization.sync_interval=0"])  # loop off
    with pytest.raises(ConfigError, match=r"sync_interval': must be non-negative"):
        load_config(child, ["ma_separation.synchronization.sync_interval=-1"])
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: config key 'base': the bases form a cycle"):
        load_config(tmp_path / "a.yaml")
    orphan = _write(tmp_path / "orphan.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan.yaml: config key 'base': base file .* does not"):
        load_config(orphan)


def test_config_command_prints_values_with_their_source(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert config.main(["configs/tiny.yaml", "--set", "training.seed=3"]) == 0
    lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert re.search(r"model.hidden_dim: 256 +# configs/tiny.yaml$", lines["model.hidden_dim"])
    assert re.search(r"model.layers: 4 +# configs/paper.yaml$", lines["model.layers"])
    assert re.search(r"training.seed: 3 +# --set$", lines["training.seed"])
    for key in (k for k in config.key_docs() if not _is_section(k)):
        assert key in lines or any(k.startswith(f"{key}.") for k in lines), key
    assert config.main(["configs"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_config_command_refuses_bad_yaml_in_set_with_one_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert config.main(["configs/tiny.yaml", "--set", "training.seed=4294967295"]) == 0
    capsys.readouterr()
    assert config.main(["configs/tiny.yaml", "--set", "model.layers=[1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("maxjax.config: error: --set: config key 'model.layers': value '[1' ")
    assert "is not valid YAML (while parsing a flow sequence" in err


def _is_section(key: str) -> bool:
    return any(other.startswith(f"{key}.") for other in config.key_docs())


def _documented_keys(markdown: str) -> set[str]:
    """Dotted keys of the tables of tutorials/configs.md (section from the latest heading)."""
    keys, section = set(), None
    for line in markdown.splitlines():
        if line.startswith("#"):
            found = re.search(r"`([a-z_.]+)`", line)
            section = found.group(1) if found else None
        elif section and (row := re.match(r"\| `([a-z_.0-9]+)` \|", line)):
            keys.add(f"{section}.{row.group(1)}")
    return keys


def test_every_key_has_its_meaning_in_config_py_and_in_the_tutorial():
    docs = config.key_docs()
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    leaves = {k for k in docs if not _is_section(k)}
    markdown = (REPO / "tutorials" / "configs.md").read_text()
    assert _documented_keys(markdown) == leaves


def test_capacity_factor_is_positive_or_null_for_dropless():
    assert (
        load_config("configs/tiny.yaml", ["moe.capacity_factor=null"]).moe.capacity_factor is None
    )
    with pytest.raises(ConfigError, match=r"'moe.capacity_factor': must be positive, or null"):
        load_config("configs/tiny.yaml", ["moe.capacity_factor=0"])


def test_expert_compute_is_filled_slots_or_capacity():
    assert load_config("configs/paper.yaml").ma_separation.expert_compute == "capacity"
    filled = load_config("configs/tiny.yaml", ["ma_separation.expert_compute=filled_slots"])
    assert filled.ma_separation.expert_compute == "filled_slots"
    with pytest.raises(ConfigError, match=r"'ma_separation.expert_compute': must be one of"):
        load_config("configs/tiny.yaml", ["ma_separation.expert_compute=sparse"])


def test_attention_failover_is_a_spare_expert_device_or_the_standby():
    cfg = load_config("configs/paper.yaml")
    assert cfg.ma_separation.attention.failover == "spare_expert_device"
    standby = load_config("configs/tiny.yaml", ["ma_separation.attention.failover=standby"])
    assert standby.ma_separation.attention.failover == "standby"
    with pytest.raises(ConfigError, match=r"'ma_separation.attention.failover': must be one of"):
        load_config("configs/tiny.yaml", ["ma_separation.attention.failover=restart"])
