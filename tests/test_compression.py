"""int8 quantisation of activations: error bounds, per-row scales, zero rows, straight-through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax import compression


@pytest.mark.parametrize("shape,spread", [((64, 256), 1.0), ((4, 3, 5, 32), 100.0)])
def test_roundtrip_error_is_at_most_half_a_step_per_row(shape, spread):
    key_x, key_s = jax.random.split(jax.random.key(0))
    row_scale = jnp.exp(spread * jax.random.uniform(key_s, shape[:-1] + (1,)) - spread / 2)
    x = jax.random.normal(key_x, shape) * row_scale
    q, scale = compression.quantize_int8(x)
    assert q.dtype == jnp.int8 and q.shape == x.shape
    assert scale.dtype == jnp.float32 and scale.shape == x.shape[:-1]
    back = compression.dequantize_int8(q, scale)
    peak = np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True)
    error = np.abs(np.asarray(back) - np.asarray(x))
    assert np.all(error <= peak / 254 * (1 + 1e-5) + 1e-30)


def test_scale_is_per_row_peak_over_127_and_peak_is_exact():
    x = jnp.array([[1.0, -2.0, 0.5], [300.0, 1.0, -299.0]])
    q, scale = compression.quantize_int8(x)
    np.testing.assert_allclose(np.asarray(scale), [2.0 / 127, 300.0 / 127], rtol=1e-7)
    assert int(q[0, 1]) == -127 and int(q[1, 0]) == 127
    back = compression.dequantize_int8(q, scale)
    np.testing.assert_allclose(float(back[1, 0]), 300.0, rtol=1e-6)


def test_zero_rows_stay_exactly_zero():
    x = jnp.zeros((3, 8)).at[1].set(jnp.arange(8.0))
    q, scale = compression.quantize_int8(x)
    back = np.asarray(compression.dequantize_int8(q, scale))
    assert np.all(np.isfinite(back))
    assert np.all(back[0] == 0) and np.all(back[2] == 0)
    assert np.all(np.asarray(scale)[[0, 2]] == 1.0)


def test_dequantize_casts_to_requested_dtype():
    q, scale = compression.quantize_int8(jnp.ones((2, 4)))
    assert compression.dequantize_int8(q, scale, jnp.bfloat16).dtype == jnp.bfloat16


def test_straight_through_gradient_is_identity():
    x = jax.random.normal(jax.random.key(1), (5, 16))
    weights = jax.random.normal(jax.random.key(2), (5, 16))
    grad = jax.grad(lambda v: jnp.sum(compression.compress_roundtrip(v) * weights))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))
    _, vjp = jax.vjp(compression.compress_roundtrip, x)
    np.testing.assert_array_equal(np.asarray(vjp(weights)[0]), np.asarray(weights))


def test_roundtrip_value_equals_quantize_then_dequantize():
    x = jax.random.normal(jax.random.key(3), (7, 9))
    expected = compression.dequantize_int8(*compression.quantize_int8(x))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(compression.compress_roundtrip)(x)), np.asarray(expected)
    )


def test_compressed_size_is_a_quarter_of_float32_plus_scales():
    shape = (16, 4, 2, 256)
    rows = 16 * 4 * 2
    assert compression.compressed_nbytes(shape) == rows * 256 + 4 * rows
    q, scale = compression.quantize_int8(jnp.ones(shape))
    assert q.nbytes + scale.nbytes == compression.compressed_nbytes(shape)


def test_pack_keeps_every_bit_and_the_byte_count():
    """The packed wire holds q and the scale's exact bits, in compressed_nbytes bytes."""
    x = (
        jax.random.normal(jax.random.key(3), (2, 5, 7, 64))
        * jnp.array([0.0, 1e-30, 3.0, 1e4, 2.0, -5.0, 7.0])[:, None]
    )
    q, scale = compression.quantize_int8(x)
    packed = compression.pack_int8(q, scale)
    assert packed.dtype == jnp.int8 and packed.shape == (2, 5, 7, 64 + compression.SCALE_BYTES)
    assert packed.nbytes == compression.compressed_nbytes(x.shape)
    q2, scale2 = compression.unpack_int8(packed)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q))
    np.testing.assert_array_equal(
        np.asarray(scale2).view(np.uint32), np.asarray(scale).view(np.uint32)
    )
