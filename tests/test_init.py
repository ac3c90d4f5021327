"""Initialisation builds every shard where it lives: each device generates only its own units,
and the values equal the single-device model's."""

import jax
import numpy as np
import pytest

from maxjax import model
from maxjax.model import InitUnits
from maxjax.parallel import make_runner
from maxjax.parallel.runner import merge, tree_paths


def per_device_bytes(abstract: dict) -> dict:
    """{device: bytes of its shards} of abstract arrays with shardings."""
    out: dict = {}
    for leaf in jax.tree.leaves(abstract):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = int(np.prod(shard)) * leaf.dtype.itemsize
        for device in leaf.sharding.device_set:
            out[device] = out.get(device, 0) + nbytes
    return out


def whole_bytes(abstract: dict) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


@pytest.fixture(scope="module")
def canonical(tiny_cfg):
    """The single-device model's parameters of seed 0 (numpy)."""
    return jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(tiny_cfg, 0))())


def test_units_equal_the_full_leaves_and_padding_is_zero(tiny_cfg, canonical):
    cfg, full = tiny_cfg, canonical
    vocab, d = cfg.training.vocab_size, cfg.model.head_dim
    units = InitUnits(
        experts=np.array([5, 2]), heads=np.array([3, -1, 31]), vocab=np.array([7, vocab - 1, vocab])
    )
    part = jax.tree.map(np.asarray, jax.jit(lambda: model.init_params(cfg, 0, units))())
    layer, ref = part["layers"][1], full["layers"][1]
    for name in ("wi", "wo"):
        want = ref["moe"]["experts"][name][[5, 2]]
        np.testing.assert_array_equal(layer["moe"]["experts"][name], want)
    for name in ("query", "key", "value"):
        got, want = layer["attention"][name]["kernel"], ref["attention"][name]["kernel"]
        np.testing.assert_array_equal(got[:, :d], want[:, 3 * d : 4 * d])
        np.testing.assert_array_equal(got[:, 2 * d :], want[:, 31 * d :])
        assert not got[:, d : 2 * d].any()
    got, want = layer["attention"]["out"]["kernel"], ref["attention"]["out"]["kernel"]
    np.testing.assert_array_equal(got[:d], want[3 * d : 4 * d])
    assert not got[d : 2 * d].any()
    np.testing.assert_array_equal(
        part["embed"]["embedding"][:2], full["embed"]["embedding"][[7, -1]]
    )
    np.testing.assert_array_equal(
        part["lm_head"]["kernel"][:, :2], full["lm_head"]["kernel"][:, [7, -1]]
    )
    assert not part["embed"]["embedding"][2].any() and not part["lm_head"]["kernel"][:, 2].any()
    np.testing.assert_array_equal(layer["moe"]["router"]["kernel"], ref["moe"]["router"]["kernel"])


def test_unit_draws_have_the_initializers_scale(tiny_cfg, canonical):
    """Each unit is drawn with the whole matrix's fan-in: std 1/sqrt(fan-in) for the LeCun
    kernels and the LM head, M^-1/2 and H^-1/2 for the experts, 0.02 for the embedding (sample
    std of at least 65k draws: within 2% of the target)."""
    cfg = tiny_cfg
    m, h = cfg.model.hidden_dim, cfg.moe.expert_hidden_dim
    width = cfg.model.attention_heads * cfg.model.head_dim
    params = canonical
    layer = params["layers"][0]
    expected = {
        "query": (layer["attention"]["query"]["kernel"], m**-0.5),
        "out": (layer["attention"]["out"]["kernel"], width**-0.5),
        "wi": (layer["moe"]["experts"]["wi"], m**-0.5),
        "wo": (layer["moe"]["experts"]["wo"], h**-0.5),
        "embed": (params["embed"]["embedding"], 0.02),
        "lm_head": (params["lm_head"]["kernel"], m**-0.5),
    }
    for name, (values, std) in expected.items():
        assert abs(float(np.std(values)) / std - 1) < 0.02, name


def _check_program(compiled, abstract, pool_bytes):
    """Output bytes per device are exactly its shard; temporaries at most one shard more.
    The whole pool (what a device generated before) is several times larger."""
    memory = compiled.memory_analysis()
    shard = max(per_device_bytes(abstract).values())
    assert memory.output_size_in_bytes == pytest.approx(shard, rel=1e-3)
    assert memory.temp_size_in_bytes <= shard
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes <= pool_bytes / 2
    return memory


def test_ma_init_generates_each_devices_shard_only(tiny_cfg, canonical):
    runner = make_runner(tiny_cfg, "ma")
    built = []
    for pool, abstract in runner.split_pools(runner.abstract_params()).items():
        compiled = runner.init_program(pool, 0).lower().compile()
        _check_program(compiled, abstract, whole_bytes(abstract))
        built.append(compiled())
    for (path, got), (_, want) in zip(
        tree_paths(runner.gather(merge(*built))), tree_paths(canonical), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=".".join(path))


def test_baseline_init_generates_each_devices_shard_only(tiny_cfg):
    """TP x PP: each device builds its stage's layers, its tensor slice of heads and experts and
    its vocabulary rows (values: tests/test_baselines.py)."""
    runner = make_runner(tiny_cfg, "tp_pp")
    compiled = runner.init_program(0).lower().compile()
    _check_program(compiled, runner.abstract_params(), whole_bytes(model.abstract_params(tiny_cfg)))
