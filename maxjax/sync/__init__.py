"""Keeping the attention and expert pools in balance (seed section 4.3, "synchronization").

`predictor`: a 3-layer MLP from stage features to stage times, refit on measured times, and the
linear least-squares model it is scored against on held-out measurements.
`balancer`: measures imbalance and plans a new expert placement per layer (`plan_placement`)
where it exceeds `load_balancing_threshold`, and the ping-pong time of a micro-batch count
(`pingpong_layer_time`). Both are pure functions of arrays.
`measure`: stage times and their features from a profiler trace of a training step.
`loop`: the training run's sync loop (`SyncLoop`): measure a step, score and refit the models,
re-place the experts of layers out of balance.
"""

from maxjax.sync.balancer import (
    device_load_rows,
    imbalance,
    pingpong_layer_time,
    plan_placement,
    rebalance_experts,
)
from maxjax.sync.predictor import (
    LinearTimeModel,
    Predictor,
    fit,
    fit_linear,
    held_out_scores,
    init_predictor,
    mape,
    predict,
    predict_linear,
)

__all__ = [
    "LinearTimeModel",
    "Predictor",
    "device_load_rows",
    "fit",
    "fit_linear",
    "held_out_scores",
    "imbalance",
    "init_predictor",
    "mape",
    "pingpong_layer_time",
    "plan_placement",
    "predict",
    "predict_linear",
    "rebalance_experts",
]
