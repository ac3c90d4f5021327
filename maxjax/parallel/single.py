"""The single-device reference strategy: the whole model on one device."""

from __future__ import annotations

import functools

import jax

from maxjax import model
from maxjax.config import Config
from maxjax.model import Params, decode, ops
from maxjax.parallel.runner import Runner, Tree


class SingleRunner(Runner):
    """Everything on `jax.devices()[0]`; the reference every other strategy must equal."""

    name = "single"

    def __init__(self, cfg: Config, device: jax.Device | None = None):
        super().__init__(cfg)
        self.device = device or jax.devices()[0]
        self.sharding = jax.sharding.SingleDeviceSharding(self.device)
        self._forward = jax.jit(lambda p, t: model.apply(cfg, p, t)[0])
        self._loss = jax.jit(
            lambda p, t: ops.cross_entropy(model.apply(cfg, p, t[:, :-1])[0], t[:, 1:])
        )
        self._value_and_grad = jax.jit(
            jax.value_and_grad(functools.partial(model.loss_fn, cfg), has_aux=True)
        )

    def abstract_params(self) -> Params:
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.sharding),
            model.abstract_params(self.cfg),
        )

    def init(self, seed: int) -> Params:
        return jax.jit(
            functools.partial(model.init_params, self.cfg),
            static_argnums=0,
            out_shardings=self.sharding,
        )(seed)

    def forward(self, params: Params, tokens: jax.Array) -> jax.Array:
        return self._forward(params, jax.device_put(tokens, self.sharding))

    def loss(self, params: Params, tokens: jax.Array) -> jax.Array:
        return self._loss(params, jax.device_put(tokens, self.sharding))

    def value_and_grad(
        self, params: Params, tokens: jax.Array, rng: jax.Array | None = None
    ) -> tuple[dict[str, jax.Array], Params]:
        (_, metrics), grads = self._value_and_grad(
            params, jax.device_put(tokens, self.sharding), rng
        )
        return metrics, grads

    def generate(
        self,
        params: Params,
        prompt: jax.Array,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> jax.Array:
        return decode.generate(
            self.cfg,
            params,
            jax.device_put(prompt, self.sharding),
            max_new_tokens,
            temperature,
            seed,
        )

    def to_canonical(self, tree: Tree) -> Tree:
        return tree

    def from_canonical(self, tree: Tree) -> Tree:
        return jax.device_put(tree, self.sharding, may_alias=False)
