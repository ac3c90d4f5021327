"""Stage-time models, as pure functions: the seed's 3-layer MLP and a linear model beside it.

Features describe one step of a stage (tokens each expert device receives, micro-batch size,
sequence length, heads per attention device, ...); targets are measured stage times. For the MLP
both are log-scaled and standardised, so the small network fits times that span orders of
magnitude. The linear model is the least-squares cost model that MegaScale-Infer and FasterMoE
use (time = features . weights + bias); a decision uses the MLP only where, scored on
measurements neither model was fitted on, it does at least as well (`held_out_scores`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Predictor(NamedTuple):
    """MLP weights and the feature / target normalisation fitted with them."""

    layers: tuple[tuple[jax.Array, jax.Array], ...]  # ((w, b), ...) for 3 dense layers
    feature_mean: jax.Array
    feature_std: jax.Array
    target_mean: jax.Array
    target_std: jax.Array


def init_predictor(
    key: jax.Array, num_features: int, num_outputs: int = 1, hidden: int = 32
) -> Predictor:
    """A 3-layer MLP (features -> hidden -> hidden -> outputs) with identity normalisation."""
    sizes = (num_features, hidden, hidden, num_outputs)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = tuple(
        (jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in), jnp.zeros((n_out,)))
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    )
    return Predictor(
        layers,
        jnp.zeros((num_features,)),
        jnp.ones((num_features,)),
        jnp.zeros((num_outputs,)),
        jnp.ones((num_outputs,)),
    )


def _mlp(layers: tuple, x: jax.Array) -> jax.Array:
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = jax.nn.gelu(x)
    return x


def _log_features(x: jax.Array) -> jax.Array:
    return jnp.log1p(jnp.maximum(x.astype(jnp.float32), 0.0))


def _log_times(t: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(t.astype(jnp.float32), 1e-9))


# Standardised features are clipped to this many standard deviations: a feature far outside the
# fitted range (or one that was constant in the fit) would otherwise drive the small network
# into extrapolation, and the exponential of its output into times wrong by orders of magnitude.
FEATURE_CLIP = 3.0


def predict(predictor: Predictor, features: jax.Array) -> jax.Array:
    """Predicted times [N, outputs] for features [N, F] (same units as the fitted targets)."""
    z = (_log_features(features) - predictor.feature_mean) / predictor.feature_std
    z = jnp.clip(z, -FEATURE_CLIP, FEATURE_CLIP)
    log_t = _mlp(predictor.layers, z) * predictor.target_std + predictor.target_mean
    return jnp.exp(log_t)


def fit(
    predictor: Predictor,
    features: jax.Array,
    times: jax.Array,
    steps: int = 500,
    learning_rate: float = 1e-2,
    weights: jax.Array | None = None,
) -> tuple[Predictor, jax.Array]:
    """Refit on measured (features [N, F], times [N, outputs]); returns (predictor, final loss).

    Mean squared error in normalised log-time, full-batch Adam for `steps` steps. `weights` [N]
    (default all 1) weigh the samples in the normalisation and the loss; a weight of 0 leaves a
    row out, so a caller can pad its samples to one shape and compile the fit once.
    """
    log_f, log_t = _log_features(features), _log_times(times)
    w = jnp.ones(log_f.shape[0]) if weights is None else weights.astype(jnp.float32)
    w = (w / jnp.sum(w))[:, None]

    def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = jnp.sum(w * x, 0)
        return mean, jnp.sqrt(jnp.sum(w * jnp.square(x - mean), 0)) + 1e-6

    (f_mean, f_std), (t_mean, t_std) = moments(log_f), moments(log_t)
    z, y = (log_f - f_mean) / f_std, (log_t - t_mean) / t_std
    tx = optax.adam(learning_rate)

    def loss_fn(layers: tuple) -> jax.Array:
        return jnp.sum(w * jnp.square(_mlp(layers, z) - y)) / y.shape[1]

    def step(carry, _):
        layers, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(layers)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(layers, updates), opt_state), loss

    (layers, _), losses = jax.lax.scan(
        step, (predictor.layers, tx.init(predictor.layers)), None, length=steps
    )
    return Predictor(layers, f_mean, f_std, t_mean, t_std), losses[-1]


fit = jax.jit(fit, static_argnames=("steps",))


class LinearTimeModel(NamedTuple):
    """time = features @ weights + bias, per output; fitted by least squares in float64."""

    weights: np.ndarray  # [F, outputs]
    bias: np.ndarray  # [outputs]


def fit_linear(features: np.ndarray, times: np.ndarray) -> LinearTimeModel:
    """Least-squares fit of times [N, outputs] on features [N, F]. Columns are scaled to unit
    range first, so features of very different magnitudes (tokens, heads) do not lose precision."""
    x = np.asarray(features, np.float64)
    t = np.asarray(times, np.float64)
    scale = np.maximum(np.abs(x).max(0), 1e-12)
    design = np.concatenate([x / scale, np.ones((x.shape[0], 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, t, rcond=None)
    return LinearTimeModel(solution[:-1] / scale[:, None], solution[-1])


def predict_linear(model: LinearTimeModel, features: np.ndarray) -> np.ndarray:
    """Predicted times [N, outputs] for features [N, F]; a time is never negative."""
    return np.maximum(np.asarray(features, np.float64) @ model.weights + model.bias, 0.0)


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error of predicted against measured times (a fraction)."""
    measured = np.asarray(measured, np.float64)
    return float(np.mean(np.abs(np.asarray(predicted, np.float64) - measured) / measured))


def held_out_scores(
    predictor: Predictor, linear: LinearTimeModel, features: np.ndarray, times: np.ndarray
) -> dict[str, float | str]:
    """Both models scored on measurements they were not fitted on: `predictor_mape`,
    `linear_mape`, and `decided_by`, the model a decision uses (the MLP where it does at least
    as well as the linear model)."""
    mlp = mape(np.asarray(predict(predictor, jnp.asarray(features, jnp.float32))), times)
    lin = mape(predict_linear(linear, features), times)
    return {
        "predictor_mape": mlp,
        "linear_mape": lin,
        "decided_by": "predictor" if mlp <= lin else "linear",
    }
