"""The fallback: Megatron's own schedules on Megatron's placement, compiled for a batch,
or, for a PipeWeaver run (whose model chunks follow the run's modality-aware layout and
cannot take Megatron's placement), the planner's static order on that layout: default
priorities, the greedy dual-queue, one memory strategy for the batch, no search.

Used when the planner is late, dead, hung or wrong, and by the workers themselves when
the run's schedule is a baseline (so comparisons go through the same path). The table
depends only on the microbatch count and is cached; the compiled plan depends on the
batch's shapes and is built per batch.
"""

from __future__ import annotations

from functools import lru_cache

from ..config import ModelSpec
from ..ir import Layout, ScheduleTable
from ..planner.iteration import IterationPlan, plan_iteration
from ..planner.partition import ChunkPlan
from ..planner.search import PipeWeaverPlanner, SearchSettings
from ..semu import CostModel
from ..schedules import Baseline, ScheduleError, build_baseline, megatron_layout
from ..workload import GlobalBatch, TokenRules

FALLBACKS = (Baseline.MEGATRON_1F1B.value, Baseline.MEGATRON_INTERLEAVED.value)


def _vp(model: ModelSpec, schedule: str) -> int:
    if schedule not in FALLBACKS:
        raise ScheduleError(f"no fallback schedule {schedule!r}; known: {', '.join(FALLBACKS)}")
    return model.parallel.vp if schedule == Baseline.MEGATRON_INTERLEAVED.value else 1


def baseline_layout(model: ModelSpec, schedule: str, pp: int) -> Layout:
    """The stages of a fallback schedule (vp from the model for the interleaved one)."""
    return megatron_layout(model, pp, _vp(model, schedule))


@lru_cache(maxsize=32)
def baseline_table(model: ModelSpec, schedule: str, num_microbatches: int,
                   pp: int) -> ScheduleTable:
    """The validated table of a fallback schedule, cached per microbatch count."""
    return build_baseline(model, schedule, num_microbatches, pp=pp, vp=_vp(model, schedule))


def fallback_plan(model: ModelSpec, batch: GlobalBatch, rules: TokenRules, schedule: str,
                  pp: int, tp: int = 1, dtype: str = "float32",
                  sequence_parallel: bool = False) -> IterationPlan:
    """The iteration plan of `schedule` ("megatron-1f1b" or "megatron-interleaved") for
    one batch: the cached table, compiled with the batch's shapes."""
    table = baseline_table(model, schedule, len(batch.microbatches), pp)
    return plan_iteration(model, table, batch, rules, dtype=dtype, tp=tp,
                          sequence_parallel=sequence_parallel)


STATIC = SearchSettings(reorder=False, memory_optimization=False)
"""The fallback order of a PipeWeaver run: no search, deterministic."""


def static_plan(costs: CostModel, chunks: ChunkPlan, batch: GlobalBatch, rules: TokenRules,
                tp: int = 1, dtype: str = "float32", sequence_parallel: bool = False
                ) -> IterationPlan:
    """The fallback of a PipeWeaver run: its own layout, the static order (see above)."""
    result = PipeWeaverPlanner(costs, chunks, STATIC).plan(batch, 0.0, 0)
    return plan_iteration(costs.model, result.table, batch, rules, dtype=dtype, tp=tp,
                          members=result.sub_microbatches.members,
                          strategies=result.memory.strategies,
                          sequence_parallel=sequence_parallel)
