"""The MoE transformer: NNX modules (`transformer`) over pure functions (`ops`)."""

from maxjax.model.ops import AttentionWeights, Routing, RoutingAux
from maxjax.model.transformer import (
    InitUnits,
    MoETransformer,
    Params,
    abstract_params,
    apply,
    bind,
    compute_dtype,
    group_capacity,
    init_params,
    loss_fn,
    loss_from_parts,
    loss_terms,
)

__all__ = [
    "AttentionWeights",
    "InitUnits",
    "MoETransformer",
    "Params",
    "Routing",
    "RoutingAux",
    "abstract_params",
    "apply",
    "bind",
    "compute_dtype",
    "group_capacity",
    "init_params",
    "loss_fn",
    "loss_from_parts",
    "loss_terms",
]
