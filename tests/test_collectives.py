"""Bytes moved by collectives, read off HLO (`maxjax.parallel.collectives`)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxjax.parallel.collectives import abstract, collective_bytes, program_collective_bytes


def test_bytes_of_each_collective_counted_by_hand():
    """On a 4 x 3 mesh, a [8, 16] float32 array split by rows over 'seq' (4 x [2, 16], 128 B
    per shard): all-gather over seq (groups of 4, 12 receivers, each receiving 3 shards),
    reduce-scatter back (each receives 3 partial shards), all-reduce over rep (groups of 3:
    2 * 2/3 of a shard each) and a ring permute over seq (one shard per pair)."""
    mesh = Mesh(np.array(jax.devices()[:12]).reshape(4, 3), ("seq", "rep"))
    shard = 2 * 16 * 4

    def body(x):
        gathered = jax.lax.all_gather(x, "seq", axis=0, tiled=True)
        scattered = jax.lax.psum_scatter(gathered, "seq", scatter_dimension=0, tiled=True)
        summed = jax.lax.psum(scattered, "rep")
        return jax.lax.ppermute(summed, "seq", [(i, (i + 1) % 4) for i in range(4)])

    program = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P("seq"), out_specs=P("seq"), check_vma=False)
    )
    x = jnp.zeros((8, 16), jnp.float32)
    args = abstract((jax.device_put(x, NamedSharding(mesh, P("seq"))),))
    want = 12 * 3 * shard + 12 * 3 * shard + 12 * 2 * shard * 2 // 3 + 12 * shard
    assert program_collective_bytes(program, args, 12) == want


def test_tuples_iota_groups_and_other_instructions():
    hlo = "\n".join(
        [
            "  a = (f32[4,8]{1,0}, bf16[2]{0}) all-reduce(x, y), replica_groups=[2,4]<=[8]",
            "  b = s8[16]{0} all-to-all(z), replica_groups={}",
            "  c = f32[100]{0} add(p, q)",
        ]
    )
    all_reduce = 8 * 2 * (4 * 8 * 4 + 2 * 2) * 3 // 4
    all_to_all = 8 * 16 * 7 // 8
    assert collective_bytes(hlo, devices=8) == all_reduce + all_to_all
