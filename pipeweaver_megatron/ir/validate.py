"""Global validation of a ScheduleTable before anything runs it.

Rules, checked in this order:
1. sub-microbatch counts are well formed (and agree for modules sharing a stage);
2. every action names an existing stage on the rank that owns it, an existing
   microbatch and sub-microbatch;
3. every forward and backward of every (stage, microbatch, sub) appears exactly once;
4. executed in order, with asynchronous sends and blocking receives matched in order
   between every ordered pair of ranks, the table finishes: dependencies are respected,
   receives never overtake one another, and nothing deadlocks (see
   [Note: in-order P2P]).

[Note: in-order P2P] Each ordered pair of ranks (src, dst) has two FIFO channels, one
for activations (sent by forwards) and one for gradients (sent by backwards), as the
runtime matches point-to-point messages in posting order per pair and per direction
(Megatron's own schedules rely on the same split when next and previous rank coincide,
PP=2). When an action on dst needs messages from src, the ones it has not received yet
must be the next ones in that channel (in any order among themselves, since one action
posts its receives together). A message whose consumer has no work (0 sub-microbatches)
is never sent.
"""

from __future__ import annotations

from collections import deque

from .action import Action, Op
from .errors import ScheduleValidationError
from .render import render_grid
from .stage import matching_subs
from .table import ScheduleTable

Message = tuple[Action, int]
"""A P2P message: the producing action and the consuming stage."""


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
    """Actions that must finish before this one (see [Note: stage dependencies])."""
    layout, m = table.layout, action.microbatch
    if action.op == Op.F:
        edges, ends, op = layout.predecessors(action.stage), "src", Op.F
        deps: list[Action] = []
    else:
        edges, ends, op = layout.successors(action.stage), "dst", Op.B
        deps = [Action(Op.F, action.stage, m, action.sub)]
    mine = table.subs(action.stage, m)
    for edge in edges:
        other = getattr(edge, ends)
        deps.extend(Action(op, other, m, k)
                    for k in matching_subs(edge.aligned, table.subs(other, m), mine, action.sub))
    return deps


class _Execution:
    """In-order execution with FIFO channels between ranks (see [Note: in-order P2P])."""

    def __init__(self, table: ScheduleTable) -> None:
        self.table = table
        self.stage_rank = [s.rank for s in table.layout.stages]
        self.position = {a: (r, s) for r, s, a in table.actions()}
        self.pointer = [0] * len(table.ranks)
        self.done: set[Action] = set()
        self.consumed: set[Message] = set()
        self.channels: dict[tuple[int, int, Op], deque[Message]] = {}

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
        needed: dict[int, set[Message]] = {}
        for dep in dependencies(self.table, action):
            if dep in self.done:
                src = self.stage_rank[dep.stage]
                message = (dep, action.stage)
                if src != rank and message not in self.consumed:
                    needed.setdefault(src, set()).add(message)
                continue
            dep_rank, dep_step = self.position[dep]
            if dep_rank == rank:
                _fail(self.table, f"{action} on rank {rank} step {step} needs {dep}, which comes "
                                  f"later on the same rank (step {dep_step})",
                      {(rank, step): f"needs {dep}", (dep_rank, dep_step): "too late"})
            return False
        kind = action.op  # forwards read activations, backwards read gradients
        for src, messages in needed.items():
            head = list(self.channels.get((src, rank, kind), ()))[: len(messages)]
            if set(head) != messages:
                early = next(m for m in head if m not in messages)
                er, es = self.position[early[0]]
                _fail(self.table, f"out-of-order P2P: {action} on rank {rank} step {step} "
                                  f"receives from rank {src}, which first sends {early[0]} "
                                  f"(for stage {early[1]}, rank {er} step {es})",
                      {(rank, step): "receives out of order", (er, es): "sent first"})
        for src, messages in needed.items():
            channel = self.channels[(src, rank, kind)]
            for _ in messages:
                self.consumed.add(channel.popleft())
        self.done.add(action)
        self._send(rank, action)
        return True

    def _send(self, rank: int, action: Action) -> None:
        layout, m = self.table.layout, action.microbatch
        if action.op == Op.F:
            targets = [e.dst for e in layout.successors(action.stage)]
        else:
            targets = [e.src for e in layout.predecessors(action.stage)]
        for stage in targets:
            dst = self.stage_rank[stage]
            if dst != rank and self.table.subs(stage, m) > 0:
                self.channels.setdefault((rank, dst, action.op), deque()).append((action, stage))

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
