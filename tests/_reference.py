"""Straightforward references shared by several test files."""

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
