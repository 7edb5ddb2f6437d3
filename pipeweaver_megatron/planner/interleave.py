"""Greedy dual-queue stage interleaving (PAPER.md, search phase 2).

Every rank keeps a forward and a backward queue of ready actions; an action is ready
when its inputs are done, and its t_start is when its inputs arrive. Repeatedly the rank
that can start something earliest is served: if both its best forward and its best
backward could already start when the rank becomes free (t_last), it alternates F and
B (1F1B); otherwise it runs whichever can start first, filling the bubble. A rank whose
activations would exceed its memory has its forward queue disabled. Receives are kept in
sending order per rank pair and direction (see ir [Note: in-order P2P]), so the result
passes ir.validate by construction; among ready actions of one kind the priority order
decides (default: microbatch, sub-microbatch, stage), the F/B choice follows t_start.

Known limitation (work in progress of the planner milestone): keeping receives in
sending order can leave the greedy with no eligible action when a producer has
interleaved the sub-microbatch outputs of two consumers; with memory limits this happens
on VLM-S. interleave() then raises PlannerError (the caller falls back to a baseline).
Posting receives in the sender's order with buffering, or making segment priorities
(MCTS) consistent across ranks, removes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..ir import Action, Layout, Op, ScheduleTable, matching_subs
from ..semu import CostModel, Links, StageCost


class PlannerError(RuntimeError):
    """The greedy scheduler cannot place the remaining actions."""


Priority = Callable[[Action], tuple]


def default_priority(action: Action) -> tuple:
    """Earlier microbatches first, then sub-microbatches in order, then pipeline order."""
    return (action.microbatch, action.sub, action.stage)


@dataclass(frozen=True, kw_only=True)
class Interleaved:
    """The table and the greedy's own timeline estimate."""

    table: ScheduleTable
    makespan_s: float


def interleave(costs: CostModel, layout: Layout, counts: Mapping[str, Sequence[int]],
               cost: Sequence[Sequence[Sequence[StageCost]]], num_microbatches: int,
               capacity_bytes: Sequence[float] | None = None,
               priority: Priority = default_priority) -> Interleaved:
    """Build per-rank orders for every action of the batch."""
    state = _State(costs, layout, counts, cost, num_microbatches, capacity_bytes, priority)
    while state.remaining:
        if not state.step(respect_memory=True) and not state.step(respect_memory=False):
            raise PlannerError(f"{state.remaining} actions cannot be placed without breaking "
                               "in-order P2P; "
                               + ", ".join(str(a) for a in state.blocked()[:6]))
    table = ScheduleTable(layout=layout, num_microbatches=num_microbatches,
                          ranks=tuple(tuple(r) for r in state.orders), name="pipeweaver",
                          sub_microbatches=tuple((m, tuple(c)) for m, c in counts.items()
                                                 if any(x != 1 for x in c)))
    return Interleaved(table=table, makespan_s=max(state.free))


