"""Greedy dual-queue stage interleaving (PAPER.md, search phase 2).

The batch's actions and their dependencies are compiled once into a `Problem`; each
search rollout only changes the priorities (a sequence of segment groups), so a rollout
costs one pass of the greedy loop.

Every rank keeps a forward and a backward queue of ready actions (inputs done); an
action's t_start is when its inputs arrive. Repeatedly the rank that can start something
earliest is served: if both its best forward and its best backward could start by the
time the rank is free (t_last), it alternates F and B (1F1B); otherwise it runs whichever
starts first, filling the bubble. Within a queue the priority decides: the position of
the action's group (microbatch, module) in the sequence, then its sub-microbatch, then
its stage. A rank whose live activations (gate bytes per forward, e.g. the most
memory-efficient strategy's) would exceed its activation budget has its forward queue
disabled; if no rank can move at all, the budget is ignored for one step (the memory
optimiser and SEMU then report the plan's true peak).

Receives may be consumed out of sending order (ir [Note: receives in sender order]), so
any order this loop produces passes ir.validate.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..ir import Action, Layout, Op, ScheduleTable
from ..ir.graph import graph_of
from ..semu import CostModel, StageCost, transfer_delays

Group = tuple[int, str]
"""(microbatch, module): the unit whose segments share one priority."""


class PlannerError(RuntimeError):
    """The planner cannot build a schedule for this batch."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One batch on one layout, compiled for repeated interleaving (flat action indices)."""

    layout: Layout
    num_microbatches: int
    counts: dict[str, tuple[int, ...]]
    actions: tuple[Action, ...]
    rank: tuple[int, ...]
    backward: tuple[bool, ...]
    duration: tuple[float, ...]
    gate: tuple[float, ...]
    """Bytes a forward adds to its rank's live activations (0 for backwards)."""
    ndeps: tuple[int, ...]
    users: tuple[tuple[tuple[int, float], ...], ...]
    group_of: tuple[int, ...]
    groups: tuple[Group, ...]
    """Groups with work, in default order (microbatch, then module order)."""
    tiebreak: tuple[int, ...]
    """Order inside a group: sub-microbatch, then stage."""

    @property
    def num_ranks(self) -> int:
        return self.layout.num_ranks


def stage_module(layout: Layout, stage: int) -> str:
    """The module that names a stage's group (its first part; a projector rides along)."""
    return layout.stages[stage].parts[0].module


def build_problem(costs: CostModel, layout: Layout, counts: Mapping[str, Sequence[int]],
                  cost: Sequence[Sequence[Sequence[StageCost]]], num_microbatches: int,
                  gate: Sequence[Sequence[Sequence[float]]] | None = None) -> Problem:
    """Compile the actions of one batch; gate[stage][mb][sub] defaults to saved_bytes."""
    graph = graph_of(layout, num_microbatches, counts)
    delays = transfer_delays(costs, graph, cost)
    module_rank = {m.name: i for i, m in enumerate(layout.modules)}
    actions = graph.actions
    n = len(actions)
    users: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    ndeps = [0] * n
    duration, gates = [0.0] * n, [0.0] * n
    group_keys = sorted({(a.microbatch, module_rank[stage_module(layout, a.stage)])
                         for a in actions})
    group_id = {key: i for i, key in enumerate(group_keys)}
    group_of, tiebreak = [0] * n, [0] * n
    stages = layout.num_stages
    for i, a in enumerate(actions):
        s, m, k = a.stage, a.microbatch, a.sub
        c = cost[s][m][k]
        group_of[i] = group_id[(m, module_rank[stage_module(layout, s)])]
        tiebreak[i] = k * stages + s
        if a.op is Op.B:
            duration[i] = c.backward_s
        else:
            duration[i] = c.forward_s
            gates[i] = gate[s][m][k] if gate is not None else c.saved_bytes
        inputs = graph.input_ids(i)
        ndeps[i] = len(inputs)
        for e in inputs:
            users[graph.dependencies[e].producer].append((i, delays[e]))
    rank = graph.rank
    names = [m.name for m in layout.modules]
    return Problem(layout=layout, num_microbatches=num_microbatches,
                   counts={name: tuple(c) for name, c in counts.items()},
                   actions=tuple(actions), rank=tuple(rank),
                   backward=tuple(a.op == Op.B for a in actions), duration=tuple(duration),
                   gate=tuple(gates), ndeps=tuple(ndeps),
                   users=tuple(tuple(u) for u in users), group_of=tuple(group_of),
                   groups=tuple((m, names[r]) for m, r in group_keys), tiebreak=tuple(tiebreak))


@dataclass(frozen=True, kw_only=True)
class Interleaved:
    """The table and the greedy's own timeline estimate."""

    table: ScheduleTable
    makespan_s: float


