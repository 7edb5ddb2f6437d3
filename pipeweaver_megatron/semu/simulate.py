"""Simulate one iteration of a ScheduleTable: times, bubbles, MFU, memory.

Per action: a forward holds the stage's saved activations from its start until the
matching backward ends; a forward sends its output to downstream stages on other ranks
and a backward sends the gradient back, each taking latency + bytes / bandwidth of the
link between the two ranks (intra-node or inter-node from Megatron's rank order: TP
fastest, then DP, then PP). After its last action a rank reduces gradients over data
parallelism and steps the optimizer; the iteration ends when the slowest rank is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, NamedTuple, Sequence

from ..config import ModelSpec
from ..ir import Action, Layout, Op, ScheduleTable
from ..ir.graph import ActionGraph, EdgeKind, action_graph
from ..workload import GlobalBatch, TokenRules
from .core import run_streams
from .costs import CostModel, StageCost
from .memory import ADAM_TRAFFIC_BYTES
from .ops import OpClass
from .shapes import ModuleShape, microbatch_shapes

BatchShapes = Mapping[str, Sequence[Sequence[ModuleShape]]]
"""Module -> per microbatch -> per sub-microbatch shape."""

GIB = 2**30


class Transfer(NamedTuple):
    """One simulated P2P message: from the end of ``producer`` on rank src until
    ``consumer`` on rank dst may start (the actions, not label strings, name it)."""

    src: int
    dst: int
    start: float
    end: float
    producer: Action
    consumer: Action

    @property
    def label(self) -> str:
        """``producer->consumer``, for traces."""
        return f"{self.producer}->{self.consumer}"


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """What one simulated iteration predicts."""

    iteration_time_s: float
    pipeline_time_s: float
    """When the last compute action ends."""
    lower_bound_s: float
    """Busiest rank's compute + its gradient reduction and optimizer step."""
    bubble_ratio: float
    mfu: float
    busy_s: tuple[float, ...]
    dp_time_s: tuple[float, ...]
    optimizer_time_s: tuple[float, ...]
    peak_memory_bytes: tuple[float, ...]
    static_memory_bytes: tuple[float, ...]
    memory_timeline: tuple[tuple[tuple[float, float], ...], ...]
    """Per rank: (time, bytes in use) after each change."""
    actions: tuple[tuple[Action, ...], ...]
    starts: tuple[tuple[float, ...], ...]
    ends: tuple[tuple[float, ...], ...]
    transfers: tuple[Transfer, ...]
    """Every P2P message's transfer."""

    @property
    def peak_memory_gib(self) -> list[float]:
        return [b / GIB for b in self.peak_memory_bytes]


def batch_shapes(model: ModelSpec, batch: GlobalBatch, rules: TokenRules) -> dict[str, list[list[ModuleShape]]]:
    """Shapes of a global batch without sub-microbatch splits (one sub per microbatch)."""
    out: dict[str, list[list[ModuleShape]]] = {name: [] for name in model.order}
    for microbatch in batch.microbatches:
        shapes = microbatch_shapes(model, microbatch, rules)
        for name in model.order:
            out[name].append([shapes.get(name, ModuleShape(()))])
    return out


@dataclass(frozen=True)
class PricedBatch:
    """Stage costs of one batch on one layout: costs[stage][microbatch][sub]."""

    costs: tuple[tuple[tuple[StageCost, ...], ...], ...]


def price(costs: CostModel, layout: Layout, shapes: BatchShapes,
          recompute: Collection[int] = ()) -> PricedBatch:
    """Price every (stage, microbatch, sub) once; reusable for any table on this layout."""
    ids = {name: [[costs.shape_id(sh) for sh in subs] for subs in per_mb]
           for name, per_mb in shapes.items()}
    out = []
    for stage in layout.stages:
        parts, structure = stage.parts, costs.structure(stage.parts)
        first, redo = parts[0].module, stage.index in recompute
        per_mb = []
        for m in range(len(shapes[first])):
            row = []
            for k in range(len(shapes[first][m])):
                key = (structure, tuple(ids[p.module][m][k] for p in parts), redo)
                found = costs.cached(key)
                if found is None:
                    found = costs.stage_cost(parts, {p.module: shapes[p.module][m][k]
                                                     for p in parts}, redo, key)
                row.append(found)
            per_mb.append(tuple(row))
        out.append(tuple(per_mb))
    return PricedBatch(tuple(out))


