"""One iteration's plan as every rank of a pipeline group receives it: the table, its
compiled execution plan, the batch metadata, the sub-microbatch members, the memory
strategy of every forward and whether the chunks run sequence-parallel (pure Python;
planner.iteration.plan_iteration builds it).

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

from ..workload import GlobalBatch
from .execplan import ExecutionPlan
from .table import ScheduleTable

MemoryChoice = tuple[int, int, int, int, int]
"""(stage, microbatch, sub, recompute layers, offload layers)."""


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
    rank's ceil(n / tp) rows (ir.messages)."""

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
        """ir.messages' `subs` for one microbatch."""
        return {name: [tuple(s) for s in per_mb[microbatch]] for name, per_mb in self.members.items()}

    def sub_members(self, module: str, microbatch: int, sub: int) -> tuple[int, ...] | None:
        """Instances of one sub-microbatch of a stage's first module (None: all)."""
        per_mb = self.members.get(module)
        return None if per_mb is None else tuple(per_mb[microbatch][sub])
