"""The comparison baselines of the paper's evaluation (PAPER.md, "Baselines"), as IR
schedules for SEMU to compare with PipeWeaver.

Each is built once per training run (its Layout is fixed) and plans one global batch at a
time: plan(batch) gives the table and the whole-microbatch shapes (no sub-microbatches),
so `baseline.plan` is a semu.Planner. A table depends only on the microbatch count; each
is validated once and cached.

[Note: baseline chunk counts] A module run is split into consecutive runs of layers by
schedules.placement.balanced_partition (the heaviest run as light as possible, then the
others balanced). vp is the model's parallel.vp, raised to 2 when it is 1 and the split
layers allow two chunks per rank (the paper runs Megatron with VPP), and capped at
layers // pp; with vp = 1 the interleaved order becomes Megatron's plain 1F1B.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from ..config import ModelSpec
from ..ir import Action, Layout, ModuleInfo, Op, Part, ScheduleTable, Stage, validate
from ..schedules import ScheduleError, megatron_1f1b, megatron_interleaved, module_infos
from ..schedules.placement import balanced_partition
from ..semu import BatchShapes, CostModel, batch_shapes
from ..workload import GlobalBatch, TokenRules, sample_workload

Unit = tuple[str, int]  # one layer: (module, layer index)


class ComparisonBaseline(Protocol):
    """A static baseline: a Layout for the run, a table and shapes per global batch."""

    name: str
    layout: Layout

    def plan(self, batch: GlobalBatch) -> tuple[ScheduleTable, BatchShapes]: ...


@dataclass
class StaticPlan:
    """A ComparisonBaseline whose per-rank order depends only on the microbatch count."""

    name: str
    layout: Layout
    model: ModelSpec
    order: Callable[[int], list[list[Action]]]
    """Per-rank actions for a microbatch count."""
    metadata: dict[str, int] = field(default_factory=dict)
    """What the builder decided (vp, reference iteration), copied into every table."""
    _tables: dict[int, ScheduleTable] = field(default_factory=dict, repr=False)

    def table(self, num_microbatches: int) -> ScheduleTable:
        """The validated table for this many microbatches (cached)."""
        if num_microbatches not in self._tables:
            table = ScheduleTable(layout=self.layout, num_microbatches=num_microbatches,
                                  ranks=tuple(tuple(r) for r in self.order(num_microbatches)),
                                  name=self.name, metadata=tuple(sorted(self.metadata.items())))
            validate(table)
            self._tables[num_microbatches] = table
        return self._tables[num_microbatches]

    def plan(self, batch: GlobalBatch) -> tuple[ScheduleTable, BatchShapes]:
        return (self.table(batch.num_microbatches),
                batch_shapes(self.model, batch, TokenRules.from_model(self.model)))


def layer_units(model: ModelSpec, modules: Sequence[str]) -> list[Unit]:
    """Every layer of these modules, in the given (model) order."""
    return [(n, i) for n in modules for i in range(model.module(n).num_layers)]


def _parts(units: Sequence[Unit]) -> tuple[Part, ...]:
    parts: list[Part] = []
    for name, layer in units:
        if parts and parts[-1].module == name:
            parts[-1] = Part(name, parts[-1].first_layer, layer + 1)
        else:
            parts.append(Part(name, layer, layer + 1))
    return tuple(parts)


def split_runs(units: Sequence[Unit], weights: Sequence[float], count: int) -> list[tuple[Part, ...]]:
    """`count` consecutive balanced runs (see [Note: baseline chunk counts])."""
    if len(units) < count:
        raise ScheduleError(f"{count} chunks need at least {count} layers, got {len(units)}")
    return [_parts(units[lo:hi]) for lo, hi in balanced_partition(list(weights), count)]


def param_runs(model: ModelSpec, modules: Sequence[str], count: int) -> list[tuple[Part, ...]]:
    """The layers of these modules in `count` runs balanced by parameter count (a layer
    weighs its module's input and output weights too); [] without layers."""
    units = layer_units(model, modules)
    weights = [model.part_params(n, i, i + 1) for n, i in units]
    return split_runs(units, weights, count) if units else []


def virtual_size(model: ModelSpec, layers: int) -> int:
    """Chunks per rank (see [Note: baseline chunk counts])."""
    pp, vp = model.parallel.pp, model.parallel.vp
    return max(1, min(vp if vp >= 2 else 2, layers // pp))


def _rank_orders(model: ModelSpec, runs: Sequence[tuple[Part, ...]], offset: int,
                 num_microbatches: int) -> list[list[Action]]:
    """Megatron's order (interleaved with >= 2 chunks per rank, else 1F1B) for runs that
    hold whole modules, as stages offset.. with chunk c of rank r at offset + c*P + r."""
    pp, names = model.parallel.pp, {p.module for parts in runs for p in parts}
    infos = tuple(ModuleInfo(m.name, m.num_layers, tuple(i for i in m.inputs if i in names))
                  for m in module_infos(model) if m.name in names)
    shadow = Layout(pp, infos, tuple(Stage(i, i % pp, parts) for i, parts in enumerate(runs)))
    if len(runs) > pp:
        table = megatron_interleaved(shadow, num_microbatches, model.parallel.microbatch_group_size)
    else:
        table = megatron_1f1b(shadow, num_microbatches)
    return [[a._replace(stage=a.stage + offset) for a in actions] for actions in table.ranks]


def _layout(model: ModelSpec, runs: Sequence[tuple[int, tuple[Part, ...]]]) -> Layout:
    stages = tuple(Stage(i, rank, parts) for i, (rank, parts) in enumerate(runs))
    return Layout(model.parallel.pp, module_infos(model), stages)


# ---- the three baselines -------------------------------------------------------------
def megatron_vpp(costs: CostModel, reference: GlobalBatch | None = None) -> StaticPlan:
    """Megatron-LM with VPP and "roughly parameter-balanced chunks" (PAPER.md).

    All layers of all modules in model order (encoder, projector, LM, generator) are cut
    into pp*vp consecutive chunks balanced by parameter count; chunk c of rank r is stage
    c*pp + r; Megatron's interleaved 1F1B order with the model's microbatch group size;
    whole microbatches. Unlike schedules.megatron_layout, no module is forced onto the
    first stage. The reference batch is not used.
    """
    model, pp = costs.model, costs.model.parallel.pp
    vp = virtual_size(model, len(layer_units(model, model.order)))
    runs = param_runs(model, model.order, pp * vp)
    layout = _layout(model, [(i % pp, parts) for i, parts in enumerate(runs)])
    return StaticPlan("megatron-vpp", layout, model,
                      lambda m: _rank_orders(model, runs, 0, m), {"vp": vp})


def layer_seconds(costs: CostModel, batch: GlobalBatch, units: Sequence[Unit]) -> list[float]:
    """Per layer, SEMU's forward + backward time averaged over the batch's microbatches
    (whole microbatches; a module's first and last layer carry its input and output)."""
    model = costs.model
    shapes = batch_shapes(model, batch, TokenRules.from_model(model))
    memo: dict[tuple, float] = {}
    out = []
    for name, layer in units:
        part = Part(name, layer, layer + 1)
        key = costs.structure((part,))
        if key not in memo:
            found = [costs.stage_cost((part,), {name: subs[0]}) for subs in shapes[name]]
            memo[key] = sum(c.forward_s + c.backward_s for c in found) / max(1, len(found))
        out.append(memo[key])
    return out


def nnscaler(costs: CostModel, reference: GlobalBatch | None = None) -> StaticPlan:
    """nnScaler*: a static plan, 1F1B, one segment (PAPER.md).

    One chunk per rank (stage r on rank r): all layers in model order cut into P
    consecutive runs balanced by SEMU time, each layer priced by layer_seconds on the
    reference batch, i.e. profiled once on the run's first batch. The split stays fixed
    while the data changes, which is why it degrades on the dynamic workload. Without a
    reference, the first batch of the model's own dataset (seed 0) is used. Megatron's
    1F1B order; whole microbatches.
    """
    model, pp = costs.model, costs.model.parallel.pp
    reference = reference or sample_workload(model, None, 1, 0)[0]
    units = layer_units(model, model.order)
    seconds = layer_seconds(costs, reference, units)
    runs = split_runs(units, [max(1, round(t * 1e9)) for t in seconds], pp)
    layout = _layout(model, list(enumerate(runs)))
    return StaticPlan("nnscaler", layout, model, lambda m: _rank_orders(model, runs, 0, m),
                      {"reference_iteration": reference.iteration})


def optimus(costs: CostModel, reference: GlobalBatch | None = None) -> StaticPlan:
    """Optimus: coarse-grained scheduling of encoder work into LM bubbles (PAPER.md).

    Layout, in pipeline order: the modules before the LM (encoder, projector on its last
    chunk) cut into P chunks, stage r on rank r; the LM cut into P*vp chunks in Megatron's
    interleaved placement; the modules after the LM (a generator) cut into P chunks,
    one per rank. Every cut is balanced by parameter count.

    Per rank, VLM: every encoder forward (microbatch order), the LM's Megatron
    interleaved 1F1B, then every encoder backward: encoder work fills the LM's warm-up
    and cool-down bubbles at whole-microbatch granularity, and encoder activations stay
    live from forward to backward (SEMU counts them), hence Optimus's higher peak memory.

    T2V: a generator is downstream, so the LM's backward of a microbatch needs the
    generator's backward of it and generator work cannot wait for the end. The LM there
    is the light text encoder, so it takes the encoder's role: per rank every LM forward
    (Megatron's virtual-microbatch order), the generator's Megatron 1F1B, then every LM
    backward (Megatron's backward order). LM work fills the generator's warm-up and
    cool-down bubbles, and LM activations stay live across the generator's pipeline.
    The reference batch is not used.
    """
    model, pp = costs.model, costs.model.parallel.pp
    order, lm = list(model.order), model.language_model.name
    before, after = order[:order.index(lm)], order[order.index(lm) + 1:]
    vp = virtual_size(model, model.language_model.num_layers)
    encoder, backbone, generator = (param_runs(model, names, count) for names, count in
                                    ((before, pp), ([lm], pp * vp), (after, pp)))
    lm_first, gen_first = len(encoder), len(encoder) + len(backbone)
    layout = _layout(model, [(i % pp, p) for i, p in enumerate(encoder + backbone + generator)])

    def ranks(m: int) -> list[list[Action]]:
        lm_order = _rank_orders(model, backbone, lm_first, m)
        gen_order = _rank_orders(model, generator, gen_first, m) if generator else None
        out = []
        for r in range(pp):
            core = lm_order[r] if gen_order is None else (
                [a for a in lm_order[r] if a.op is Op.F] + gen_order[r]
                + [a for a in lm_order[r] if a.op is Op.B])
            ends = [[Action(op, r, i) for i in range(m)] if encoder else [] for op in (Op.F, Op.B)]
            out.append(ends[0] + core + ends[1])
        return out

    return StaticPlan("optimus", layout, model, ranks, {"vp": vp})


class Comparison(str, enum.Enum):
    """The comparison baselines of the paper's evaluation."""

    MEGATRON_VPP = "megatron-vpp"
    NNSCALER = "nnscaler"
    OPTIMUS = "optimus"


COMPARISONS: dict[Comparison, Callable[[CostModel, GlobalBatch | None], StaticPlan]] = {
    Comparison.MEGATRON_VPP: megatron_vpp,
    Comparison.NNSCALER: nnscaler,
    Comparison.OPTIMUS: optimus,
}


def build_comparison(name: str | Comparison, costs: CostModel,
                     reference: GlobalBatch | None = None) -> ComparisonBaseline:
    """The named comparison baseline for a run; reference: the run's first batch (only
    nnscaler uses it). An unknown name raises ScheduleError (a ValueError)."""
    try:
        kind = Comparison(name)
    except ValueError:
        raise ScheduleError(f"unknown comparison baseline {name!r}; known: "
                            f"{', '.join(c.value for c in Comparison)}") from None
    return COMPARISONS[kind](costs, reference)