def simulate(costs: CostModel, table: ScheduleTable, shapes: BatchShapes,
             recompute: Collection[int] = (), distributed_optimizer: bool = True,
             detail: bool = True, priced: PricedBatch | None = None) -> SimResult:
    """Simulate one iteration; recompute names the stages that recompute every layer.

    detail=False skips per-action times, memory timelines and transfers (what a search
    needs is the summary); priced reuses a price() of the same layout and shapes.
    """
    layout = table.layout
    cost = (priced or price(costs, layout, shapes, recompute)).costs
    stage_rank = [s.rank for s in layout.stages]
    subs = [[len(per_sub) for per_sub in per_mb] for per_mb in cost]
    ones = [1] * table.num_microbatches
    declared = dict(table.sub_microbatches)
    for s in layout.stages:
        if list(declared.get(s.parts[0].module, ones)) != subs[s.index]:
            raise ValueError(f"stage {s.index}: the table's sub-microbatch counts differ from "
                             "the shapes given")
    flat: list[Action] = [a for actions in table.ranks for a in actions]
    order, k = [], 0
    for actions in table.ranks:
        order.append(range(k, k + len(actions)))
        k += len(actions)
    graph = action_graph(table)
    sizes, delays = _transfers(costs, graph, cost)
    deps_of, actions = graph.dependencies, graph.actions
    ids = graph.ids(flat)
    pos = [0] * len(actions)
    for i, gid in enumerate(ids):
        pos[gid] = i
    compiled = _Compiled()
    for gid in ids:
        a = actions[gid]
        c = cost[a.stage][a.microbatch][a.sub]
        rank = stage_rank[a.stage]
        backward = a.op is Op.B
        if backward:
            compiled.duration.append(c.backward_s)
            compiled.saved.append(-c.saved_bytes)
        else:
            compiled.duration.append(c.forward_s)
            compiled.saved.append(c.saved_bytes)
            compiled.flops += c.model_flops
        found = []
        for e in graph.input_ids(gid):
            dep = deps_of[e]
            found.append((pos[dep.producer], delays[e]))
            if dep.cross_rank:
                compiled.messages.append((rank, len(compiled.deps), found[-1], sizes[e],
                                          backward))
        compiled.deps.append(found)
    timeline = run_streams(order, compiled.duration, compiled.deps)
    return _result(costs, table, flat, order, compiled, timeline, stage_rank,
                   distributed_optimizer, detail)


class _Compiled:
    """Per action (flat index): duration, saved bytes (+ at a forward, - at a backward),
    dependencies; the forward FLOPs; and the cross-rank messages
    (consumer rank, consumer index, (producer index, delay), bytes, is gradient)."""

    def __init__(self) -> None:
        self.duration: list[float] = []
        self.saved: list[float] = []
        self.deps: list[list[tuple[int, float]]] = []
        self.flops = 0.0
        self.messages: list[tuple[int, int, tuple[int, float], float, bool]] = []


class Links:
    """P2P delay between pipeline ranks (Megatron rank order: TP, DP, then PP)."""

    def __init__(self, costs: CostModel) -> None:
        par, self.hw = costs.model.parallel, costs.hardware
        self.stride = costs.parallel.tp * par.dp
        fac = costs.calibration.factor(OpClass.P2P)
        self.a_n, self.overhead = fac.a_n, fac.overhead_s

    def _same_node(self, src: int, dst: int) -> bool:
        per_node = self.hw.gpus_per_node
        return (src * self.stride) // per_node == (dst * self.stride) // per_node

    def delay(self, src: int, dst: int) -> float:
        """Seconds per byte between two pipeline ranks (0 on the same rank)."""
        if src == dst:
            return 0.0
        same = self._same_node(src, dst)
        return self.a_n / (self.hw.intra_node_bandwidth if same else self.hw.inter_node_bandwidth)

    def between_stages(self, layout: Layout) -> tuple[list[list[float]], list[list[float]]]:
        """[src stage][dst stage] seconds per byte and seconds per message."""
        per_byte = [[self.delay(a.rank, b.rank) for b in layout.stages] for a in layout.stages]
        fixed = [[self.fixed(a.index, b.index, layout) for b in layout.stages]
                 for a in layout.stages]
        return per_byte, fixed

    def fixed(self, src_stage: int, dst_stage: int, layout: Layout) -> float:
        """Per-message latency between the ranks of two stages (0 on the same rank)."""
        src, dst = layout.stages[src_stage].rank, layout.stages[dst_stage].rank
        if src == dst:
            return 0.0
        same = self._same_node(src, dst)
        return self.overhead + (self.hw.intra_node_latency if same else self.hw.inter_node_latency)


def transfer_delays(costs: CostModel, graph: ActionGraph,
                    cost: Sequence[Sequence[Sequence[StageCost]]]) -> list[float]:
    """Seconds from the end of each dependency's producer until its consumer may start
    (per ActionGraph.dependencies): latency + bytes / bandwidth between the two stages'
    ranks for the forward output it carries (an activation, or that output's gradient);
    0 for a backward's own forward and on one rank. SEMU and the interleaver price
    transfers with it alone."""
    return _transfers(costs, graph, cost)[1]


