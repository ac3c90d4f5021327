"""Keeping the attention and expert pools in balance (seed section 4.3, "synchronization").

`predictor`: a 3-layer MLP from stage features to stage times, refit on measured times.
`balancer`: measures imbalance and proposes a new expert placement and micro-batch count when it
exceeds `load_balancing_threshold`. Both are pure functions of arrays.
"""

from maxjax.sync.balancer import (
    SyncPlan,
    choose_microbatches,
    device_loads,
    imbalance,
    pingpong_layer_time,
    plan,
    rebalance_experts,
)
from maxjax.sync.predictor import Predictor, fit, init_predictor, predict

__all__ = [
    "Predictor",
    "SyncPlan",
    "choose_microbatches",
    "device_loads",
    "fit",
    "imbalance",
    "init_predictor",
    "pingpong_layer_time",
    "plan",
    "predict",
    "rebalance_experts",
]