def interleave(problem: Problem, sequence: Sequence[int] | None = None,
               budget_bytes: Sequence[float] | None = None,
               fill_bubbles: bool = True) -> Interleaved:
    """Per-rank orders for every action; sequence lists group indices by priority
    (default: problem.groups' order); budget_bytes caps live activations per rank;
    fill_bubbles=False keeps strict F/B alternation even when the other queue's action
    could start earlier (the ablation's step before interleaving)."""
    p = problem
    position = [0] * len(p.groups)
    for pos, g in enumerate(sequence if sequence is not None else range(len(p.groups))):
        position[g] = pos
    if len(set(position)) != len(p.groups):
        raise PlannerError(f"sequence must list each of the {len(p.groups)} groups once")
    span = len(p.tiebreak) + 1
    key = [position[g] * span + t for g, t in zip(p.group_of, p.tiebreak)]
    ranks = p.num_ranks
    budget = list(budget_bytes) if budget_bytes is not None else [float("inf")] * ranks
    waiting = list(p.ndeps)
    arrive = [0.0] * len(p.actions)
    queues = [(_Queue(), _Queue()) for _ in range(ranks)]  # forward, backward
    for i, n in enumerate(waiting):
        if n == 0:
            queues[p.rank[i]][p.backward[i]].push(0.0, key[i], i)
    free, live = [0.0] * ranks, [0.0] * ranks
    last_backward = [True] * ranks
    orders: list[list[Action]] = [[] for _ in range(ranks)]
    end = [0.0] * len(p.actions)
    state = (p, queues, arrive, free, live, last_backward, budget, fill_bubbles)
    offers = [_offer(state, r, True) for r in range(ranks)]  # per rank: (t_min, rank, action)
    for _ in range(len(p.actions)):
        pick = None
        for offer in offers:
            if offer is not None and (pick is None or offer < pick):
                pick = offer
        if pick is None:  # every rank is at its memory budget or idle: relax for one step
            pick = min((o for o in (_offer(state, r, False) for r in range(ranks))
                        if o is not None), default=None)
        if pick is None:
            raise PlannerError("no action is ready: the layout's dependencies have a cycle")
        _, rank, i = pick
        queues[rank][p.backward[i]].pop(i)
        start = max(free[rank], arrive[i])
        end[i] = free[rank] = start + p.duration[i]
        # A backward's forward is the action just before it (build_problem's order).
        live[rank] += -p.gate[i - 1] if p.backward[i] else p.gate[i]
        last_backward[rank] = p.backward[i]
        orders[rank].append(p.actions[i])
        changed = {rank}
        for user, delay in p.users[i]:
            if arrive[user] < end[i] + delay:
                arrive[user] = end[i] + delay
            waiting[user] -= 1
            if waiting[user] == 0:
                queues[p.rank[user]][p.backward[user]].push(arrive[user], key[user], user)
                changed.add(p.rank[user])
        for r in changed:
            offers[r] = _offer(state, r, True)
    table = ScheduleTable(layout=p.layout, num_microbatches=p.num_microbatches,
                          ranks=tuple(tuple(r) for r in orders), name="pipeweaver",
                          sub_microbatches=tuple((m, c) for m, c in p.counts.items()
                                                 if any(x != 1 for x in c)))
    return Interleaved(table=table, makespan_s=max(free))


def _offer(state, rank: int, respect_memory: bool) -> tuple[float, int, int] | None:
    """What `rank` would run next and when it could start (None: nothing it may run)."""
    p, queues, arrive, free, live, last_backward, budget, fill_bubbles = state
    forward, backward = queues[rank]
    now = free[rank]
    f = forward.best(now)
    if f is not None and respect_memory and live[rank] > 0 \
            and live[rank] + p.gate[f] > budget[rank]:
        f = None
    b = backward.best(now)
    if f is None and b is None:
        return None
    if f is not None and b is not None:
        t_f, t_b = arrive[f], arrive[b]
        if (t_f <= now and t_b <= now) or not fill_bubbles:
            choice = f if last_backward[rank] else b
        else:
            choice = f if t_f < t_b else b
    else:
        choice = f if f is not None else b
    t = arrive[choice]
    return (t if t > now else now, rank, choice)


class _Queue:
    """Ready actions of one kind on one rank: those whose inputs have arrived by the
    time asked about are served by priority; if none has, the earliest to arrive."""

    def __init__(self) -> None:
        self.arrived: list[tuple[int, int]] = []  # (priority key, action)
        self.pending: list[tuple[float, int, int]] = []  # (arrival, priority key, action)

    def push(self, arrival: float, key: int, action: int) -> None:
        heapq.heappush(self.pending, (arrival, key, action))

    def best(self, now: float) -> int | None:
        pending, arrived = self.pending, self.arrived
        while pending and pending[0][0] <= now:
            _, key, action = heapq.heappop(pending)
            heapq.heappush(arrived, (key, action))
        if arrived:
            return arrived[0][1]
        return pending[0][2] if pending else None

    def pop(self, action: int) -> None:
        """Remove `action`, which best() just returned."""
        if self.arrived and self.arrived[0][1] == action:
            heapq.heappop(self.arrived)
        else:
            heapq.heappop(self.pending)
