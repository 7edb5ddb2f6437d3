"""One iteration's plan as every rank of a pipeline group receives it: the table, its
compiled execution plan, the batch metadata and the sub-microbatch members (pure Python).

A runtime needs nothing else to run its rank: which stage runs which (sub-)microbatch
in which order, every P2P message with its shapes, from the metadata the data of each
sub-microbatch, and the memory strategy of every forward (the planner's per-pair
recompute / offload choice, executed by models/memory.py). `content_hash` names the
whole thing, so ranks can check they execute the same plan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..config import ModelSpec, ModuleKind
from ..ir import ScheduleTable
from ..semu import SimResult
from ..workload import GlobalBatch, TokenRules
from .compile import compile_table
from .execplan import ExecutionPlan
from .messages import split_owner, stage_outputs
from .submicro import split_evenly

MemoryChoice = tuple[int, int, int, int, int]
"""(stage, microbatch, sub, recompute layers, offload layers)."""

MEMORY_STRATEGIES = ("planned", "none", "recompute", "offload", "mixed")
"""`pipeweaver verify --memory-strategy`: the planner's own choice, or one forced on every
forward (mixed: forwards in turn keep everything, recompute every layer, offload every
layer, and recompute half then offload the rest); runtime/verify.forced_memory."""

Members = Mapping[str, Sequence[Sequence[Sequence[int]]]]
"""Per module, per microbatch, the instance indices of each sub-microbatch."""


@dataclass(frozen=True, kw_only=True)
class IterationPlan:
    """Everything a rank needs to execute one iteration."""

    table: ScheduleTable
    execution: ExecutionPlan
    batch: GlobalBatch
    members: dict[str, tuple[tuple[tuple[int, ...], ...], ...]]
    """Modules split into sub-microbatches only (others: one sub holding everything)."""
    dtype: str
    tp: int = 1
    memory: tuple[MemoryChoice, ...] = ()
    """(stage, microbatch, sub, recompute layers, offload layers) of every forward that
    does not keep all its activations, sorted (absent: keep them all)."""
    sequence_parallel: bool = False
    """The chunks run sequence-parallel (tp > 1): hidden-state messages are each TP
    rank's ceil(n / tp) rows (planner.messages)."""

    @property
    def content_hash(self) -> str:
        text = json.dumps({"execution": self.execution.content_hash,
                           "samples": [[s.sample_id for s in mb.samples]
                                       for mb in self.batch.microbatches],
                           "members": self.members, "dtype": self.dtype, "tp": self.tp,
                           **({"memory": self.memory} if self.memory else {}),
                           **({"sequence_parallel": True} if self.sequence_parallel else {})},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def strategy(self, stage: int, microbatch: int, sub: int) -> tuple[int, int]:
        """(recompute, offload) transformer layers of one forward."""
        for s, m, k, recompute, offload in self.memory:
            if (s, m, k) == (stage, microbatch, sub):
                return recompute, offload
        return 0, 0

    def subs_of(self, microbatch: int) -> dict[str, list[tuple[int, ...]]]:
        """planner.messages' `subs` for one microbatch."""
        return {name: [tuple(s) for s in per_mb[microbatch]] for name, per_mb in self.members.items()}

    def sub_members(self, module: str, microbatch: int, sub: int) -> tuple[int, ...] | None:
        """Instances of one sub-microbatch of a stage's first module (None: all)."""
        per_mb = self.members.get(module)
        return None if per_mb is None else tuple(per_mb[microbatch][sub])


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
