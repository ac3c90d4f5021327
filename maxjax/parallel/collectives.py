"""What a program's collectives move: bytes read off its HLO, not assumed from the design.

`collective_bytes` counts every all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute of an HLO module, summed over the devices that receive (ring algorithms):

- all-gather of an output of X bytes per device in groups of n: each device receives
  X (n - 1) / n;
- reduce-scatter to an output of X bytes per device: each receives X (n - 1);
- all-reduce of X bytes: each receives 2 X (n - 1) / n (reduce-scatter, then all-gather);
- all-to-all of X bytes: each receives X (n - 1) / n;
- collective-permute of X bytes: X for every (source, target) pair.

A tuple-shaped collective counts each element. `program_collective_bytes` lowers a jitted
program for abstract arguments and counts its collectives (the MA runner's
`within_attention_pool` counter).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(_OPS) + r")\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(?P<groups>(\{[0-9,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<groups>[0-9]+),(?P<size>[0-9]+)\]<=")
_PAIRS = re.compile(r"source_target_pairs=\{(?P<pairs>(\{[0-9]+,[0-9]+\},?)*)\}")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_ITEM_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO result type: one array `f32[4,32]{1,0}` or a tuple of them."""
    total = 0
    for match in _ARRAY.finditer(hlo_type):
        dims = [int(d) for d in match["dims"].split(",") if d]
        total += _ITEM_BYTES.get(match["dtype"], 4) * int(np.prod(dims, dtype=np.int64))
    return total


def _groups(line: str, devices: int) -> tuple[int, int]:
    """(number of groups, devices per group) of a collective's `replica_groups`."""
    explicit = _EXPLICIT_GROUPS.search(line)
    if explicit and explicit["groups"]:
        sizes = [len(g.split(",")) for g in re.findall(r"\{([0-9,]*)\}", explicit["groups"])]
        return len(sizes), max(sizes)
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota["groups"]), int(iota["size"])
    return 1, devices


def collective_bytes(hlo_text: str, devices: int) -> int:
    """Bytes the collectives of HLO module `hlo_text` (running on `devices` devices) move,
    summed over the receiving devices (see the module docstring)."""
    total = 0
    for line in hlo_text.splitlines():
        instruction = _INSTRUCTION.search(line)
        if not instruction:
            continue
        op, size = instruction["op"], _type_bytes(instruction["type"])
        if op == "collective-permute":
            pairs = _PAIRS.search(line)
            total += size * (len(re.findall(r"\{[0-9]+,[0-9]+\}", pairs["pairs"])) if pairs else 0)
            continue
        groups, n = _groups(line, devices)
        receivers = groups * n
        if op == "reduce-scatter":
            total += receivers * size * (n - 1)
        elif op == "all-reduce":
            total += receivers * 2 * size * (n - 1) // n
        else:  # all-gather, all-to-all
            total += receivers * size * (n - 1) // n
    return total


def abstract(tree: Any) -> Any:
    """`tree` with every array replaced by its shape, dtype and sharding (other leaves kept)."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )


def program_collective_bytes(program: Any, abstract_args: tuple, devices: int) -> int:
    """`collective_bytes` of jitted `program` lowered for `abstract_args`."""
    return collective_bytes(program.lower(*abstract_args).as_text(dialect="hlo"), devices)
