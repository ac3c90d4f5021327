"""The interface every execution strategy implements, and what they share.

A strategy's parameter tree has exactly the structure of the single-device model's
(`maxjax.model.init_params`): the same nested keys. Only the leaves differ: a strategy may pad,
stack, permute and shard them (`to_canonical` / `from_canonical` convert leaf by leaf). Leaves are
grouped into *pools*, sets of leaves that live on the same devices (MA separation has an attention
pool and an expert pool; the other strategies have one). Optimizer updates run per pool; the
global gradient norm adds the pools' squared norms.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxjax import optim
from maxjax.config import Config
from maxjax.model import Params
from maxjax.parallel.mesh import everywhere_mesh, fetch, replicate, replicate_tree, restrict

Tree = Any
Path = tuple[str, ...]

CANONICAL_LAYOUT = {"kind": "canonical"}  # the single-device model's tree, unpadded, in order


def optimizer_init(tx: optax.GradientTransformation, pool: Tree) -> Callable:
    """`tx.init` compiled for `pool` with its state placed where the updates keep it: each
    moment sharded like the parameter it follows, the step counts replicated on the pool's
    devices. (Left to itself, `jax.jit(tx.init)` puts every moment, whole, on one device.)"""
    leaf = jax.tree.leaves(pool)[0].sharding
    if isinstance(leaf, jax.sharding.NamedSharding):
        elsewhere = jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())
    else:
        elsewhere = leaf
    shardings = optax.tree_map_params(
        tx,
        lambda _, param: param.sharding,
        jax.eval_shape(tx.init, pool),
        pool,
        transform_non_params=lambda _: elsewhere,
    )
    return jax.jit(tx.init, out_shardings=shardings)


def tree_paths(tree: Tree) -> list[tuple[Path, Any]]:
    """(path, leaf) pairs of a nested dict, paths as tuples of strings."""
    out = []

    def visit(node: Any, prefix: Path) -> None:
        if isinstance(node, dict):
            for k in node:
                visit(node[k], (*prefix, str(k)))
        else:
            out.append((prefix, node))

    visit(tree, ())
    return out


def from_paths(pairs: list[tuple[Path, Any]]) -> Tree:
    """The nested dict (string keys) whose `tree_paths` are `pairs`."""
    out: dict = {}
    for path, leaf in pairs:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def map_with_path(fn: Callable[[Path, Any], Any], tree: Tree) -> Tree:
    """Apply fn(path, leaf) to every leaf of a nested dict, keeping its keys."""

    def visit(node: Any, prefix: Path) -> Any:
        if isinstance(node, dict):
            return {k: visit(v, (*prefix, str(k))) for k, v in node.items()}
        return fn(prefix, node)

    return visit(tree, ())


def select(tree: Tree, keep: Callable[[Path], bool]) -> Tree:
    """The sub-dict of `tree` with the leaves whose path satisfies `keep` (empty dicts pruned)."""

    def visit(node: Any, prefix: Path) -> Any:
        if isinstance(node, dict):
            kept = {k: visit(v, (*prefix, str(k))) for k, v in node.items()}
            return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}
        return node if keep(prefix) else {}

    return visit(tree, ())


def merge(*trees: Tree) -> Tree:
    """Union of nested dicts with disjoint leaves."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = merge(out.get(key, {}), value)
            elif key in out:
                raise ValueError(f"leaf {key!r} appears in two trees")
            else:
                out[key] = value
    return out


@jax.jit
def _global_norm(partial_sq_norms: list[jax.Array]) -> jax.Array:
    return jnp.sqrt(sum(partial_sq_norms))


class TrainState(NamedTuple):
    """Parameters, per-pool optimizer states and the step count (a host int)."""

    params: Params
    opt_state: dict[str, Any]
    step: int


@dataclasses.dataclass
class LayoutReport:
    """Where the parameters live: leaves and bytes per device."""

    strategy: str
    bytes_per_device: dict[int, int]
    leaves_per_device: dict[int, list[str]]
    # MA: each layer's experts on each expert device ({device id: experts}, one per layer)
    expert_placement: list[dict[int, list[int]]] | None = None

    def format(self) -> str:
        lines = [f"parameter layout of strategy {self.strategy!r}:"]
        for device in sorted(self.bytes_per_device):
            leaves = self.leaves_per_device[device]
            line = (
                f"  device {device:2d}: {self.bytes_per_device[device] / 2**20:10.2f} MiB "
                f"in {len(leaves)} arrays"
            )
            if self.expert_placement and device in self.expert_placement[0]:
                experts = "; ".join(
                    f"L{layer} {list(placed[device])}"
                    for layer, placed in enumerate(self.expert_placement)
                )
                line += f", experts {experts}"
            lines.append(line)
        return "\n".join(lines)