def _transfers(costs: CostModel, graph: ActionGraph,
               cost: Sequence[Sequence[Sequence[StageCost]]]) -> tuple[list[float], list[float]]:
    """(bytes, delay) per dependency, cached on the graph per priced batch."""
    key = (id(costs), id(cost))
    hit = graph.memo.get(key)
    if hit is not None and hit[0] is costs and hit[1] is cost:
        return hit[2]
    per_byte, fixed = Links(costs).between_stages(graph.layout)
    sizes, delays = [], []
    actions = graph.actions
    for dep in graph.dependencies:
        if dep.kind is EdgeKind.OWN_FORWARD:
            sizes.append(0.0)
            delays.append(0.0)
            continue
        src, dst = actions[dep.producer], actions[dep.consumer]
        carried = src if dst.op is Op.F else dst  # the forward whose output travels
        size = cost[carried.stage][carried.microbatch][carried.sub].output_bytes
        sizes.append(size)
        delays.append(per_byte[src.stage][dst.stage] * size + fixed[src.stage][dst.stage])
    if len(graph.memo) >= 8:
        graph.memo.pop(next(iter(graph.memo)))
    graph.memo[key] = (costs, cost, (sizes, delays))
    return sizes, delays


def _p2p_buffers(compiled: _Compiled, timeline, ranks: int) -> list[list]:
    """Memory events of received tensors: an activation is held from its arrival until
    its forward starts (its saved activations include it from then on), a gradient from
    its arrival until its backward ends."""
    events: list[list] = [[] for _ in range(ranks)]
    start, end = timeline.start, timeline.end
    for rank, i, (j, delay), size, gradient in compiled.messages:
        out = events[rank]
        out.append((end[j] + delay, 1, size))
        out.append((end[i] if gradient else start[i], 0, -size))
    return events


def _result(costs, table, flat, order, compiled: _Compiled, timeline, stage_rank,
            distributed_optimizer, detail) -> SimResult:
    hw, par = costs.hardware, costs.model.parallel
    static = costs.static_memory(table.layout, distributed_optimizer)
    shards = par.dp if distributed_optimizer else 1
    coll = costs.calibration.factor(OpClass.COLLECTIVE)
    elem = costs.calibration.factor(OpClass.ELEMENTWISE)
    dp_bw = hw.intra_node_bandwidth if costs.parallel.tp * par.dp <= hw.gpus_per_node \
        else hw.inter_node_bandwidth
    start, end = timeline.start, timeline.end
    fixed = costs.calibration.iteration_overhead_s
    busy, dp_time, opt_time, finish, peaks, lines = [], [], [], [], [], []
    duration, saved, deps = compiled.duration, compiled.saved, compiled.deps
    buffers = _p2p_buffers(compiled, timeline, len(order))
    for rank, idx in enumerate(order):
        params = static[rank].params
        busy.append(sum(duration[i] for i in idx))
        grads = params * hw.dtype_bytes
        dp_time.append(0.0 if par.dp == 1 or not params else
                       coll.overhead_s + coll.a_n * 2 * (par.dp - 1) / par.dp * grads / dp_bw)
        opt_time.append(elem.a_m * ADAM_TRAFFIC_BYTES * params / shards / hw.memory_bandwidth)
        finish.append(timeline.rank_end[rank] + dp_time[-1] + opt_time[-1] + fixed)
        events = buffers[rank]
        events += [(start[i], 1, saved[i]) if saved[i] >= 0 else (end[i], 0, saved[i])
                   for i in idx]
        events.sort()
        level = peak = static[rank].total_bytes
        line = [(0.0, level)]
        for time, _, delta in events:
            level += delta
            if level > peak:
                peak = level
            if detail:
                line.append((time, level))
        peaks.append(peak)
        lines.append(tuple(line))
    iteration = max(finish)
    makespan = max(timeline.rank_end)
    gpus = table.layout.num_ranks * costs.parallel.tp
    transfers = []
    for i, found in enumerate(deps if detail else ()):
        for j, delay in found:
            src, dst = stage_rank[flat[j].stage], stage_rank[flat[i].stage]
            if src != dst:
                transfers.append(Transfer(src, dst, end[j], end[j] + delay, flat[j], flat[i]))
    return SimResult(
        iteration_time_s=iteration, pipeline_time_s=makespan,
        lower_bound_s=max(b + d + o for b, d, o in zip(busy, dp_time, opt_time)) + fixed,
        bubble_ratio=1 - sum(busy) / (len(order) * makespan) if makespan else 0.0,
        mfu=3 * compiled.flops / (iteration * gpus * hw.peak_flops) if iteration else 0.0,
        busy_s=tuple(busy), dp_time_s=tuple(dp_time), optimizer_time_s=tuple(opt_time),
        peak_memory_bytes=tuple(peaks), static_memory_bytes=tuple(s.total_bytes for s in static),
        memory_timeline=tuple(lines) if detail else (),
        actions=tuple(tuple(flat[i] for i in idx) for idx in order) if detail else (),
        starts=tuple(tuple(start[i] for i in idx) for idx in order) if detail else (),
        ends=tuple(tuple(end[i] for i in idx) for idx in order) if detail else (),
        transfers=tuple(transfers))
