"""Global validation of a ScheduleTable before anything runs it.

Rules, checked in this order:
1. sub-microbatch counts are well formed (and agree for modules sharing a stage);
2. every action names an existing stage on the rank that owns it, an existing
   microbatch and sub-microbatch;
3. every forward and backward of every (stage, microbatch, sub) appears exactly once;
4. executed in order, with every action waiting for its inputs, the table finishes:
   dependencies are respected and nothing deadlocks (see [Note: receives in sender
   order]).

[Note: receives in sender order] Point-to-point messages between a pair of ranks are
matched in posting order (NCCL and gloo alike), but they need not be consumed in that
order. Every message is known from the table, so the runtime posts a rank's receives
from one sender in the order that sender sends them, non-blocking, and waits only for
the one the next action needs; a message that arrives before its consumer runs stays in
its buffer (SEMU counts that buffer's memory from arrival to use). Sends are
non-blocking too. Activations and gradients use separate channels per ordered pair of
ranks, as Megatron keeps them apart when next and previous rank coincide (PP=2). So the
only way a table can hang is a cycle of waits: an action waiting for a producer that
comes later on its own rank, or ranks waiting on one another. A message whose consumer
has no work (0 sub-microbatches) is never sent.
"""

from __future__ import annotations

from .action import Action, Op
from .errors import ScheduleValidationError
from .render import render_grid
from .graph import action_graph
from .table import ScheduleTable

def validate(table: ScheduleTable) -> None:
    """Raise ScheduleValidationError, with the marked grid, on the first broken rule."""
    _check_subs(table)
    _check_actions(table)
    _check_complete(table)
    _Execution(table).run()


def _fail(table: ScheduleTable, reason: str, marks: dict[tuple[int, int], str] | None = None):
    raise ScheduleValidationError(reason, render_grid(table, marks or {}))


def _check_subs(table: ScheduleTable) -> None:
    names = {m.name for m in table.layout.modules}
    for module, counts in table.sub_microbatches:
        if module not in names:
            _fail(table, f"sub_microbatches: unknown module {module!r}")
        if len(counts) != table.num_microbatches or min(counts, default=0) < 0:
            _fail(table, f"sub_microbatches[{module}]: need {table.num_microbatches} counts "
                         f">= 0, got {list(counts)}")
    for stage in table.layout.stages:
        for m in range(table.num_microbatches):
            counts = {table.module_subs(p.module, m) for p in stage.parts}
            if len(counts) > 1:
                _fail(table, f"stage {stage.index} holds modules {stage.modules} with different "
                             f"sub-microbatch counts {sorted(counts)} for microbatch {m}")


def _check_actions(table: ScheduleTable) -> None:
    layout = table.layout
    if len(table.ranks) != layout.num_ranks:
        _fail(table, f"{len(table.ranks)} rank lists for {layout.num_ranks} ranks")
    for rank, step, action in table.actions():
        if not 0 <= action.stage < layout.num_stages:
            why = f"stage {action.stage} does not exist"
        elif layout.stages[action.stage].rank != rank:
            why = f"stage {action.stage} belongs to rank {layout.stages[action.stage].rank}"
        elif not 0 <= action.microbatch < table.num_microbatches:
            why = f"microbatch {action.microbatch} not in [0, {table.num_microbatches})"
        elif not 0 <= action.sub < table.subs(action.stage, action.microbatch):
            why = (f"sub {action.sub} not in [0, "
                   f"{table.subs(action.stage, action.microbatch)})")
        else:
            continue
        _fail(table, f"{action} on rank {rank} step {step}: {why}", {(rank, step): why})


def required_actions(table: ScheduleTable) -> list[Action]:
    """Every action a complete table must contain once."""
    return [Action(op, stage.index, m, k)
            for stage in table.layout.stages
            for m in range(table.num_microbatches)
            for k in range(table.subs(stage.index, m))
            for op in (Op.F, Op.B)]


def _check_complete(table: ScheduleTable) -> None:
    seen: dict[Action, tuple[int, int]] = {}
    for rank, step, action in table.actions():
        if action in seen:
            first = seen[action]
            _fail(table, f"{action} appears twice (rank {first[0]} step {first[1]} and rank "
                         f"{rank} step {step})", {first: "first", (rank, step): "duplicate"})
        seen[action] = (rank, step)
    missing = [a for a in required_actions(table) if a not in seen]
    if missing:
        names = ", ".join(f"{a} (rank {table.layout.stages[a.stage].rank})" for a in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        _fail(table, f"{len(missing)} actions missing: {names}{more}")


def dependencies(table: ScheduleTable, action: Action) -> list[Action]:
    """Actions that must finish before this one: the action graph's inputs (ir/graph.py
    [Note: the action graph])."""
    return action_graph(table).inputs(action)


class _Execution:
    """Execution in per-rank order, each action waiting for its inputs (see [Note:
    receives in sender order])."""

    def __init__(self, table: ScheduleTable) -> None:
        self.table = table
        self.stage_rank = [s.rank for s in table.layout.stages]
        self.position = {a: (r, s) for r, s, a in table.actions()}
        self.pointer = [0] * len(table.ranks)
        self.done: set[Action] = set()

    def run(self) -> None:
        total = sum(len(actions) for actions in self.table.ranks)
        while len(self.done) < total:
            progressed = False
            for rank, actions in enumerate(self.table.ranks):
                while self.pointer[rank] < len(actions) and self._try(rank, actions[self.pointer[rank]]):
                    self.pointer[rank] += 1
                    progressed = True
            if not progressed:
                self._deadlock()

    def _try(self, rank: int, action: Action) -> bool:
        step = self.pointer[rank]
        for dep in dependencies(self.table, action):
            if dep in self.done:
                continue
            dep_rank, dep_step = self.position[dep]
            if dep_rank == rank:
                _fail(self.table, f"{action} on rank {rank} step {step} needs {dep}, which comes "
                                  f"later on the same rank (step {dep_step})",
                      {(rank, step): f"needs {dep}", (dep_rank, dep_step): "too late"})
            return False
        self.done.add(action)
        return True

    def _deadlock(self) -> None:
        marks, waits = {}, []
        for rank, actions in enumerate(self.table.ranks):
            step = self.pointer[rank]
            if step >= len(actions):
                continue
            action = actions[step]
            pending = [d for d in dependencies(self.table, action) if d not in self.done]
            why = "waits for " + ", ".join(
                f"{d} (rank {self.stage_rank[d.stage]})" for d in pending[:3])
            marks[(rank, step)] = why
            waits.append(f"rank {rank} at {action} {why}")
        _fail(self.table, "deadlock: " + "; ".join(waits), marks)
