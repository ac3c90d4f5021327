"""The performance model: program costs -> roofline times -> a simulated schedule -> metrics.

For a layout (MA separation or a baseline), a hardware spec and a kind of work (a training step,
or one decoding step at a context length), build the task graph of every device's programs,
transfers and collectives in the order the driver issues them, simulate it
(`maxjax.perf.simulate`) and read step time, busy fractions, link use, memory and energy off it.

Modelling choices (stated, not hidden):
- a program's time is max(flops / (peak x efficiency[kind]), bytes / (bandwidth x
  efficiency['memory'])) plus a fixed per-program overhead (roofline);
- a ring collective over n devices moves 2(n-1)/n (all-reduce) or (n-1)/n (all-gather,
  reduce-scatter) of the message through its slowest link: NVLink inside a node, the node's NICs
  when it spans nodes; point-to-point transfers hold the sending and receiving node's NICs;
- gradients are reduced after the backward pass (not overlapped with it), then AdamW runs;
- with gradient checkpointing a backward program recomputes its forward (the whole VJP);
- memory per device (an estimate of this model, not a measurement) = float32 parameters, gradients
  and AdamW moments + the activations kept for the backward pass (layer inputs with
  checkpointing, else every forward program's outputs and temporaries) + the largest program
  output; the CPU compiler's temporary sizes are reported beside it as `cpu_compiled_temp_bytes`
  (an upper bound: it fuses less than a GPU compiler);
- the pipeline baselines compute every tick of the GPipe schedule, bubble ticks included, as the
  runner does (bubble ticks compute on zeros).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from maxjax.perf import programs as P
from maxjax.perf.hardware import HardwareSpec
from maxjax.perf.simulate import Task, Timeline, simulate

F32_BYTES = 4
ADAMW_STATE_BYTES = 16  # float32 parameter + gradient + two moments


def program_time(cost: P.ProgramCost, kind: str, hw: HardwareSpec) -> float:
    """Roofline time of one program (no overhead): compute-bound or memory-bound."""
    compute = cost.flops / (hw.matmul_flops * hw.efficiency[kind])
    memory = cost.bytes_accessed / (hw.memory_bytes_per_s * hw.efficiency["memory"])
    return max(compute, memory) if hw.overlap else compute + memory


def ring_factor(op: str, members: int) -> float:
    """Fraction of the message each device sends in a ring collective."""
    if members <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * (members - 1) / members
    if op in ("all_gather", "reduce_scatter"):
        return (members - 1) / members
    raise ValueError(f"unknown collective {op!r}")


@dataclasses.dataclass(frozen=True)
class Work:
    """A training step (seq_len tokens per sequence) or one decoding step at `context`."""

    train: bool
    batch: int
    seq_len: int
    context: int = 0
    optimizer: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclasses.dataclass(frozen=True)
class MALayout:
    """Attention pool (split into `attention_groups` data-parallel groups, heads split inside a
    group by `head_distribution`) and expert pool (experts_per_device experts each)."""

    attention_devices: tuple[int, ...]
    head_distribution: tuple[int, ...]
    attention_groups: int
    expert_devices: tuple[int, ...]
    experts_per_device: int
    microbatches: int
    compression: bool

    def __post_init__(self):
        a, g = len(self.attention_devices), self.attention_groups
        if g < 1 or a % g:
            raise ValueError(f"attention_groups {g} must divide the {a} attention devices")
        if len(self.head_distribution) != a // g:
            raise ValueError(
                f"head_distribution has {len(self.head_distribution)} entries; a group has {a // g}"
            )

    @property
    def group_size(self) -> int:
        return len(self.attention_devices) // self.attention_groups

    def groups(self) -> list[tuple[int, ...]]:
        n = self.group_size
        return [self.attention_devices[i : i + n] for i in range(0, len(self.attention_devices), n)]

    @property
    def devices(self) -> int:
        return len(self.attention_devices) + len(self.expert_devices)


@dataclasses.dataclass(frozen=True)
class BaselineLayout:
    """Tensor x pipeline x data parallelism; device id = (data * pp + stage) * tp + tensor."""

    strategy: str
    tensor: int
    stages: int
    data: int
    microbatches: int

    @property
    def devices(self) -> int:
        return self.tensor * self.stages * self.data

    def device(self, d: int, s: int, t: int) -> int:
        return (d * self.stages + s) * self.tensor + t


class _Graph:
    """Collects the tasks of one schedule with their durations."""

    def __init__(self, s: P.Shapes, hw: HardwareSpec):
        self.s, self.hw = s, hw
        self.tasks: list[Task] = []
        self.count = 0
        self.params: dict[int, float] = defaultdict(float)
        self.saved_bytes: dict[int, float] = defaultdict(float)
        self.peak_temp: dict[int, float] = defaultdict(float)
        self.peak_output: dict[int, float] = defaultdict(float)

    def _name(self, label: str) -> str:
        self.count += 1
        return f"{label}#{self.count}"

    def node(self, device: int) -> int:
        return device // self.hw.gpus_per_node

    def _dev(self, device: int) -> str:
        return "host" if self.hw.shared_host else f"dev:{device}"

    def stage(
        self,
        label: str,
        devices: list[int],
        builder: str,
        args_of,
        deps: list[str],
        backward: bool = False,
        train: bool = True,
    ) -> list[str]:
        """One program on each of `devices` (args_of(device) gives its builder args)."""
        names = []
        for i, d in enumerate(devices):
            args = (self.s, *args_of(d))
            if backward:
                cost = P.backward_cost(builder, *args, recompute=self.s.checkpointing)
            else:
                cost = P.forward_cost(builder, *args)
                if train and not self.s.checkpointing:
                    self.saved_bytes[d] += cost.temp_bytes + cost.output_bytes
            self.peak_temp[d] = max(self.peak_temp[d], cost.temp_bytes)
            self.peak_output[d] = max(self.peak_output[d], cost.output_bytes)
            duration = program_time(cost, P.KIND[builder], self.hw)
            if self.hw.shared_host:
                duration += self.hw.shard_overhead_s + (self.hw.program_overhead_s if i == 0 else 0)
            else:
                duration += self.hw.program_overhead_s
            name = self._name(f"{label}@{d}")
            self.tasks.append(
                Task(name, (self._dev(d),), duration, tuple(deps), "compute", cost.flops)
            )
            names.append(name)
        return names

    def _link_bw(self, nodes: set[int]) -> float:
        if len(nodes) > 1:
            bw = min(self.hw.intra_node_bytes_per_s, self.hw.node_nic_bytes_per_s)
        else:
            bw = self.hw.intra_node_bytes_per_s
        return bw * self.hw.efficiency["link"]

    def collective(
        self, kind: str, op: str, devices: list[int], nbytes: float, deps: list[str]
    ) -> list[str]:
        """A ring collective of an `nbytes` message over `devices` (nothing when alone)."""
        if len(devices) <= 1 or nbytes <= 0:
            return list(deps)
        nodes = {self.node(d) for d in devices}
        moved = ring_factor(op, len(devices)) * nbytes
        duration = moved / self._link_bw(nodes) + self.hw.program_overhead_s
        if self.hw.shared_host:
            resources: tuple[str, ...] = ("host",)
        elif len(nodes) > 1:
            resources = tuple(f"{io}:{n}" for n in sorted(nodes) for io in ("nic_out", "nic_in"))
        else:
            resources = tuple(f"nvlink:{d}" for d in devices)
        name = self._name(f"{op}:{kind}")
        self.tasks.append(Task(name, resources, duration, tuple(deps), kind, moved * len(devices)))
        return [name]

    def transfer(self, kind: str, src: int, dst: int, nbytes: float, deps: list[str]) -> str:
        """Point-to-point bytes from node `src` to node `dst` (all devices of each side)."""
        if self.hw.shared_host:
            resources: tuple[str, ...] = ("host",)
            duration = nbytes / self.hw.memory_bytes_per_s + self.hw.program_overhead_s
        elif src == dst:
            resources = (f"nvswitch:{src}",)
            bw = self.hw.intra_node_bytes_per_s * self.hw.gpus_per_node * self.hw.efficiency["link"]
            duration = nbytes / bw + self.hw.program_overhead_s
        else:
            resources = (f"nic_out:{src}", f"nic_in:{dst}")
            bw = self.hw.node_nic_bytes_per_s * self.hw.efficiency["link"]
            duration = nbytes / bw + self.hw.program_overhead_s
        name = self._name(f"send:{kind}:{src}->{dst}")
        self.tasks.append(Task(name, resources, duration, tuple(deps), kind, nbytes))
        return name


def _by_node(g: _Graph, devices: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for d in devices:
        out[g.node(d)].append(d)
    return dict(out)


def ma_graph(s: P.Shapes, hw: HardwareSpec, lay: MALayout, work: Work) -> _Graph:
    """Tasks of one MA step: ping-pong of m micro-batches between the pools, layer by layer."""
    g = _Graph(s, hw)
    m = lay.microbatches if work.train else 1
    b = P.ceil_div(work.batch, m)
    groups = lay.groups()
    gsize = lay.group_size
    bg = P.ceil_div(b, lay.attention_groups)
    tok = P.ceil_div(bg, gsize)
    seq = work.seq_len
    cap = s.capacity(seq)
    e_dev = lay.experts_per_device
    heads = {d: h for grp in groups for d, h in zip(grp, lay.head_distribution, strict=True)}
    rows = P.vocab_shard(s.vocab, gsize)
    attn_devs = list(lay.attention_devices)
    exp_devs = list(lay.expert_devices)
    attn_nodes = _by_node(g, attn_devs)
    exp_nodes = _by_node(g, exp_devs)
    act = P.activation_bytes(s, bg, seq, s.compute_bytes)
    train = work.train

    for d in attn_devs:
        g.params[d] = (
            s.layers * (s.attention_params(heads[d]) + s.replicated_layer_params())
            + s.vocab_params(rows)
            + s.hidden
        )
    for d in exp_devs:
        g.params[d] = s.layers * s.expert_params(e_dev)
    if train and s.checkpointing:
        for d in attn_devs:
            g.saved_bytes[d] = (s.layers + 1) * m * tok * seq * s.hidden * F32_BYTES
        for d in exp_devs:
            g.saved_bytes[d] = s.layers * m * e_dev * b * cap * s.hidden * s.compute_bytes

    def attention_args(d: int) -> tuple:
        if train:
            return ("attention", (heads[d], bg, seq))
        return ("decode_attention", (heads[d], bg, work.context))

    def crossing(kind: str, deps_by_node: dict[int, list[str]], to_experts: bool) -> dict:
        """Buffers between the pools, one transfer per (source node, destination node)."""
        arrived: dict[int, list[str]] = defaultdict(list)
        pairs = (
            [(a, x) for a in attn_nodes for x in exp_nodes]
            if to_experts
            else [(x, a) for x in exp_nodes for a in attn_nodes]
        )
        for src, dst in pairs:
            a_node, x_node = (src, dst) if to_experts else (dst, src)
            share = len(attn_nodes[a_node]) / len(attn_devs)  # of the micro-batch's sequences
            nbytes = P.buffer_bytes(
                s, e_dev * len(exp_nodes[x_node]), b * share, cap, lay.compression
            )
            arrived[dst].append(g.transfer(kind, src, dst, nbytes, deps_by_node[src]))
        return arrived

    def expert_round(label: str, ready: dict[int, list[str]], backward: bool) -> dict:
        done = {}
        for node, devs in exp_nodes.items():
            done[node] = g.stage(
                label,
                devs,
                "experts",
                lambda d: (e_dev, b, cap, train),
                ready[node],
                backward,
                train,
            )
        return done

    def group_nodes(names_of: dict[int, list[str]]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = defaultdict(list)
        for d, names in names_of.items():
            out[g.node(d)].extend(names)
        return out

    # --- forward ---------------------------------------------------------------------------
    last: dict[tuple[int, int], list[str]] = {}  # (group, micro-batch) -> tasks to wait for
    back: dict[int, dict[int, list[str]]] = {}  # micro-batch -> node -> expert outputs arrived
    for i in range(m):
        for gi, grp in enumerate(groups):
            e = g.stage("embed", list(grp), "embed", lambda d: (rows, bg, seq), [], False, train)
            last[gi, i] = g.collective(
                "embedding", "reduce_scatter", list(grp), act * F32_BYTES / s.compute_bytes, e
            )

    def combine_all(grp, returned, previous):
        """The combine of every device of a sequence group, after its pieces came back."""
        deps = []
        for d in grp:
            deps += g.stage(
                "combine",
                [d],
                "combine",
                lambda d: (tok, seq),
                returned[g.node(d)] + previous,
                False,
                train,
            )
        return deps

    for layer in range(s.layers):
        for i in range(m):
            routed: dict[int, list[str]] = {}
            for gi, grp in enumerate(groups):
                deps = last[gi, i]
                if layer > 0:
                    deps = combine_all(grp, back[i], last[gi, i])
                gathered = g.collective("attention", "all_gather", list(grp), act, deps)
                builder, _ = attention_args(grp[0])
                attn = []
                for d in grp:
                    attn += g.stage(
                        "attention",
                        [d],
                        builder,
                        lambda d: attention_args(d)[1],
                        gathered,
                        False,
                        train,
                    )
                scattered = g.collective("attention", "reduce_scatter", list(grp), act, attn)
                for d in grp:
                    routed[d] = g.stage(
                        "route",
                        [d],
                        "route_dispatch",
                        lambda d: (tok, seq),
                        scattered,
                        False,
                        train,
                    )
                last[gi, i] = [n for d in grp for n in routed[d]]
            sent = crossing("moe_transfer", group_nodes(routed), True)
            done = expert_round("experts", sent, False)
            back[i] = crossing("moe_transfer", done, False)
    heads_done: dict[tuple[int, int], list[str]] = {}
    for i in range(m):
        for gi, grp in enumerate(groups):
            deps = combine_all(grp, back[i], last[gi, i])
            gathered = g.collective("head", "all_gather", list(grp), act, deps)
            h = g.stage(
                "lm_head", list(grp), "lm_head", lambda d: (rows, bg, seq), gathered, False, train
            )
            heads_done[gi, i] = g.collective(
                "head", "all_reduce", list(grp), 2 * bg * seq * F32_BYTES, h
            )
    if not train:
        return g

    # --- backward (reverse layers; every micro-batch per layer) ------------------------------
    grads_at_experts: dict[int, dict[int, list[str]]] = {}
    pending: dict[tuple[int, int], list[str]] = {}
    for i in range(m):
        combined: dict[int, list[str]] = {}
        for gi, grp in enumerate(groups):
            h = g.stage(
                "lm_head_bwd",
                list(grp),
                "lm_head",
                lambda d: (rows, bg, seq),
                heads_done[gi, i],
                True,
            )
            rs = g.collective("head", "reduce_scatter", list(grp), act, h)
            for d in grp:
                combined[d] = g.stage("combine_bwd", [d], "combine", lambda d: (tok, seq), rs, True)
        sent = crossing("moe_transfer", group_nodes(combined), True)
        done = expert_round("experts_bwd", sent, True)
        grads_at_experts[i] = crossing("moe_transfer", done, False)
    for layer in reversed(range(s.layers)):
        for i in range(m):
            combined = {}
            for gi, grp in enumerate(groups):
                r = []
                for d in grp:
                    r += g.stage(
                        "route_bwd",
                        [d],
                        "route_dispatch",
                        lambda d: (tok, seq),
                        grads_at_experts[i][g.node(d)],
                        True,
                    )
                gathered = g.collective("attention", "all_gather", list(grp), act, r)
                builder, _ = attention_args(grp[0])
                attn = []
                for d in grp:
                    attn += g.stage(
                        "attention_bwd",
                        [d],
                        builder,
                        lambda d: attention_args(d)[1],
                        gathered,
                        True,
                    )
                rs = g.collective("attention", "reduce_scatter", list(grp), act, attn)
                pending[gi, i] = rs
                if layer > 0:
                    for d in grp:
                        combined[d] = g.stage(
                            "combine_bwd", [d], "combine", lambda d: (tok, seq), rs, True
                        )
            if layer > 0:
                sent = crossing("moe_transfer", group_nodes(combined), True)
                done = expert_round("experts_bwd", sent, True)
                grads_at_experts[i] = crossing("moe_transfer", done, False)
    if not work.optimizer:
        return g
    everything = [n for names in pending.values() for n in names]
    everything += [n for per in grads_at_experts.values() for names in per.values() for n in names]
    synced = g.collective(
        "gradient_sync",
        "all_reduce",
        attn_devs,
        (s.layers * s.replicated_layer_params() + s.hidden) * F32_BYTES,
        everything,
    )
    if lay.attention_groups > 1:
        for k in range(gsize):
            peers = [grp[k] for grp in groups]
            synced += g.collective(
                "gradient_sync", "all_reduce", peers, (g.params[peers[0]]) * F32_BYTES, everything
            )
    for d in attn_devs + exp_devs:
        _adamw(g, d, synced)
    return g


def _adamw(g: _Graph, device: int, deps: list[str]) -> None:
    cost = P.forward_cost("adamw", int(g.params[device]))
    duration = program_time(cost, "memory", g.hw) + g.hw.program_overhead_s
    g.tasks.append(
        Task(
            g._name(f"adamw@{device}"),
            (g._dev(device),),
            duration,
            tuple(deps),
            "compute",
            cost.flops,
        )
    )


def baseline_graph(s: P.Shapes, hw: HardwareSpec, lay: BaselineLayout, work: Work) -> _Graph:
    """Tasks of one TP / PP / TP+PP step: lock-step GPipe ticks, tensor all-reduces, DP sync."""
    g = _Graph(s, hw)
    tp, pp, dp = lay.tensor, lay.stages, lay.data
    m = lay.microbatches if (work.train and pp > 1) else 1
    local = P.ceil_div(work.batch, dp)
    b = P.ceil_div(local, m)
    seq = work.seq_len
    cap = s.capacity(seq)
    train = work.train
    per_stage = s.layers // pp
    heads = s.heads // tp
    experts = s.experts // tp
    rows = P.vocab_shard(s.vocab, pp * tp)
    act32 = P.activation_bytes(s, b, seq, F32_BYTES)
    ticks = m + pp - 1

    def devs(d: int, st: int | None = None) -> list[int]:
        stages = range(pp) if st is None else [st]
        return [lay.device(d, x, t) for x in stages for t in range(tp)]

    for d in range(dp):
        for st in range(pp):
            for dev in devs(d, st):
                g.params[dev] = (
                    per_stage
                    * (
                        s.attention_params(heads)
                        + s.expert_params(experts)
                        + s.replicated_layer_params()
                    )
                    + s.vocab_params(rows)
                    + s.hidden
                )
                if train and s.checkpointing:
                    g.saved_bytes[dev] = (per_stage + 1) * ticks * b * seq * s.hidden * F32_BYTES

    def attention_args(_: int) -> tuple:
        return (heads, b, seq) if train else (heads, b, work.context)

    attn_builder = "attention" if train else "decode_attention"

    def tick(d: int, st: int, deps: list[str], backward: bool) -> list[str]:
        group = devs(d, st)
        cur = deps
        suffix = "_bwd" if backward else ""
        for _ in range(per_stage):
            cur = g.stage(
                "attention" + suffix, group, attn_builder, attention_args, cur, backward, train
            )
            cur = g.collective("tensor_all_reduce", "all_reduce", group, act32, cur)
            cur = g.stage(
                "route" + suffix, group, "route_dispatch", lambda _: (b, seq), cur, backward, train
            )
            cur = g.stage(
                "experts" + suffix,
                group,
                "experts",
                lambda _: (experts, b, cap, train),
                cur,
                backward,
                train,
            )
            cur = g.stage(
                "combine" + suffix, group, "combine", lambda _: (b, seq), cur, backward, train
            )
            cur = g.collective("tensor_all_reduce", "all_reduce", group, act32, cur)
        return cur

    def run_ticks(d: int, start: list[str], backward: bool) -> list[str]:
        prev = {st: list(start) for st in range(pp)}
        for _ in range(ticks):
            done = {st: tick(d, st, prev[st], backward) for st in range(pp)}
            if pp == 1:
                prev = done
                continue
            sent = []
            for st in range(pp - 1):
                src, dst = (st, st + 1) if not backward else (st + 1, st)
                for t in range(tp):
                    a, z = lay.device(d, src, t), lay.device(d, dst, t)
                    sent.append(
                        g.transfer(
                            "pipeline_send", g.node(a), g.node(z), act32, done[src] + done[dst]
                        )
                    )
            prev = {st: sent for st in range(pp)}
        return [n for names in prev.values() for n in names]

    ends = []
    for d in range(dp):
        replica = devs(d)
        e = g.stage("embed", replica, "embed", lambda _: (rows, local, seq), [], False, train)
        e = g.collective(
            "embedding", "all_reduce", replica, P.activation_bytes(s, local, seq, F32_BYTES), e
        )
        fwd = run_ticks(d, e, False)
        bc = g.collective(
            "head", "all_reduce", replica, P.activation_bytes(s, local, seq, F32_BYTES), fwd
        )
        h = g.stage("lm_head", replica, "lm_head", lambda _: (rows, local, seq), bc, False, train)
        h = g.collective("head", "all_reduce", replica, 2 * local * seq * F32_BYTES, h)
        if not train:
            continue
        hb = g.stage("lm_head_bwd", replica, "lm_head", lambda _: (rows, local, seq), h, True)
        hb = g.collective(
            "head", "all_reduce", replica, P.activation_bytes(s, local, seq, F32_BYTES), hb
        )
        ends += run_ticks(d, hb, True)
    if not train or not work.optimizer:
        return g
    synced = list(ends)
    if dp > 1:
        for st in range(pp):
            for t in range(tp):
                peers = [lay.device(d, st, t) for d in range(dp)]
                synced += g.collective(
                    "gradient_sync", "all_reduce", peers, g.params[peers[0]] * F32_BYTES, ends
                )
    for dev in range(lay.devices):
        _adamw(g, dev, synced)
    return g


# --- metrics -------------------------------------------------------------------------------------
COMM_KINDS = (
    "attention",
    "moe_transfer",
    "tensor_all_reduce",
    "pipeline_send",
    "gradient_sync",
    "embedding",
    "head",
)


def summarize(
    g: _Graph, timeline: Timeline, work: Work, devices: int, pools: dict[str, list[int]]
) -> dict[str, Any]:
    """Step time, busy fractions, link use, communication, memory and energy of a simulated step."""
    hw = g.hw
    t = timeline.makespan
    busy = {}
    for d in range(devices):
        busy[d] = sum(
            x.duration for x in g.tasks if x.kind == "compute" and f"dev:{d}" in x.resources
        )
    pool_busy = {
        name: (sum(busy[d] for d in devs) / (len(devs) * t) if t > 0 else 0.0)
        for name, devs in pools.items()
    }
    links = {
        r: timeline.busy(r) / t
        for r in timeline.resources()
        if r.split(":")[0] in ("nic_out", "nic_in", "nvswitch", "nvlink")
    }
    comm = {}
    for kind in COMM_KINDS:
        chosen = [x for x in g.tasks if x.kind == kind]
        if not chosen:
            continue
        comm[kind] = {
            "bytes_per_step": sum(x.nbytes for x in chosen),
            "bytes_per_layer": sum(x.nbytes for x in chosen) / g.s.layers,
            "time_share": timeline.active_time(lambda x, k=kind: x.kind == k) / t if t else 0.0,
        }
    comm_total = timeline.active_time(lambda x: x.kind != "compute") / t if t else 0.0
    memory = {}
    for d in range(devices):
        state = g.params[d] * (ADAMW_STATE_BYTES if work.train else F32_BYTES)
        act = g.saved_bytes[d] + g.peak_output[d]
        memory[d] = {
            "state_bytes": state,
            "activation_bytes": act,
            "total_bytes": state + act,
            "cpu_compiled_temp_bytes": g.peak_temp[d],
        }
    busy_energy = sum(busy.values()) * hw.tdp_w
    idle_energy = sum(max(0.0, t - busy[d]) for d in range(devices)) * hw.idle_w
    tokens = work.tokens if work.train else work.batch
    flops = sum(x.nbytes for x in g.tasks if x.kind == "compute")
    return {
        "time_s": t,
        "tokens": tokens,
        "tokens_per_s": tokens / t if t else 0.0,
        "busy_fraction": {str(d): busy[d] / t if t else 0.0 for d in range(devices)},
        "busy_pool": pool_busy,
        "busy_mean": sum(busy.values()) / (devices * t) if t else 0.0,
        "link_utilisation": links,
        "communication": comm,
        "communication_time_share": comm_total,
        "memory": memory,
        "memory_bytes_max": max(v["total_bytes"] for v in memory.values()),
        "energy_j": busy_energy + idle_energy,
        "energy_mj_per_token": 1e3 * (busy_energy + idle_energy) / tokens if tokens else 0.0,
        "flops_per_step": flops,
        "tasks": len(g.tasks),
    }


def run(
    s: P.Shapes, hw: HardwareSpec, layout: MALayout | BaselineLayout, work: Work
) -> tuple[dict, Timeline]:
    """Simulate one step of `layout` on `hw`; (metrics, timeline)."""
    if isinstance(layout, MALayout):
        g = ma_graph(s, hw, layout, work)
        pools = {
            "attention": list(layout.attention_devices),
            "experts": list(layout.expert_devices),
        }
    else:
        g = baseline_graph(s, hw, layout, work)
        pools = {"all": list(range(layout.devices))}
        if layout.stages > 1:
            for st in range(layout.stages):
                pools[f"stage{st}"] = [
                    layout.device(d, st, t)
                    for d in range(layout.data)
                    for t in range(layout.tensor)
                ]
    timeline = simulate(g.tasks)
    return summarize(g, timeline, work, layout.devices, pools), timeline
