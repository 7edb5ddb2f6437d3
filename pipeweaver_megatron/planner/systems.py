"""Every schedule `pipeweaver simulate` and the benchmarks can run, behind one call.

A system plans one global batch and returns (table, shapes, priced costs), a
semu.Planner. Static systems: the foundation's baselines on Megatron's placement
(gpipe, megatron-1f1b, megatron-interleaved) and the paper's comparison baselines
(megatron-vpp, nnscaler, optimus). Their memory policy is the one a Megatron user sets
for a whole run: no recompute when the batch fits the device, otherwise every layer
recomputed (--recompute-granularity full). `pipeweaver` searches a plan per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..schedules import Baseline, ScheduleError, build_baseline
from ..semu import CostModel, PricedBatch, batch_shapes, price, simulate
from ..workload import GlobalBatch, TokenRules
from .baselines import Comparison, build_comparison
from .search import PipeWeaverPlanner, PlanResult, SearchSettings
from .partition import partition

PIPEWEAVER = "pipeweaver"
SYSTEMS = (PIPEWEAVER, *(c.value for c in Comparison), *(b.value for b in Baseline))
RUNNABLE = (Baseline.MEGATRON_1F1B.value, Baseline.MEGATRON_INTERLEAVED.value, PIPEWEAVER)
"""What the runtime executes: Megatron's own orders on its placement, and PipeWeaver."""


@dataclass
class FitToMemory:
    """Wraps a static table source with the run-wide memory policy."""

    costs: CostModel
    tables: Callable[[GlobalBatch], tuple]
    recomputed: int = 0
    """Batches that needed full recompute to fit."""

    def __call__(self, batch: GlobalBatch) -> tuple:
        table, shapes = self.tables(batch)[:2]
        plain = price(self.costs, table.layout, shapes)
        peak = max(simulate(self.costs, table, shapes, priced=plain, detail=False).peak_memory_bytes)
        if peak <= self.costs.hardware.memory_capacity:
            return table, shapes, plain
        self.recomputed += 1
        every = range(table.layout.num_stages)
        return table, shapes, price(self.costs, table.layout, shapes, recompute=every)


@dataclass
class PipeWeaverSystem:
    """Plans every batch; keeps each PlanResult for reports."""

    planner: PipeWeaverPlanner
    budget_ms: float
    seed: int
    plans: list[PlanResult] = field(default_factory=list)

    def __call__(self, batch: GlobalBatch) -> tuple[object, object, PricedBatch]:
        result = self.planner.plan(batch, self.budget_ms, self.seed + len(self.plans))
        self.plans.append(result)
        return result.table, result.sub_microbatches.shapes, result.memory.priced


def make_system(name: str, costs: CostModel, reference: GlobalBatch, budget_ms: float = 1000.0,
                seed: int = 0, settings: SearchSettings = SearchSettings()) -> Callable:
    """A semu.Planner for `name`; reference is a sample of the run's data (the first
    batch): nnScaler* profiles its static plan on it, PipeWeaver's chunk partitioner
    takes typical shapes from it."""
    if name == PIPEWEAVER:
        chunks = partition(costs, reference=reference)
        return PipeWeaverSystem(PipeWeaverPlanner(costs, chunks, settings), budget_ms, seed)
    if name in {c.value for c in Comparison}:
        return FitToMemory(costs, build_comparison(name, costs, reference).plan)
    if name in {b.value for b in Baseline}:
        model, rules, cache = costs.model, TokenRules.from_model(costs.model), {}

        def tables(batch: GlobalBatch) -> tuple:
            count = len(batch.microbatches)
            if count not in cache:
                cache[count] = build_baseline(model, name, count)
            return cache[count], batch_shapes(model, batch, rules)

        return FitToMemory(costs, tables)
    raise ScheduleError(f"unknown schedule {name!r}; known: {', '.join(SYSTEMS)}")
