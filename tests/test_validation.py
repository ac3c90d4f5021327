"""Validation's loss through `runner.loss`: the value of the cross-entropy of the full logits, and
programs that never hold a vocabulary-sized axis (the logits stay split over the vocabulary)."""

import re

import jax
import numpy as np
import pytest

from maxjax import model
from maxjax.config import with_overrides
from maxjax.evaluate import validation_loss
from maxjax.model import ops
from maxjax.parallel import make_runner


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return with_overrides(tiny_cfg, ["model.layers=2"])


@pytest.fixture(scope="module")
def batches(cfg):
    shape = (cfg.sequence.batch_size, cfg.sequence.length + 1)
    keys = jax.random.split(jax.random.key(3), 2)
    return [np.asarray(jax.random.randint(k, shape, 0, 50257)) for k in keys]


def largest_dimension(hlo: str) -> int:
    """The largest dimension of any array shape in a compiled program's HLO text."""
    shapes = re.findall(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]+)\]", hlo)
    return max((int(d) for shape in shapes for d in shape.split(",")), default=0)


def compiled_text(program, *args) -> str:
    return program.lower(*args).compile().as_text()


@pytest.mark.parametrize("strategy", ["ma", "tp"])
def test_validation_loss_equals_full_logits_cross_entropy(cfg, batches, strategy, monkeypatch):
    runner = make_runner(cfg, strategy)
    params = runner.from_canonical(jax.jit(lambda: model.init_params(cfg, 0))())
    full_logits = [
        float(ops.cross_entropy(runner.forward(params, b[:, :-1]), b[:, 1:])) for b in batches
    ]
    want = float(np.mean(full_logits))
    assert abs(validation_loss(runner, params, batches) - want) <= 1e-5 * want

    # No program of the new path has an axis as long as the vocabulary; the forward's does.
    vocab = cfg.training.vocab_size
    tokens = batches[0]
    if strategy == "ma":
        ran = []
        run = runner._run
        monkeypatch.setattr(runner, "_run", lambda p, *a: ran.append((p, a)) or run(p, *a))
        runner.loss(params, tokens)
        assert len(ran) == (cfg.model.layers * 2 + 1) * runner.microbatches + 1
        texts = [compiled_text(program, *args) for program, args in ran]
        runner.forward(params, tokens[:, :-1])
        forward = [compiled_text(p, *a) for p, a in ran[-runner.microbatches :]]
    else:
        texts = [compiled_text(runner._lm_loss, params, tokens)]
        forward = [compiled_text(runner._forward, params, tokens[:, :-1])]
    assert max(largest_dimension(t) for t in texts) < vocab
    assert max(largest_dimension(t) for t in forward) >= vocab
