"""The action graph: which action needs which, built once per (layout, sub-microbatch
counts) and read by everything that orders, checks, prices, compiles or runs actions.

[Note: the action graph] For a layout and a table's sub-microbatch counts, every
required action (forward and backward of every stage, microbatch and sub-microbatch)
gets a flat id; ``ActionGraph.rank[i]`` is the rank that runs it. A dependency is a
typed edge ``producer -> consumer`` between ids:

- a forward F(d, m, j) needs, for each layout edge s -> d, the forwards F(s, m, k) of
  the producer subs matching j (stage.matching_subs: the same sub over an aligned edge,
  every producer sub over a gathering one);
- a backward B(s, m, k) needs its own forward F(s, m, k) (kind OWN_FORWARD) and, for each
  layout edge s -> d, the backwards B(d, m, j) of every consumer sub j that read k.

Edges between ranks are carried by messages (``MessageId``): one activation per
(producer forward, consumer stage) holding what all the consumer stage's subs read, and
one gradient per (producer forward, consumer stage, consumer sub) sent by that sub's
backward. A consumer stage with no sub-microbatch for the microbatch gets none.
``inputs(action)`` lists an action's producers in the order ir.validate always used
(own forward first, then edge by edge, sub by sub); ``flows(table)`` lists the messages
in the table's send order (rank by rank, compute by compute, then by edge and sub).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence

from .action import Action, Op
from .execplan import Kind
from .stage import Layout, matching_subs
from .table import ScheduleTable


MessageKey = tuple[Kind, Action, int, "int | None"]
"""MessageId.key, execplan.Message.key: (kind, producer, consumer stage, consumer sub)."""


class EdgeKind(str, enum.Enum):
    """How a consumer depends on a producer."""

    ALIGNED = "aligned"
    """Over a layout edge whose subs correspond one to one (or the stage's own module)."""
    GATHERING = "gathering"
    """Over a layout edge where a consumer sub reads every producer sub (across modules)."""
    OWN_FORWARD = "own-forward"
    """A backward's own forward (same stage, microbatch and sub)."""


@dataclass(frozen=True, slots=True)
class MessageId:
    """One cross-rank message: the activation of forward ``producer`` that stage
    ``consumer_stage`` reads (consumer_sub None), or the gradient of that output from
    the backward of ``consumer_sub`` of that stage."""

    kind: Kind
    producer: Action
    consumer_stage: int
    consumer_sub: int | None

    @property
    def key(self) -> MessageKey:
        return (self.kind, self.producer, self.consumer_stage, self.consumer_sub)


@dataclass(frozen=True, slots=True)
class Dependency:
    """consumer (an action id) needs producer (an action id)."""

    producer: int
    consumer: int
    kind: EdgeKind
    cross_rank: bool
    message: MessageId | None
    """The message that carries it between ranks (None on one rank)."""


@dataclass(frozen=True, slots=True)
class Flow:
    """A message with its ranks, its sending action and every action that reads it."""

    id: MessageId
    src: int
    dst: int
    sender: Action
    consumers: tuple[Action, ...]

    @property
    def key(self) -> MessageKey:
        return self.id.key

    @property
    def channel(self) -> tuple[int, int, Kind]:
        return (self.src, self.dst, self.id.kind)


@dataclass(frozen=True)
class ActionGraph:
    """Actions by flat id, their ranks, dependencies and messages (see the Note)."""

    layout: Layout
    actions: tuple[Action, ...]
    rank: tuple[int, ...]
    dependencies: tuple[Dependency, ...]
    messages: tuple[Flow, ...]
    """Every cross-rank message, grouped by sending action in id order."""
    _inputs: tuple[tuple[int, ...], ...] = field(repr=False, compare=False, default=())
    _sent: dict[Action, tuple[Flow, ...]] = field(repr=False, compare=False,
                                                  default_factory=dict)
    _ids: dict[tuple[bool, int, int, int], int] = field(repr=False, compare=False,
                                                        default_factory=dict)
    """(is backward, stage, microbatch, sub) -> id: keys of ints, since hashing an Action
    hashes its Op, an Enum, in Python (this runs in every simulation)."""
    memo: dict = field(repr=False, compare=False, default_factory=dict)
    """Derived data its readers cache per graph (semu's transfer delays per priced batch)."""

    def id(self, action: Action) -> int:
        """The flat id of an action (KeyError for an action the table cannot hold)."""
        return self._ids[(action.op is Op.B, action.stage, action.microbatch, action.sub)]

    def ids(self, actions) -> list[int]:
        """The ids of many actions."""
        ids, B = self._ids, Op.B
        return [ids[(a.op is B, a.stage, a.microbatch, a.sub)] for a in actions]

    def __contains__(self, action: object) -> bool:
        return isinstance(action, Action) and (
            action.op is Op.B, action.stage, action.microbatch, action.sub) in self._ids

    def inputs(self, action: Action) -> list[Action]:
        """The actions that must finish before this one, in the order of the Note."""
        return [self.actions[self.dependencies[e].producer]
                for e in self._inputs[self.id(action)]]

    def input_ids(self, i: int) -> tuple[int, ...]:
        """Indices into ``dependencies`` of the inputs of action id i, in order."""
        return self._inputs[i]

    def sent_by(self, action: Action) -> tuple[Flow, ...]:
        """The messages a compute sends once it has run (edge then sub order)."""
        return self._sent.get(action, ())

    def flows(self, table: ScheduleTable) -> list[Flow]:
        """Every message in the table's send order (rank by rank, compute by compute)."""
        return [f for actions in table.ranks for a in actions for f in self.sent_by(a)]


def action_graph(table: ScheduleTable) -> ActionGraph:
    """The graph of a table's layout and sub-microbatch counts (cached: every table of
    one layout and split shares it)."""
    return graph_of(table.layout, table.num_microbatches, dict(table.sub_microbatches))


def graph_of(layout: Layout, num_microbatches: int,
             counts: Mapping[str, Sequence[int]]) -> ActionGraph:
    """The graph of a layout with these sub-microbatch counts per module (a module not
    listed: one sub everywhere), before any table orders its actions."""
    key = tuple(sorted((m, tuple(c)) for m, c in counts.items()
                       if tuple(c) != (1,) * num_microbatches))
    # A layout's hash walks all its stages; the last graphs are found by identity first.
    for seen, graph in _RECENT:
        if seen[0] is layout and seen[1:] == (num_microbatches, key):
            return graph
    graph = _build(layout, num_microbatches, key)
    _RECENT.insert(0, ((layout, num_microbatches, key), graph))
    del _RECENT[8:]
    return graph


_RECENT: list = []
"""The last graphs handed out, with their (layout, microbatches, counts)."""


@lru_cache(maxsize=64)
def _build(layout: Layout, num_microbatches: int, sub_microbatches) -> ActionGraph:
    shell = ScheduleTable(layout=layout, num_microbatches=num_microbatches,
                          sub_microbatches=sub_microbatches,
                          ranks=tuple(() for _ in range(layout.num_ranks)))
    subs = shell.subs
    actions = [Action(op, stage.index, m, k)
               for stage in layout.stages
               for m in range(num_microbatches)
               for k in range(subs(stage.index, m))
               for op in (Op.F, Op.B)]
    ids = {a: i for i, a in enumerate(actions)}
    rank_of = [s.rank for s in layout.stages]
    rank = tuple(rank_of[a.stage] for a in actions)
    deps: list[Dependency] = []
    inputs: list[list[int]] = [[] for _ in actions]
    sent: dict[Action, list[Flow]] = {}

    def depend(producer: Action, consumer: Action, kind: EdgeKind,
               message: MessageId | None) -> None:
        p, c = ids[producer], ids[consumer]
        inputs[c].append(len(deps))
        deps.append(Dependency(p, c, kind, rank[p] != rank[c], message))

    for a in actions:
        m, mine = a.microbatch, subs(a.stage, a.microbatch)
        if a.op is Op.F:
            for edge in layout.predecessors(a.stage):
                kind = EdgeKind.ALIGNED if edge.aligned else EdgeKind.GATHERING
                for k in matching_subs(edge.aligned, subs(edge.src, m), mine, a.sub):
                    producer = Action(Op.F, edge.src, m, k)
                    cross = rank_of[edge.src] != rank_of[a.stage]
                    message = MessageId(Kind.ACTIVATION, producer, a.stage, None) if cross \
                        else None
                    depend(producer, a, kind, message)
        else:
            depend(Action(Op.F, a.stage, m, a.sub), a, EdgeKind.OWN_FORWARD, None)
            for edge in layout.successors(a.stage):
                kind = EdgeKind.ALIGNED if edge.aligned else EdgeKind.GATHERING
                for j in matching_subs(edge.aligned, subs(edge.dst, m), mine, a.sub):
                    producer = Action(Op.B, edge.dst, m, j)
                    cross = rank_of[edge.dst] != rank_of[a.stage]
                    message = MessageId(Kind.GRADIENT, Action(Op.F, a.stage, m, a.sub),
                                        edge.dst, j) if cross else None
                    depend(producer, a, kind, message)
    # Messages by sender, in the order the compiler has always sent them: a forward's
    # activations edge by edge; a backward's gradients edge by edge, producer sub by sub.
    for a in actions:
        m, mine = a.microbatch, subs(a.stage, a.microbatch)
        out: list[Flow] = []
        if a.op is Op.F:
            for edge in layout.successors(a.stage):
                d = edge.dst
                readers = matching_subs(edge.aligned, subs(d, m), mine, a.sub)
                if rank_of[d] != rank_of[a.stage] and len(readers):
                    out.append(Flow(MessageId(Kind.ACTIVATION, a, d, None), rank_of[a.stage],
                                    rank_of[d], a, tuple(Action(Op.F, d, m, j) for j in readers)))
        else:
            for edge in layout.predecessors(a.stage):
                s = edge.src
                if rank_of[s] == rank_of[a.stage]:
                    continue
                for k in matching_subs(edge.aligned, subs(s, m), mine, a.sub):
                    producer = Action(Op.F, s, m, k)
                    out.append(Flow(MessageId(Kind.GRADIENT, producer, a.stage, a.sub),
                                    rank_of[a.stage], rank_of[s], a, (Action(Op.B, s, m, k),)))
        if out:
            sent[a] = out
    return ActionGraph(layout=layout, actions=tuple(actions), rank=rank,
                       dependencies=tuple(deps),
                       messages=tuple(f for a in actions for f in sent.get(a, ())),
                       _inputs=tuple(tuple(x) for x in inputs),
                       _sent={a: tuple(f) for a, f in sent.items()},
                       _ids={(a.op is Op.B, a.stage, a.microbatch, a.sub): i
                             for i, a in enumerate(actions)})


def table_flows(table: ScheduleTable) -> list[Flow]:
    """Every cross-rank message of a table, in send order (action_graph(table).flows)."""
    return action_graph(table).flows(table)
