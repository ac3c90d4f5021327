"""Straightforward references shared by several test files."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from maxjax import model
from maxjax.model import decode


def full_forward_greedy(cfg, params, prompt, max_new_tokens):
    """Argmax of a full forward pass over everything so far, one token at a time.

    Routing is dropless at inference, so the model is causal and the not-yet-generated tail
    can be padded: one compiled program for every step.
    """
    icfg = decode.inference_config(cfg)
    forward = jax.jit(lambda p, t: model.apply(icfg, p, t)[0])
    batch, prompt_len = prompt.shape
    tokens = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), prompt.dtype)], axis=1)
    for t in range(prompt_len, prompt_len + max_new_tokens):
        logits = forward(params, tokens)
        tokens = tokens.at[:, t].set(jnp.argmax(logits[:, t - 1], -1))
    return np.asarray(tokens)


BFLOAT16_STEP = 2.0**-8
"""Spacing of bfloat16 numbers relative to their size (8 significant bits): one rounding moves a
value by up to half of it, a value computed in another order in float32 by one step when it
lands on the other side of a rounding boundary."""


def dot_flops_by_dtype(stablehlo: str) -> dict[tuple[str, str], int]:
    """Flops of the `stablehlo.dot_general` ops of a lowered program, by operand element types.

    Flops of one product: 2 x (elements of the result) x (size of the contracted dimensions)."""
    pattern = re.compile(
        r"stablehlo\.dot_general[^\n]*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\]"
        r"[^\n]*?: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>"
    )
    flops: dict[tuple[str, str], int] = {}
    for contracting, lhs, rhs, out in pattern.findall(stablehlo):
        lhs_dims = lhs.split("x")
        dims = [int(lhs_dims[int(i)]) for i in contracting.replace(" ", "").split(",") if i]
        size = math.prod(int(d) for d in out.split("x")[:-1])
        key = (lhs_dims[-1], rhs.split("x")[-1])
        flops[key] = flops.get(key, 0) + 2 * size * math.prod(dims)
    return flops


def bfloat16_flop_fraction(*lowered: jax.stages.Lowered) -> float:
    """Share of the matmul flops of lowered programs whose operands are both bfloat16."""
    flops: dict[tuple[str, str], int] = {}
    for program in lowered:
        for key, value in dot_flops_by_dtype(program.as_text()).items():
            flops[key] = flops.get(key, 0) + value
    return flops.get(("bf16", "bf16"), 0) / sum(flops.values())