class _State:
    def __init__(self, costs, layout, counts, cost, num_microbatches, capacity, priority):
        self.layout, self.cost, self.priority = layout, cost, priority
        first_module = [s.parts[0].module for s in layout.stages]
        self.subs = [list(counts.get(m, [1] * num_microbatches)) for m in first_module]
        self.rank_of = [s.rank for s in layout.stages]
        ranks = layout.num_ranks
        self.free = [0.0] * ranks
        self.last = [Op.B] * ranks
        self.live = [0.0] * ranks
        self.capacity = list(capacity) if capacity else [float("inf")] * ranks
        self.orders: list[list[Action]] = [[] for _ in range(ranks)]
        self.per_byte, self.fixed = Links(costs).between_stages(layout)
        self.preds = [[(e.src, e.aligned) for e in layout.predecessors(s.index)] for s in layout.stages]
        self.succs = [[(e.dst, e.aligned) for e in layout.successors(s.index)] for s in layout.stages]
        self.end: dict[Action, float] = {}
        self.waiting: dict[Action, int] = {}
        self.arrive: dict[Action, float] = {}
        self.users: dict[Action, list[Action]] = {}
        self.ready: list[list[Action]] = [[] for _ in range(ranks)]
        self.channels: dict[tuple[int, int, Op], deque] = {}
        self.needs: dict[Action, list[tuple[int, tuple[Action, int]]]] = {}
        self._consumed: set[tuple[Action, int]] = set()
        for stage in layout.stages:
            for m in range(num_microbatches):
                for k in range(self.subs[stage.index][m]):
                    for op in (Op.F, Op.B):
                        self._register(Action(op, stage.index, m, k))
        self.remaining = len(self.waiting)

    def _deps(self, a: Action) -> list[tuple[Action, float]]:
        s, m, k = a.stage, a.microbatch, a.sub
        mine = self.subs[s][m]
        out = []
        if a.op == Op.F:
            for src, aligned in self.preds[s]:
                for j in matching_subs(aligned, self.subs[src][m], mine, k):
                    size = self.cost[src][m][j].output_bytes
                    out.append((Action(Op.F, src, m, j), self.per_byte[src][s] * size + self.fixed[src][s]))
        else:
            out.append((Action(Op.F, s, m, k), 0.0))
            size = self.cost[s][m][k].output_bytes
            for dst, aligned in self.succs[s]:
                for j in matching_subs(aligned, self.subs[dst][m], mine, k):
                    out.append((Action(Op.B, dst, m, j), self.per_byte[dst][s] * size + self.fixed[dst][s]))
        return out

    def _register(self, a: Action) -> None:
        deps = self._deps(a)
        self.waiting[a] = len(deps)
        self.arrive[a] = 0.0
        self.needs[a] = [(self.rank_of[d.stage], (d, a.stage)) for d, _ in deps
                         if self.rank_of[d.stage] != self.rank_of[a.stage]]
        for dep, delay in deps:
            self.users.setdefault(dep, []).append((a, delay))
        if not deps:
            self.ready[self.rank_of[a.stage]].append(a)

    def _in_order(self, a: Action, rank: int) -> bool:
        """Every message `a` still needs is at the head of its channel."""
        wanted: dict[int, set] = {}
        for src, message in self.needs[a]:
            if message[0] in self.end and message not in self._consumed:
                wanted.setdefault(src, set()).add(message)
        for src, messages in wanted.items():
            head = list(self.channels.get((src, rank, a.op), ()))[: len(messages)]
            if set(head) != messages:
                return False
        return True

    def step(self, respect_memory: bool) -> bool:
        """Schedule one action; False when no rank has an eligible one."""
        best = None
        for rank, ready in enumerate(self.ready):
            f = b = None
            for a in ready:
                if not self._in_order(a, rank):
                    continue
                key = (self.priority(a), self.arrive[a])
                if a.op == Op.F:
                    saved = self.cost[a.stage][a.microbatch][a.sub].saved_bytes
                    if respect_memory and self.live[rank] + saved > self.capacity[rank] \
                            and self.live[rank] > 0:
                        continue
                    if f is None or key < f[0]:
                        f = (key, a)
                elif b is None or key < b[0]:
                    b = (key, a)
            if f is None and b is None:
                continue
            starts = [self.arrive[x[1]] for x in (f, b) if x is not None]
            t_min = max(self.free[rank], min(starts))
            if best is None or t_min < best[0]:
                best = (t_min, rank, f, b)
        if best is None:
            return False
        _, rank, f, b = best
        if f is not None and b is not None:
            t_f, t_b = self.arrive[f[1]], self.arrive[b[1]]
            if max(t_f, t_b) <= self.free[rank]:
                choice = f if self.last[rank] == Op.B else b
            else:
                choice = f if t_f < t_b else b
        else:
            choice = f or b
        self._run(rank, choice[1])
        return True

    def _run(self, rank: int, a: Action) -> None:
        self.ready[rank].remove(a)
        for src, message in self.needs[a]:
            if message[0] in self.end and message not in self._consumed:
                self.channels[(src, rank, a.op)].remove(message)
                self._consumed.add(message)
        c = self.cost[a.stage][a.microbatch][a.sub]
        start = max(self.free[rank], self.arrive[a])
        self.end[a] = self.free[rank] = start + (c.forward_s if a.op == Op.F else c.backward_s)
        self.live[rank] += c.saved_bytes if a.op == Op.F else -c.saved_bytes
        self.last[rank] = a.op
        self.orders[rank].append(a)
        self.remaining -= 1
        sent = set()
        for user, delay in self.users.get(a, ()):
            self.arrive[user] = max(self.arrive[user], self.end[a] + delay)
            self.waiting[user] -= 1
            dst = self.rank_of[user.stage]
            if dst != rank and (a, user.stage) not in sent:
                sent.add((a, user.stage))
                self.channels.setdefault((rank, dst, user.op), deque()).append((a, user.stage))
            if self.waiting[user] == 0:
                self.ready[dst].append(user)

    def blocked(self) -> list[Action]:
        return [a for ready in self.ready for a in ready]
