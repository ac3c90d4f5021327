"""MoE-Attention separation: attention on one device pool, experts on another.

Layout (which device holds what; `layout.py`)
---------------------------------------------
The config names two disjoint device lists (indices into ``jax.devices()``):

- the *attention pool*, ``ma_separation.attention.devices`` (A = 12 devices), holds every
  non-expert parameter:

  * the query/key/value kernels ``[M, N*D]`` are stored padded as ``[M, A*n_max*D]`` and split
    by columns: attention device ``a`` holds ``head_distribution[a]`` real heads (the next heads
    in order) followed by zero *padded head slots* up to ``n_max = max(head_distribution)``
    (32 heads over [3]*8 + [2]*4: every device holds 3 slots, the last four one of them padded).
    The output kernel ``[N*D, M]`` is padded and split by rows the same way. A head mask zeroes
    the padded slots' context, so they never change a result and their gradient is exactly zero;
  * the embedding ``[V, M]`` and the LM head ``[M, V]`` are padded to a multiple of the pool
    size along the vocabulary and split over it (`maxjax.parallel.vocab`);
  * the norms and the router are replicated.

- the *expert pool*, ``ma_separation.moe.devices`` (J = 4 devices), holds the expert weights and
  nothing else: every layer's ``wi [E, M, H]`` and ``wo [E, H, M]`` with the experts permuted
  into *expert-device order* (the experts of ``expert_mapping['gpu_12']`` first, then ``gpu_13``,
  ...) and split along that axis, so expert device j holds exactly its E/J experts (after an
  expert device failed, ceil(E/J) slots each, the extra ones empty: `failover.py`). The order
  is per layer (`ExpertOrder`, [L, R]) and an argument of the stage programs, not a compiled
  constant: the sync loop re-places a layer's experts (`MARunner.move_experts`) without
  recompiling, and checkpoints store the order in use.

The parameter tree keeps the single-device model's nested keys; `to_canonical` /
`from_canonical` undo / apply the padding and permutation leaf by leaf.

A layer's step for one micro-batch of b sequences (`stages.py`)
----------------------------------------------------------------
The token-wise parts of a layer (norms, router, dispatch, combine, residual) are
*sequence-parallel*: the attention pool is viewed as a (SEQ = G) x (REP = R) mesh, G the largest
divisor of A that divides b (`layout.TokenSplit`), and each device handles the b/G sequences of
its sequence shard (the R devices of a shard identically). Attention is head-parallel over all A
devices:

1. *Attention stage* (a jitted ``shard_map`` on the attention pool): combine the previous layer's
   expert outputs of this shard's tokens and add the residual; RMSNorm; all-gather the normed
   activations over SEQ (every device now sees the whole micro-batch); attention of this device's
   heads; reduce-scatter the partial outputs over SEQ and all-reduce over REP (each shard gets the
   sum over all heads of its own tokens), add the residual; RMSNorm, router and capacity dispatch
   of the shard's sequences into its buffer ``[E, b/G, C, M]``, cut into one *piece* per expert
   device (int8 with one float32 scale per row, packed into one int8 buffer, when
   ``communication_compression`` is ``8-bit quantization``).
2. *To the experts* (`transport.py`): piece (j, s) goes from one replica of shard s straight to
   expert device j, a device-to-device copy of an unchanged block (`jax.device_put` within a
   process; across processes a collective permute in an exchange program over both pools,
   `CollectivePieceTransport`).
3. *Expert stage* (a jitted ``shard_map`` on the expert pool): each device joins the pieces of all
   shards and runs its experts' FFNs: on every slot (``expert_compute: capacity``), or on the
   filled slots only, packed into tiles (``filled_slots``, `ops.expert_ffn_filled_slots`: a
   device whose experts serve fewer tokens computes less; the pieces keep their static shapes,
   so the bytes do not follow the load), with dropout drawn per global expert id and sequence
   id, so the masks equal the single-device model's; then it cuts the output into the same
   pieces.
4. *Back*: piece (j, s) returns to the device it came from. Nothing else crosses, so every routed
   row crosses once each way; the redistribution the attention pool needs (all-gather before,
   reduce-scatter after attention, the all-reduce over REP of the combine, one term per choice
   so that no sum depends on the expert placement) happens inside it.

Micro-batch ping-pong (`schedule.py`)
-------------------------------------
The batch is cut into ``ma_separation.microbatches`` equal micro-batches. The driver issues the
programs layer by layer, and inside a layer micro-batch by micro-batch:
``A(l, 0) -> E(l, 0) -> A(l, 1) -> E(l, 1) -> ...``. Programs and copies are dispatched
asynchronously and never waited for inside a step, so the attention pool can run A(l, i+1)
while the expert pool runs E(l, i). Whether they actually overlap is measured, not assumed:
``python -m maxjax.bench ma-step --trace DIR`` prints each pool's busy time and the overlap.

Backward
--------
In training every stage program returns, next to its outputs, its ``jax.vjp`` closure (a pytree
holding the saved residuals, which stay on the stage's devices). The head stage runs forward and
backward in one program (its cotangent is the loss weight). The driver then walks the layers in
reverse with the same ping-pong order; cotangents of the pieces cross as float32 pieces of the
same shapes (the int8 quantisation is straight-through: it sits outside the differentiated
function, and compressing gradients would change them). Parameter gradients are summed over
micro-batches inside the backward programs (the accumulator is donated), so they stay on their
pool; the base class clips by the global norm over both pools and runs AdamW per pool.
With ``training.gradient_checkpointing`` the forward sweep runs the plain forward programs and
keeps only each stage's inputs (the residual stream, routing and pieces, no residuals); each
backward program takes those inputs, runs the stage's forward again and applies its VJP in one
program (`MARunner.saved_bytes` counts what the forward sweep keeps).
With ``ma_separation.gradient_accumulation`` = R > 1 the batch is cut into R x microbatches
micro-batches and the step runs R rounds: each round's forward and backward sweeps over its
micro-batches, its gradients added into the sums the earlier rounds left (the same donated
accumulators), so one round's activations are alive at a time.

Decoding
--------
`MARunner.generate` runs the same forward programs with a KV cache per layer and micro-batch,
[b, T, A*n_max, D] split by head slots over the pool, and dropless routing
(`decode.inference_config`); the head stage computes only the last position's logits. Each
forward program takes its layer's cache donated and returns the update, so a cache is held once.

Losses are averaged as in the reference: each micro-batch's LM loss is its mean over positions,
and the routing auxiliaries are per-sequence means, averaged over shards, micro-batches and layers.
"""

from maxjax.parallel.ma.layout import (
    ATTENTION_POOL,
    EXPERT_POOL,
    ExpertOrder,
    HeadLayout,
    ParamLayout,
    TokenSplit,
)
from maxjax.parallel.ma.schedule import COUNTERS, MARunner, StageTimer, pool_bytes_per_stage
from maxjax.parallel.ma.stages import StagePrograms, TokenState
from maxjax.parallel.ma.transport import CollectivePieceTransport, PieceTransport

__all__ = [
    "ATTENTION_POOL",
    "CollectivePieceTransport",
    "COUNTERS",
    "EXPERT_POOL",
    "ExpertOrder",
    "HeadLayout",
    "MARunner",
    "ParamLayout",
    "PieceTransport",
    "StagePrograms",
    "StageTimer",
    "TokenSplit",
    "TokenState",
    "pool_bytes_per_stage",
]
