"""plan_iteration: one iteration's ir.plan.IterationPlan from a table and its batch (the
table compiled with the batch's shapes, the sub-microbatch members, the memory
strategies), and the members of a table's split modules (pure Python).

A runtime needs nothing else to run its rank: which stage runs which (sub-)microbatch
in which order, every P2P message with its shapes, from the metadata the data of each
sub-microbatch, and the memory strategy of every forward (the planner's per-pair
recompute / offload choice, executed by models/memory.py). `content_hash` names the
whole thing, so ranks can check they execute the same plan.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..config import ModelSpec, ModuleKind
from ..ir import ScheduleTable
from ..semu import SimResult
from ..workload import GlobalBatch, TokenRules
from .compile import compile_table
from ..ir.plan import IterationPlan, MemoryChoice
from ..ir.messages import split_owner, stage_outputs
from .submicro import split_evenly


MEMORY_STRATEGIES = ("planned", "none", "recompute", "offload", "mixed")
"""`pipeweaver verify --memory-strategy`: the planner's own choice, or one forced on every
forward (mixed: forwards in turn keep everything, recompute every layer, offload every
layer, and recompute half then offload the rest); runtime/verify.forced_memory."""

Members = Mapping[str, Sequence[Sequence[Sequence[int]]]]
"""Per module, per microbatch, the instance indices of each sub-microbatch."""


def table_members(model: ModelSpec, table: ScheduleTable, batch: GlobalBatch,
                  members: Members | None = None) -> dict[str, tuple]:
    """The members of the table's split modules: from the planner's SubMicrobatches, or
    (without them) an even split of each microbatch's instances into the table's counts."""
    out = {}
    for module, counts in table.sub_microbatches:
        owner = split_owner(model, module)
        if model.module(module).kind == ModuleKind.LANGUAGE_MODEL:
            continue
        if members is not None and owner in members:
            per_mb = members[owner]
        else:
            per_mb = []
            for m, count in enumerate(counts):
                n = _instances(model, owner, batch, m)
                runs = split_evenly(n, -(-n // count)) if count else []
                if len(runs) != count:
                    raise ValueError(f"{module}: cannot split {n} instances of microbatch {m} "
                                     f"into {count} sub-microbatches")
                per_mb.append([tuple(r) for r in runs])
        out[module] = tuple(tuple(tuple(s) for s in subs) for subs in per_mb)
    return out


def _instances(model: ModelSpec, module: str, batch: GlobalBatch, m: int) -> int:
    microbatch = batch.microbatches[m]
    kind = model.module(module).kind
    return len(microbatch.clips) if kind == ModuleKind.GENERATOR else len(microbatch.images)


def memory_choices(strategies: Mapping | None) -> tuple[MemoryChoice, ...]:
    """IterationPlan.memory of a MemoryPlan's strategies ({(stage, mb, sub): Strategy})."""
    return tuple(sorted((*key, s.recompute_layers, s.offload_layers)
                        for key, s in (strategies or {}).items() if not s.trivial))


def plan_iteration(model: ModelSpec, table: ScheduleTable, batch: GlobalBatch, rules: TokenRules,
                   dtype: str = "float32", tp: int = 1, members: Members | None = None,
                   timeline: SimResult | None = None, strategies: Mapping | None = None,
                   sequence_parallel: bool = False) -> IterationPlan:
    """Compile a table for one batch (shapes from the batch's metadata); strategies:
    the planner's MemoryPlan.strategies, carried to the runtime; sequence_parallel: the
    run's chunks shard hidden states over tp (taken only with tp > 1)."""
    sequence_parallel = sequence_parallel and tp > 1
    if len(batch.microbatches) != table.num_microbatches:
        raise ValueError(f"the table has {table.num_microbatches} microbatches, the batch "
                         f"{len(batch.microbatches)}")
    split = table_members(model, table, batch, members)
    layout = table.layout

    def shapes_of(src: int, dst: int, m: int, sub: int):
        module = layout.stages[src].parts[0].module
        chosen = split[module][m][sub] if module in split else None
        return stage_outputs(model, layout, src, batch.microbatches[m], chosen, rules, dtype, tp,
                             sequence_parallel)

    execution = compile_table(table, shapes_of, timeline)
    return IterationPlan(table=table, execution=execution, batch=batch, members=split,
                         dtype=dtype, tp=tp, memory=memory_choices(strategies),
                         sequence_parallel=sequence_parallel)
