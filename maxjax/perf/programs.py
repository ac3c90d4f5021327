"""Per-device stage programs at their real shapes, compiled ahead of time for their costs.

This is the one module that knows what each device runs in a stage and at which shapes. Every
builder is a function of the per-device work (e.g. attention of n heads over b sequences), built
from the model's shared math in `maxjax.model.ops`, and compiled single-device with abstract
arguments (`jax.ShapeDtypeStruct`), so paper-size programs cost nothing to build. The costs of a
program do not depend on how many devices run copies of it.

A backward program is the VJP of the forward body. Compiled on its own it recomputes the forward
(what gradient checkpointing does); without checkpointing the backward's cost is the VJP's minus
the forward's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from maxjax.config import Config
from maxjax.model import ops
from maxjax.routing import expert_capacity

F32 = jnp.float32
I32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes stage programs depend on."""

    hidden: int
    heads: int
    head_dim: int
    experts: int
    expert_hidden: int
    top_k: int
    capacity_factor: float | None
    vocab: int
    layers: int
    seq_len: int
    batch: int
    dtype: str
    checkpointing: bool
    dropout: float

    @classmethod
    def of(cls, cfg: Config) -> Shapes:
        m, moe = cfg.model, cfg.moe
        return cls(
            hidden=m.hidden_dim,
            heads=m.attention_heads,
            head_dim=m.head_dim,
            experts=moe.experts_per_layer,
            expert_hidden=moe.expert_hidden_dim,
            top_k=moe.top_k,
            capacity_factor=moe.capacity_factor,
            vocab=cfg.training.vocab_size,
            layers=m.layers,
            seq_len=cfg.sequence.length,
            batch=cfg.sequence.batch_size,
            dtype=cfg.training.dtype,
            checkpointing=cfg.training.gradient_checkpointing,
            dropout=moe.expert_dropout,
        )

    def capacity(self, group_tokens: int) -> int:
        return expert_capacity(group_tokens, self.experts, self.top_k, self.capacity_factor)

    @property
    def compute_bytes(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    # --- parameter counts (for memory and gradient traffic) ----------------------------------
    def attention_params(self, heads: int) -> int:
        return 4 * self.hidden * heads * self.head_dim

    def expert_params(self, experts: int) -> int:
        return 2 * experts * self.hidden * self.expert_hidden

    def replicated_layer_params(self) -> int:
        """Norm scales and the router of one layer."""
        return 2 * self.hidden + self.hidden * self.experts

    def vocab_params(self, rows: int) -> int:
        """Embedding rows plus LM-head columns of a vocabulary shard."""
        return 2 * rows * self.hidden

    def total_params(self) -> int:
        per_layer = (
            self.attention_params(self.heads)
            + self.expert_params(self.experts)
            + self.replicated_layer_params()
        )
        return self.layers * per_layer + self.vocab_params(self.vocab) + self.hidden

    def active_params_per_token(self) -> int:
        per_layer = (
            self.attention_params(self.heads)
            + self.expert_params(self.top_k)
            + self.replicated_layer_params()
        )
        return self.layers * per_layer + self.vocab * self.hidden


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """What the compiler reports for one per-device program."""

    flops: float
    bytes_accessed: float
    temp_bytes: float
    argument_bytes: float
    output_bytes: float

    def minus(self, other: ProgramCost) -> ProgramCost:
        """Costs of the part of this program that `other` does not do (clipped at zero)."""
        return ProgramCost(
            max(0.0, self.flops - other.flops),
            max(0.0, self.bytes_accessed - other.bytes_accessed),
            self.temp_bytes,
            self.argument_bytes,
            self.output_bytes,
        )


def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def compiled_cost(fn: Callable, args: tuple) -> ProgramCost:
    """Flops and bytes (cost_analysis) and memory (memory_analysis) of jit(fn) on abstract args."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    mem = compiled.memory_analysis()
    return ProgramCost(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        temp_bytes=float(getattr(mem, "temp_size_in_bytes", 0) or 0),
        argument_bytes=float(getattr(mem, "argument_size_in_bytes", 0) or 0),
        output_bytes=float(getattr(mem, "output_size_in_bytes", 0) or 0),
    )


# --- forward bodies: (function of float args and other args, float args, other args) -----------
Body = tuple[Callable[..., jax.Array], tuple, tuple]


def attention_body(s: Shapes, heads: int, seqs: int, seq_len: int) -> Body:
    """Pre-attention norm and causal attention of `heads` heads over [seqs, seq_len, M]."""
    m, width = s.hidden, heads * s.head_dim
    dtype = jnp.dtype(s.dtype)

    def fn(x, scale, wq, wk, wv, wo):
        w = ops.AttentionWeights(wq, wk, wv, wo)
        positions = jnp.arange(x.shape[1], dtype=I32)
        return ops.self_attention(ops.rms_norm(x, scale), w, s.head_dim, positions, dtype)

    floats = (
        _sds((seqs, seq_len, m), F32),
        _sds((m,), F32),
        *(_sds((m, width), F32) for _ in range(3)),
        _sds((width, m), F32),
    )
    return fn, floats, ()


def route_dispatch_body(s: Shapes, seqs: int, seq_len: int) -> Body:
    """Residual add, pre-MoE norm, router and capacity dispatch to buffers [E, seqs, C, M]."""
    capacity = s.capacity(seq_len)
    dtype = jnp.dtype(s.dtype)

    def fn(h, attn, scale, router):
        x = ops.rms_norm(h + attn, scale)
        r = ops.route(x, router, s.top_k, capacity)
        return ops.dispatch(x.astype(dtype), r, capacity).astype(F32)

    floats = (
        _sds((seqs, seq_len, s.hidden), F32),
        _sds((seqs, seq_len, s.hidden), F32),
        _sds((s.hidden,), F32),
        _sds((s.hidden, s.experts), F32),
    )
    return fn, floats, ()


def combine_body(s: Shapes, seqs: int, seq_len: int) -> Body:
    """Gate-weighted combine of expert outputs [E, seqs, C, M] back to tokens, plus residual."""
    k = s.top_k

    def fn(expert_out, h, gates, expert_index, position, keep):
        r = ops.Routing(
            jnp.zeros((*h.shape[:2], s.experts), F32), expert_index, gates, position, keep
        )
        return h + ops.combine(expert_out, r)

    capacity = s.capacity(seq_len)
    floats = (
        _sds((s.experts, seqs, capacity, s.hidden), F32),
        _sds((seqs, seq_len, s.hidden), F32),
        _sds((seqs, seq_len, k), F32),
    )
    others = (
        _sds((seqs, seq_len, k), I32),
        _sds((seqs, seq_len, k), I32),
        _sds((seqs, seq_len, k), jnp.bool_),
    )
    return fn, floats, others


def experts_body(s: Shapes, experts: int, seqs: int, capacity: int, train: bool) -> Body:
    """The FFNs of `experts` experts over their buffers [experts, seqs, capacity, M]."""
    dtype = jnp.dtype(s.dtype)
    rate = s.dropout if train else 0.0

    def fn(buffer, wi, wo, key_data):
        key = jax.random.wrap_key_data(key_data) if rate > 0 else None
        return ops.expert_ffn(buffer, wi, wo, dtype, key, rate)

    floats = (
        _sds((experts, seqs, capacity, s.hidden), F32),
        _sds((experts, s.hidden, s.expert_hidden), F32),
        _sds((experts, s.expert_hidden, s.hidden), F32),
    )
    return fn, floats, (_sds((2,), jnp.uint32),)


def lm_head_body(s: Shapes, vocab_rows: int, seqs: int, seq_len: int) -> Body:
    """Final norm and a vocabulary shard of the LM head: partial log-sum-exp and target logits."""
    dtype = jnp.dtype(s.dtype)

    def fn(x, scale, kernel, targets):
        logits = jnp.einsum(
            "bsm,mv->bsv", ops.rms_norm(x, scale).astype(dtype), kernel.astype(dtype)
        ).astype(F32)
        picked = jnp.take_along_axis(logits, targets[..., None] % vocab_rows, axis=-1)
        return jax.nn.logsumexp(logits, axis=-1) - picked[..., 0]

    floats = (
        _sds((seqs, seq_len, s.hidden), F32),
        _sds((s.hidden,), F32),
        _sds((s.hidden, vocab_rows), F32),
    )
    return fn, floats, (_sds((seqs, seq_len), I32),)


def embed_body(s: Shapes, vocab_rows: int, seqs: int, seq_len: int) -> Body:
    """Lookup in a vocabulary shard of the embedding (rows outside the shard give zeros)."""

    def fn(table, tokens):
        local = tokens % vocab_rows
        inside = tokens < vocab_rows
        return jnp.where(inside[..., None], table[local], 0.0)

    return fn, (_sds((vocab_rows, s.hidden), F32),), (_sds((seqs, seq_len), I32),)


def decode_attention_body(s: Shapes, heads: int, seqs: int, context: int) -> Body:
    """One decoding step of `heads` heads for [seqs] new tokens over a KV cache of `context`."""
    m, width = s.hidden, heads * s.head_dim
    dtype = jnp.dtype(s.dtype)

    def fn(x, scale, wq, wk, wv, wo, k_cache, v_cache, start):
        w = ops.AttentionWeights(wq, wk, wv, wo)
        q, k, v = ops.project_qkv(ops.rms_norm(x, scale), w, s.head_dim, start[None], dtype)
        k_all = jax.lax.dynamic_update_slice(k_cache, k, (0, start, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_cache, v, (0, start, 0, 0))
        kv_pos = jnp.arange(context, dtype=I32)
        out = ops.causal_attention(q, k_all, v_all, start[None], kv_pos)
        return ops.attention_output(out, w, dtype)

    floats = (
        _sds((seqs, 1, m), F32),
        _sds((m,), F32),
        *(_sds((m, width), F32) for _ in range(3)),
        _sds((width, m), F32),
    )
    cache = _sds((seqs, context, heads, s.head_dim), dtype)
    return fn, floats, (cache, cache, _sds((), I32))


def adamw_body(params: int) -> Body:
    """AdamW update of `params` float32 parameters held by one device (flattened)."""

    def fn(p, g, mu, nu):
        b1, b2, lr, eps, wd = 0.9, 0.95, 1e-4, 1e-8, 0.1
        mu2 = b1 * mu + (1 - b1) * g
        nu2 = b2 * nu + (1 - b2) * g * g
        return p - lr * (mu2 / (jnp.sqrt(nu2) + eps) + wd * p), mu2, nu2

    return fn, tuple(_sds((max(1, params),), F32) for _ in range(4)), ()


# --- costs ---------------------------------------------------------------------------------------
def _forward(body: Body) -> tuple[Callable, tuple]:
    fn, floats, others = body
    return fn, (*floats, *others)


def _vjp(body: Body) -> tuple[Callable, tuple]:
    fn, floats, others = body
    n = len(floats)

    def backward(*args):
        fl, ot, ct = args[:n], args[n:-1], args[-1]
        _, pullback = jax.vjp(lambda *f: fn(*f, *ot), *fl)
        return pullback(ct)

    out = jax.eval_shape(fn, *floats, *others)
    out = out[0] if isinstance(out, tuple) else out
    return backward, (*floats, *others, out)


@functools.cache
def _compiled(builder: str, args: tuple, backward: bool) -> ProgramCost:
    body = BUILDERS[builder](*args)
    fn, abstract = _vjp(body) if backward else _forward(body)
    return compiled_cost(fn, abstract)


def _affine(two: ProgramCost, four: ProgramCost, n: float) -> ProgramCost:
    """Cost at batch n from the costs at batch 2 and 4 (the programs are affine in the batch)."""

    def at(a: float, b: float) -> float:
        return max(0.0, a + (n - 2) * (b - a) / 2)

    return ProgramCost(
        at(two.flops, four.flops),
        at(two.bytes_accessed, four.bytes_accessed),
        at(two.temp_bytes, four.temp_bytes),
        at(two.argument_bytes, four.argument_bytes),
        at(two.output_bytes, four.output_bytes),
    )


def _cost(builder: str, args: tuple, backward: bool) -> ProgramCost:
    """Costs of a program; a batch larger than 4 is read off the batch-2 and batch-4 programs.

    Every stage program applies the same work to each sequence (or parameter, for AdamW) of its
    batch axis, so flops, bytes and buffer sizes are affine in it; two small compiles give the
    paper-size costs exactly (a test checks this against a direct compile) and keep a layout
    search from compiling one program per batch size.
    """
    index = BATCH_ARG[builder]
    n = args[index]
    if n <= 4:
        return _compiled(builder, args, backward)
    small = [args[:index] + (k,) + args[index + 1 :] for k in (2, 4)]
    return _affine(*(_compiled(builder, a, backward) for a in small), n)


BUILDERS: dict[str, Callable[..., Body]] = {
    "attention": attention_body,
    "route_dispatch": route_dispatch_body,
    "combine": combine_body,
    "experts": experts_body,
    "lm_head": lm_head_body,
    "embed": embed_body,
    "decode_attention": decode_attention_body,
    "adamw": adamw_body,
}

# Position (in the builder's arguments after the shapes) of the batch axis the cost is affine in.
BATCH_ARG = {
    "attention": 2,
    "route_dispatch": 1,
    "combine": 1,
    "experts": 2,
    "lm_head": 2,
    "embed": 2,
    "decode_attention": 2,
    "adamw": 0,
}

# Which roofline efficiency each program kind uses (see the hardware spec's `efficiency`).
KIND = {
    "attention": "attention",
    "decode_attention": "attention",
    "route_dispatch": "token",
    "combine": "token",
    "embed": "token",
    "experts": "matmul",
    "lm_head": "matmul",
    "adamw": "memory",
}


def forward_cost(builder: str, *args: Any) -> ProgramCost:
    """Costs of a forward program (compiled once per shape in this process)."""
    return _cost(builder, tuple(args), False)


def backward_cost(builder: str, *args: Any, recompute: bool) -> ProgramCost:
    """Costs of a backward program: the whole VJP when it recomputes the forward, else VJP - fwd."""
    vjp = _cost(builder, tuple(args), True)
    return vjp if recompute else vjp.minus(forward_cost(builder, *args))


def compiles_done() -> int:
    return _compiled.cache_info().currsize


# --- bytes of what moves between devices (from shapes and dtypes) ----------------------------
def activation_bytes(s: Shapes, seqs: int, seq_len: int, itemsize: int) -> float:
    return float(seqs * seq_len * s.hidden * itemsize)


def buffer_bytes(s: Shapes, experts: int, seqs: float, capacity: int, compressed: bool) -> float:
    """Bytes of capacity buffers [experts, seqs, C, M]: compute dtype, or int8 + a float32 scale
    per token row when compressed (8-bit quantization)."""
    rows = experts * seqs * capacity
    if compressed:
        return float(rows * (s.hidden + 4))
    return float(rows * s.hidden * s.compute_bytes)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def even_split(total: int, parts: int) -> list[int]:
    """`total` items over `parts` holders as evenly as possible, larger shares first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def vocab_shard(vocab: int, devices: int) -> int:
    return ceil_div(vocab, devices)