def layout_of(strategy: str, params: Params) -> LayoutReport:
    """Bytes and leaves per device, read from the arrays' shardings (addressable shards)."""
    index = {d: i for i, d in enumerate(jax.devices())}
    total: dict[int, int] = {}
    leaves: dict[int, list[str]] = {}
    for path, leaf in tree_paths(params):
        name = ".".join(path)
        for shard in leaf.addressable_shards:
            device = index[shard.device]
            total[device] = total.get(device, 0) + shard.data.nbytes
            leaves.setdefault(device, []).append(name)
    return LayoutReport(strategy, total, leaves)


class Runner(abc.ABC):
    """One way of placing and running the model of `cfg` on the available devices."""

    name: str = "abstract"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._update_fns: dict[tuple[str, int], Callable] = {}

    # --- what each strategy implements -------------------------------------------------------

    @abc.abstractmethod
    def init(self, seed: int) -> Params:
        """Parameters with the values of `init_params(cfg, seed)`, in this strategy's layout."""

    @abc.abstractmethod
    def abstract_params(self) -> Params:
        """ShapeDtypeStructs, with this layout's shardings, of the parameters of `init`."""

    @abc.abstractmethod
    def forward(self, params: Params, tokens: jax.Array) -> jax.Array:
        """Deterministic logits[B, S, V] of tokens[B, S]."""

    @abc.abstractmethod
    def value_and_grad(
        self, params: Params, tokens: jax.Array, rng: jax.Array | None = None
    ) -> tuple[dict[str, jax.Array], Params]:
        """(metrics, grads) of the training loss on tokens[B, S]; metrics['loss'] is the loss.

        rng=None means no dropout. grads have the structure and placement of params.
        """

    @abc.abstractmethod
    def to_canonical(self, tree: Tree) -> Tree:
        """A params-shaped tree in the single-device layout (device arrays, any sharding)."""

    @abc.abstractmethod
    def from_canonical(self, tree: Tree) -> Tree:
        """A single-device-layout tree (host or device arrays) placed in this layout."""

    def loss(self, params: Params, tokens: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy of tokens[B, S+1] (inputs tokens[:, :-1], targets
        tokens[:, 1:]): no dropout, no auxiliary losses, no gradient. Validation's loss; each
        strategy computes it without gathering the full logits [B, S, V] where it shards them."""
        raise NotImplementedError(f"strategy {self.name!r} does not implement loss")

    def pool_of(self, path: Path) -> str:
        """Name of the device pool that holds the leaf at `path`."""
        return "all"

    def generate(
        self,
        params: Params,
        prompt: jax.Array,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> jax.Array:
        """Continue prompt[B, P] by max_new_tokens tokens with a KV cache."""
        raise NotImplementedError(f"strategy {self.name!r} does not implement generate")

    # --- shared ------------------------------------------------------------------------------

    def loss_and_grad(
        self, params: Params, tokens: jax.Array, rng: jax.Array | None = None
    ) -> tuple[jax.Array, Params]:
        """(loss, grads): next-token loss plus weighted auxiliary losses, and its gradient."""
        metrics, grads = self.value_and_grad(params, tokens, rng)
        return metrics["loss"], grads

    def gather(self, tree: Tree) -> Tree:
        """The same tree as host numpy arrays in the single-device layout."""
        return jax.tree.map(np.asarray, jax.device_get(self.to_canonical(tree)))

    def layout_report(self, params: Params) -> LayoutReport:
        return layout_of(self.name, params)

    def split_pools(self, tree: Tree) -> dict[str, Tree]:
        names = sorted({self.pool_of(p) for p, _ in tree_paths(tree)})
        return {n: select(tree, lambda p, n=n: self.pool_of(p) == n) for n in names}

    def init_train_state(self, params: Params, tx: optax.GradientTransformation) -> TrainState:
        opt_state = {
            name: optimizer_init(tx, pool)(pool) for name, pool in self.split_pools(params).items()
        }
        return TrainState(params, opt_state, 0)

    def apply_gradients(
        self, state: TrainState, grads: Params, tx: optax.GradientTransformation
    ) -> tuple[TrainState, jax.Array]:
        """Clip by the global norm over all pools, then AdamW each pool. Returns (state, norm)."""
        pools = self.split_pools(grads)
        partial = [self.squared_norm(name, g) for name, g in pools.items()]
        if jax.process_count() > 1:
            partial = replicate_tree(partial, everywhere_mesh())
        params = self.split_pools(state.params)
        new_params, new_opt = {}, {}
        grad_norm = None
        for name, pool_grads in pools.items():
            # Every pool sees every partial norm, copied device to device as scalars (across
            # processes: summed onto every device first, then taken where the pool is).
            sharding = jax.tree.leaves(pool_grads)[0].sharding
            if not isinstance(sharding, jax.sharding.NamedSharding):
                norms = partial
            elif jax.process_count() > 1:
                norms = [restrict(s, sharding.mesh) for s in partial]
            else:
                norms = [replicate(s, sharding.mesh) for s in partial]
            if grad_norm is None:
                grad_norm = _global_norm(norms)
            update = self._update_fn(name, tx)
            new_params[name], new_opt[name] = update(
                params[name], state.opt_state[name], pool_grads, norms
            )
        return TrainState(merge(*new_params.values()), new_opt, state.step + 1), grad_norm

    def squared_norm(self, pool: str, grads: Tree) -> jax.Array:
        """Sum of squares of a pool's gradients (its share of the global norm), on its devices."""
        return jax.jit(optim.squared_norm)(grads)

    def _update_fn(self, pool: str, tx: optax.GradientTransformation) -> Callable:
        key = (pool, id(tx))
        if key not in self._update_fns:
            max_norm = self.cfg.optimizer.gradient_clipping

            def update(params, opt_state, grads, partial_sq_norms):
                scale = optim.clip_scale(jnp.sqrt(sum(partial_sq_norms)), max_norm)
                grads = jax.tree.map(lambda g: g * scale, grads)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            self._update_fns[key] = jax.jit(update, donate_argnums=(0, 1))
        return self._update_fns[key]

    def train_step(
        self,
        state: TrainState,
        tokens: jax.Array,
        tx: optax.GradientTransformation,
        rng: jax.Array | None = None,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on tokens[B, S]: loss, gradients through every pool, clip, AdamW."""
        metrics, grads = self.value_and_grad(state.params, tokens, rng)
        state, grad_norm = self.apply_gradients(state, grads, tx)
        return state, {**metrics, "grad_norm": grad_norm}

    # --- checkpoints: the train state in this strategy's own layout ---------------------------

    def storage_layout(self) -> dict[str, Any]:
        """JSON description of the layout `export_train_state` stores (what fixes the leaves'
        shapes and order; not the devices). Equal descriptions restore directly, shard by shard."""
        return dict(CANONICAL_LAYOUT)

    def export_train_state(self, state: TrainState) -> dict[str, Any]:
        """{params, mu, nu, count}, params and moments in this layout, still sharded: a
        checkpoint writes every device's shards where they are (no gather, no conversion)."""
        mus, nus = [], []
        count = None
        for opt_state in state.opt_state.values():
            mus.append(optax.tree_utils.tree_get(opt_state, "mu"))
            nus.append(optax.tree_utils.tree_get(opt_state, "nu"))
            count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        return {
            "params": state.params,
            "mu": merge(*mus),
            "nu": merge(*nus),
            "count": fetch(count),
        }

    def import_train_state(
        self,
        exported: dict[str, Any],
        step: int,
        tx: optax.GradientTransformation,
        layout: dict[str, Any] | None = None,
    ) -> TrainState:
        """Inverse of `export_train_state`. `layout` is the layout of `exported`: the
        single-device layout (host or device arrays, placed by `from_canonical`; the default) or
        this runner's `storage_layout()` (arrays already on this layout's shardings, taken as
        they are)."""
        layout = CANONICAL_LAYOUT if layout is None else layout
        if layout == CANONICAL_LAYOUT:
            place = self.from_canonical
        elif layout == self.storage_layout():
            place = lambda tree: tree  # noqa: E731
        else:
            raise ValueError(
                f"strategy {self.name!r} cannot take parameters stored in layout {layout} "
                "(convert them to the single-device layout first)"
            )
        params = place(exported["params"])
        mu = self.split_pools(place(exported["mu"]))
        nu = self.split_pools(place(exported["nu"]))
        state = self.init_train_state(params, tx)
        opt_state = {}
        for name, pool_state in state.opt_state.items():
            pool_state = optax.tree_utils.tree_set(pool_state, mu=mu[name], nu=nu[name])
            # One fresh, uncommitted scalar per count leaf: the update donates its inputs, and
            # an uncommitted array may join whichever devices the pool lives on.
            opt_state[name] = jax.tree_util.tree_map_with_path(
                lambda path, x: (
                    jnp.array(np.asarray(exported["count"]), dtype=x.dtype)
                    if getattr(path[-1], "name", None) == "count"
                    else x
                ),
                pool_state,
            )
        return TrainState(params, opt_state, step)
