"""Simulate a schedule over several iterations of a workload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..ir import ScheduleTable
from ..workload import GlobalBatch
from .costs import CostModel, ReuseStats
from .simulate import SimResult, simulate

Planner = Callable[[GlobalBatch], tuple]
"""Gives the table to run for a batch, the shapes of its (sub-)microbatches and
optionally its stage costs with the memory strategy chosen (a PricedBatch)."""


@dataclass(frozen=True, kw_only=True)
class WorkloadSimulation:
    """Per-iteration results and their summary."""

    results: tuple[SimResult, ...]
    tables: tuple[ScheduleTable, ...]
    reuse: ReuseStats

    @property
    def iteration_time_s(self) -> list[float]:
        return [r.iteration_time_s for r in self.results]

    @property
    def mean_iteration_time_s(self) -> float:
        return sum(self.iteration_time_s) / len(self.results)

    def mean(self, attribute: str) -> float:
        """Mean of a scalar SimResult attribute over iterations."""
        return sum(getattr(r, attribute) for r in self.results) / len(self.results)

    @property
    def peak_memory_gib(self) -> list[float]:
        """Per rank, the highest peak over iterations."""
        return [max(r.peak_memory_gib[rank] for r in self.results)
                for rank in range(len(self.results[0].peak_memory_gib))]

    def to_dict(self) -> dict:
        return {"iteration_time_s": self.iteration_time_s,
                "mean_iteration_time_s": self.mean_iteration_time_s,
                "lower_bound_s": self.mean("lower_bound_s"),
                "bubble_ratio": self.mean("bubble_ratio"), "mfu": self.mean("mfu"),
                "peak_memory_gib": self.peak_memory_gib,
                "reuse": {"hits": self.reuse.hits, "misses": self.reuse.misses}}


def simulate_workload(costs: CostModel, batches: Sequence[GlobalBatch], plan: Planner,
                      detail_first: bool = True) -> WorkloadSimulation:
    """Plan and simulate every batch; the first keeps per-action detail for exports."""
    results, tables = [], []
    for i, batch in enumerate(batches):
        table, shapes, *priced = plan(batch)
        results.append(simulate(costs, table, shapes, detail=detail_first and i == 0,
                                priced=priced[0] if priced else None))
        tables.append(table)
    return WorkloadSimulation(results=tuple(results), tables=tuple(tables),
                              reuse=ReuseStats(costs.stats.hits, costs.stats.misses))
