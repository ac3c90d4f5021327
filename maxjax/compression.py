"""8-bit communication compression of activations between the device pools, as pure functions.

Every row (one token's vector along the last axis) is scaled so that its largest magnitude maps
to 127 and rounded to int8; the scale (float32, one per row) travels with it. A zero row gets
scale 1 and stays exactly zero. Round-trip error per element is at most half a quantisation step,
``max|row| / 254``.

The gradient of the round trip is taken as the identity (straight-through estimator): MA
separation quantises the forward activations only, and the backward pass sends float cotangents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

INT8_MAX = 127.0
SCALE_BYTES = 4


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q int8 like x, scale float32 x.shape[:-1]) with x ~= q * scale[..., None]."""
    x32 = x.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(peak > 0, peak / INT8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Inverse of `quantize_int8` up to rounding: q * scale[..., None] in `dtype`."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def pack_int8(q: jax.Array, scale: jax.Array) -> jax.Array:
    """One int8 array [..., M + 4]: each row's values followed by the four bytes of its float32
    scale, so a compressed buffer moves between devices as one copy instead of two."""
    return jnp.concatenate([q, lax.bitcast_convert_type(scale, jnp.int8)], axis=-1)


def unpack_int8(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pack_int8`, bit for bit: (q [..., M], scale float32 [...])."""
    q = packed[..., :-SCALE_BYTES]
    return q, lax.bitcast_convert_type(packed[..., -SCALE_BYTES:], jnp.float32)


@jax.custom_vjp
def compress_roundtrip(x: jax.Array) -> jax.Array:
    """x after quantise + dequantise, with the identity as its gradient (straight-through)."""
    return dequantize_int8(*quantize_int8(x), x.dtype)


def _roundtrip_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return compress_roundtrip(x), None


def _roundtrip_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (g,)


compress_roundtrip.defvjp(_roundtrip_fwd, _roundtrip_bwd)


def compressed_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of `quantize_int8` (or its `pack_int8`) of an array of `shape`: one byte per element,
    4 per row."""
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * shape[-1] + SCALE_BYTES * rows
