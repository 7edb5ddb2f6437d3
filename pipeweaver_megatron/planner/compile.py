"""Compile a ScheduleTable into per-rank execution plans, and check plans globally.

compile_table(table, shapes_of, timeline=None, lookahead=1) -> ExecutionPlan. Each rank's
ops are built in *slots*: slot t is the gap before the rank's compute t (slot n, after
the last compute, is the rank's end). A slot holds, in this order:

1. one post group: the Sends of compute t-1 (in send order), then the PostRecvs placed
   here (per channel, in the sender's order). Two or more posts form one Batch; a
   single post stands alone (see [Note: batching]);
2. the WaitSends placed here;
3. the WaitRecvs of every message compute t is the first consumer of on this rank;
4. Compute t.

Messages (see execplan.Message, [Note: receives in sender order] in ir/validate.py):
after a forward F(s, m, k), one activation per consumer stage d on another rank that has
sub-microbatches matching k; after a backward B(d, m, j), one gradient per producer
forward F(s, m, k) on another rank whose output sub j used. Same-rank edges are local.
A channel's sequence numbers follow the sender's compute order.

Receive posting. A receive must be posted before its first consumer's slot. Without a
timeline it is posted ``lookahead`` computes earlier (0: just before the consumer, as
late as possible; 1, the default: the transfer can overlap the previous compute). With a
timeline (SEMU's SimResult of the same table) it is posted at the latest before the last
compute that starts no later than the predicted send (the sender's compute end), so that
the receive is up when the sender sends and the transfer overlaps that compute. Receives
of one channel are posted in sequence order, so a receive is moved up to the slot of any
later receive of its channel posted earlier (a suffix minimum); without a timeline and
with lookahead 0 this is exactly "before the compute that consumes a message, post every
not-yet-posted receive of its channel up to it".

[Note: WaitSend placement] A WaitSend blocks until the peer has posted the matching
receive (MPI semantics), and receives are posted lazily, so a WaitSend placed too early
can deadlock: the sender waits for a receive that the receiver posts only after data the
sender has not yet produced. Its wanted slot is after the sender's next compute (with a
timeline: the first gap, after that compute, that ends after the predicted transfer).
It is then moved later until the receiver's PostRecv is in its causal past (a chain of
program order and Send -> WaitRecv edges from the receiver's post to this slot, found
with vector clocks over the plan without WaitSends); if there is no such slot it goes to
the rank's end (slot n), where every WaitSend left is placed. So a mid-plan WaitSend
never blocks under MPI semantics, and the plan runs wherever the table's validate()
execution runs. The runtime frees (or pseudo-frees) the sent tensors after WaitSend.

[Note: batching] All Sends after compute t-1 and all PostRecvs placed before compute t
are adjacent (no compute between) and form one Batch: the runtime issues them with one
batch_isend_irecv call on gloo, sends first, then receives, as listed. Waits
never enter a Batch. The plan's semantics are MPI-like (what check_plan runs): each op of
a Batch completes on its own. gloo gives that. NCCL does not where one stream carries
several channels or a group holds several operations of one channel: a group completes
as a whole and a later P2P kernel queues behind an unmatched earlier one, so a lazily
matched op can block a wait for another. On NCCL the runtime therefore gives every
channel its own communicator and issues every op alone (runtime/p2p.py [Note: NCCL
channels]); a Batch is a launch hint for gloo. check_plan replays that too
(nccl_order.py).

check_plan(plan, table) re-derives the messages from the table, checks each rank's ops
statically (computes in table order, inputs waited before use, sends after their
compute, peers, channel order, every post waited) and then runs all ranks together with
MPI-like semantics: posts never block; on a channel (src, dst, kind) the n-th send pairs
with the n-th receive and both must describe the same message and tensors; WaitRecv
blocks until the paired send is posted, WaitSend until the paired receive is posted.
Any violation raises PlanCheckError naming the rank, the op index and the op. Then it
replays the plan under NCCL's rules as the runtime issues it there (one communicator per
channel, every operation alone; see nccl_order.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

from ..ir import Action, Op, ScheduleTable, dependencies, validate
from ..ir.graph import Flow, MessageKey as Key, table_flows
from ..semu import SimResult
from ..ir.execplan import (SCHEMA_VERSION, Batch, Compute, ExecutionPlan, Kind, Message, PlanOp,
                       PostRecv, RankPlan, Send, TensorLike, WaitRecv, WaitSend, flat_ops)
from .nccl_order import check_nccl_order

ShapesOf = Callable[[int, int, int, int], tuple[TensorLike, ...]]
"""shapes_of(src stage, dst stage, microbatch, src sub): the tensors stage src sends
downstream to dst for one sub-microbatch (its gradient has the same specs)."""

def compile_table(table: ScheduleTable, shapes_of: ShapesOf, timeline: SimResult | None = None,
                  lookahead: int = 1) -> ExecutionPlan:
    """Per-rank execution plans of a valid table (see the module docstring for the rules):
    four named passes, each a pure function of the ones before (see [Note: passes])."""
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    validate(table)
    found = messages_pass(table, shapes_of)
    times = _Times(table, timeline) if timeline is not None else None
    placed = receives_pass(table, found, times, lookahead)
    placed = wait_sends_pass(table, found, placed, times)
    return emit_pass(table, found, placed)


# [Note: passes] compile_table is messages_pass (every message of the table with its
# tensors and channel position), receives_pass (the slot of each Send, PostRecv and
# WaitRecv), wait_sends_pass (the slot of each WaitSend, given where the receives are)
# and emit_pass (the op lists). A pass reads the table and the passes before it and
# returns new values; tests/test_compile_passes.py gives each computes in and exact
# output, and tests/golden/compile/ holds whole plans (python tests/golden/
# make_compile_golden.py rewrites them).


@dataclass(frozen=True)
class Messages:
    """messages_pass: the table's messages in send order with their tensors."""

    flows: tuple[Flow, ...]
    messages: tuple[Message, ...]
    channels: dict[tuple[int, int, Kind], tuple[int, ...]]
    """Message indices of each channel, in sequence order."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Message indices placed in the gap before one compute (see the module docstring)."""

    sends: tuple[int, ...] = ()
    recvs: tuple[int, ...] = ()
    wait_sends: tuple[int, ...] = ()
    waits: tuple[int, ...] = ()


Slots = tuple[tuple[Slot, ...], ...]
"""Per rank, one Slot per compute plus one for the rank's end."""


def messages_pass(table: ScheduleTable, shapes_of: ShapesOf) -> Messages:
    """Every cross-rank message of the table (ActionGraph), in send order, with its
    tensors and its position on its channel."""
    flows = tuple(table_flows(table))
    messages, channels = [], {}
    for flow in flows:
        kind, producer, stage, sub = flow.key
        seq = channels.setdefault(flow.channel, [])
        tensors = tuple(shapes_of(producer.stage, stage, producer.microbatch, producer.sub))
        if not tensors:
            raise ValueError(f"shapes_of({producer.stage}, {stage}, {producer.microbatch}, "
                             f"{producer.sub}) gave no tensors; a message carries at least one")
        messages.append(Message(kind, producer, stage, sub, tensors, len(seq)))
        seq.append(len(messages) - 1)
    return Messages(flows, tuple(messages), {c: tuple(ids) for c, ids in channels.items()})


def receives_pass(table: ScheduleTable, found: Messages, times: "_Times | None",
                  lookahead: int) -> Slots:
    """Sends right after their compute, WaitRecvs before the first consumer, PostRecvs
    lookahead computes earlier (or, with a timeline, before the compute running when
    the sender finishes), each channel's in sequence order (see the module docstring)."""
    flows, messages = found.flows, found.messages
    where = {a: i for actions in table.ranks for i, a in enumerate(actions)}
    first_use = [min(where[c] for c in f.consumers) for f in flows]
    post = [max(0, u - lookahead) for u in first_use]
    if times is not None:
        post = [min(p, times.running_at(f.dst, times.end(f.sender)))
                for p, f in zip(post, flows)]
    for ids in found.channels.values():  # post in sequence order: suffix minimum
        for n in range(len(ids) - 2, -1, -1):
            post[ids[n]] = min(post[ids[n]], post[ids[n + 1]])
    sends, recvs, waits = ([[[] for _ in range(len(a) + 1)] for a in table.ranks]
                           for _ in range(3))
    for i, flow in enumerate(flows):
        sends[flow.src][where[flow.sender] + 1].append(i)
        recvs[flow.dst][post[i]].append(i)
        waits[flow.dst][first_use[i]].append(i)
    order = lambda i: (flows[i].src, flows[i].key[0].name, messages[i].seq)  # noqa: E731
    return tuple(tuple(Slot(tuple(s), tuple(sorted(r, key=order)), (), tuple(w))
                       for s, r, w in zip(sends[rank], recvs[rank], waits[rank]))
                 for rank in range(len(table.ranks)))


def wait_sends_pass(table: ScheduleTable, found: Messages, slots: Slots,
                    times: "_Times | None") -> Slots:
    """Each WaitSend after its sender's next compute (with a timeline: the first gap
    after the predicted transfer), moved later until the receiver's PostRecv is in its
    causal past, else to the rank's end ([Note: WaitSend placement])."""
    flows, messages = found.flows, found.messages
    counts = [len(actions) for actions in table.ranks]
    where = {a: i for actions in table.ranks for i, a in enumerate(actions)}
    known, posted_at = _causal_knowledge(slots, flows, counts)
    placed: list[list[list[int]]] = [[[] for _ in rank] for rank in slots]
    for i, flow in enumerate(flows):
        sent = where[flow.sender] + 1
        want = min(sent + 1, counts[flow.src])
        if times is not None:
            want = times.gap_after(flow.src, want, times.arrival(flow, messages[i]))
        need = posted_at[i] + 1
        rank_known = known[flow.src]
        slot = next((t for t in range(want, counts[flow.src])
                     if rank_known[t][flow.dst] >= need), counts[flow.src])
        placed[flow.src][slot].append(i)
    return tuple(tuple(Slot(s.sends, s.recvs, tuple(sorted(w)), s.waits)
                       for s, w in zip(rank, extra))
                 for rank, extra in zip(slots, placed))


def emit_pass(table: ScheduleTable, found: Messages, slots: Slots) -> ExecutionPlan:
    """The op lists: per slot its post group (Sends then PostRecvs; two or more form a
    Batch), its WaitSends, its WaitRecvs, then the compute."""
    flows, messages = found.flows, found.messages
    ranks = []
    for rank, rank_slots in enumerate(slots):
        ops: list[PlanOp] = []
        for t, slot in enumerate(rank_slots):
            posts = [Send(flows[i].dst, messages[i]) for i in slot.sends]
            posts += [PostRecv(flows[i].src, messages[i]) for i in slot.recvs]
            if len(posts) > 1:
                ops.append(Batch(tuple(posts)))
            else:
                ops.extend(posts)
            ops.extend(WaitSend(messages[i]) for i in slot.wait_sends)
            ops.extend(WaitRecv(messages[i]) for i in slot.waits)
            if t < len(table.ranks[rank]):
                ops.append(Compute(table.ranks[rank][t]))
        ranks.append(RankPlan(rank, tuple(ops)))
    return ExecutionPlan(SCHEMA_VERSION, table.content_hash, tuple(ranks))


def _causal_knowledge(slots: Slots, flows: Sequence[Flow], counts: list[int]):
    """Run the plan without WaitSends (it runs wherever validate()'s execution does) with
    vector clocks: known[r][t][q] = how many of rank q's post groups rank r is sure have
    been posted when it reaches slot t's WaitSends. Also the slot of each receive."""
    ranks = len(slots)
    posted_at = [0] * len(flows)
    for rank_slots in slots:
        for t, slot in enumerate(rank_slots):
            for i in slot.recvs:
                posted_at[i] = t
    clock = [[0] * ranks for _ in range(ranks)]
    sent: dict[int, list[int]] = {}
    known: list[list[tuple[int, ...]]] = [[] for _ in range(ranks)]
    slot_of = [0] * ranks
    waited = [0] * ranks  # WaitRecvs done in the current slot
    done = 0
    while done < ranks:
        progressed = False
        for r in range(ranks):
            while slot_of[r] <= counts[r]:
                t, slot = slot_of[r], slots[r][slot_of[r]]
                if len(known[r]) == t:  # entering slot t: its post group
                    progressed = True
                    clock[r][r] = t + 1
                    for i in slot.sends:
                        sent[i] = list(clock[r])
                    known[r].append(tuple(clock[r]))
                blocked = False
                while waited[r] < len(slot.waits):
                    got = sent.get(slot.waits[waited[r]])
                    if got is None:
                        blocked = True
                        break
                    clock[r] = [max(x, y) for x, y in zip(clock[r], got)]
                    waited[r] += 1
                if blocked:
                    break
                waited[r] = 0
                slot_of[r] += 1
                progressed = True
                if slot_of[r] > counts[r]:
                    done += 1
        if not progressed and done < ranks:
            raise RuntimeError("internal: the plan without WaitSends does not run; "
                               "the table should have failed validate()")
    return known, posted_at


class _Times:
    """The predicted timeline of a table: compute times per rank, transfer ends."""

    def __init__(self, table: ScheduleTable, timeline: SimResult) -> None:
        if tuple(map(tuple, timeline.actions)) != tuple(map(tuple, table.ranks)):
            raise ValueError("the timeline is not a detailed simulation of this table "
                             "(simulate(..., detail=True) of the same table)")
        self.starts, self.ends = timeline.starts, timeline.ends
        self.index = {a: (r, i) for r, actions in enumerate(timeline.actions)
                      for i, a in enumerate(actions)}
        self.transfer = {(t.producer, t.consumer): t.end for t in timeline.transfers}

    def end(self, action: Action) -> float:
        r, i = self.index[action]
        return self.ends[r][i]

    def running_at(self, rank: int, time: float) -> int:
        """The last compute of a rank that starts no later than time (0 if none)."""
        return max(0, bisect.bisect_right(self.starts[rank], time) - 1)

    def arrival(self, flow: Flow, message: Message) -> float:
        """Predicted end of the transfer (the sender's end where SEMU has no record)."""
        found = [self.transfer.get((flow.sender, c)) for c in flow.consumers]
        found = [t for t in found if t is not None]
        return max(found) if found else self.end(flow.sender)

    def gap_after(self, rank: int, slot: int, time: float) -> int:
        """The first slot >= slot whose gap (after compute slot-1) comes at or after time."""
        ends = self.ends[rank]
        return min(len(ends), max(slot, bisect.bisect_left(ends, time, lo=max(slot - 1, 0)) + 1))


# ---- checking ------------------------------------------------------------------------


class PlanCheckError(ValueError):
    """A plan breaks a rule. rank, index (top-level op index) and op locate the first
    failure; str() names them and shows the rank's ops around it."""

    def __init__(self, rank: int, index: int, op: object, reason: str, context: str = "") -> None:
        self.rank, self.index, self.op, self.reason = rank, index, op, reason
        text = f"rank {rank} op {index} {op}: {reason}"
        super().__init__(f"{text}\n{context}" if context else text)


def _context(plan: RankPlan, index: int, window: int = 4) -> str:
    lines = []
    for i in range(max(0, index - window), min(len(plan.ops), index + window + 1)):
        mark = "  <-- ERROR HERE" if i == index else ""
        lines.append(f"  rank {plan.rank} {i:>5}  {plan.ops[i]}{mark}")
    return "\n".join(lines)


def check_plan(plan: ExecutionPlan, table: ScheduleTable) -> None:
    """Raise PlanCheckError where the plan cannot run the table (see module docstring),
    under MPI semantics and under NCCL's order as the runtime issues it there
    (nccl_order.py)."""
    _Checker(plan, table).run()
    check_nccl_order(plan, table)


class _Checker:
    def __init__(self, plan: ExecutionPlan, table: ScheduleTable) -> None:
        self.plan, self.table = plan, table
        if plan.table_hash != table.content_hash:
            raise PlanCheckError(0, 0, "(plan)", "the plan was compiled for another table "
                                 f"(hash {plan.table_hash[:12]} != {table.content_hash[:12]})")
        if [p.rank for p in plan.ranks] != list(range(table.layout.num_ranks)):
            raise PlanCheckError(0, 0, "(plan)", f"ranks {[p.rank for p in plan.ranks]} "
                                 f"for a table of {table.layout.num_ranks} ranks")
        self.flows = {f.key: f for f in table_flows(table)}
        self.inputs: dict[Action, list[Key]] = {}
        for flow in self.flows.values():
            for c in flow.consumers:
                self.inputs.setdefault(c, []).append(flow.key)
        self.stage_rank = [s.rank for s in table.layout.stages]
        self.flat = [list(flat_ops(p.ops)) for p in plan.ranks]

    def fail(self, rank: int, index: int, op: object, reason: str):
        raise PlanCheckError(rank, index, op, reason, _context(self.plan.ranks[rank], index))

    def run(self) -> None:
        self.posts()
        for rank_plan in self.plan.ranks:
            self.static(rank_plan.rank)
        self.execute()

    def posts(self) -> None:
        """Every message posted once, by the right ranks, on both sides."""
        found: tuple[dict[Key, tuple], dict[Key, tuple]] = ({}, {})
        for rank, ops in enumerate(self.flat):
            for i, j, op in ops:
                if j is not None and not isinstance(op, (Send, PostRecv)):
                    self.fail(rank, i, op, "a Batch holds only Send and PostRecv")
                if not isinstance(op, (Send, PostRecv)):
                    continue
                flow = self.flows.get(op.message.key)
                if flow is None:
                    self.fail(rank, i, op, f"{op.message} is no message of this table")
                sending = isinstance(op, Send)
                mine, peer = (flow.src, flow.dst) if sending else (flow.dst, flow.src)
                if rank != mine or op.peer != peer:
                    self.fail(rank, i, op, f"belongs on rank {mine} with peer {peer}")
                if op.message.key in found[sending]:
                    self.fail(rank, i, op, "posted twice")
                found[sending][op.message.key] = (rank, i, op)
        recvs, sends = found
        for key, (rank, i, op) in recvs.items():
            if key not in sends:
                self.fail(rank, i, op, f"receive never sent (rank {op.peer} has no Send of it)")
        for key, (rank, i, op) in sends.items():
            if key not in recvs:
                self.fail(rank, i, op, f"send never received (rank {op.peer} posts no "
                          "receive of it)")
        for key, flow in self.flows.items():
            if key not in sends:
                rank, step = flow.dst, self.table.ranks[flow.dst].index(flow.consumers[0])
                index = next(i for i, _, op in self.flat[rank]
                             if isinstance(op, Compute) and op.action == flow.consumers[0])
                self.fail(rank, index, self.plan.ranks[rank].ops[index],
                          f"input {_name(key)} (step {step}) is never sent or received")

    def static(self, rank: int) -> None:
        """One rank alone: computes in table order, inputs waited for before use, sends
        after their compute, channel order, every post waited for once."""
        actions = self.table.ranks[rank]
        done: set[Action] = set()
        posted: dict[Key, int] = {}
        sent: dict[Key, int] = {}
        waited: set[tuple[bool, Key]] = set()
        order: dict[tuple[int, Kind, bool], int] = {}
        step = 0
        for i, _, op in self.flat[rank]:
            if isinstance(op, Compute):
                if step >= len(actions) or op.action != actions[step]:
                    want = actions[step] if step < len(actions) else "nothing (rank done)"
                    self.fail(rank, i, op, f"the table's next compute here is {want}")
                for dep in dependencies(self.table, op.action):
                    if self.stage_rank[dep.stage] == rank and dep not in done:
                        self.fail(rank, i, op, f"needs {dep}, not computed before on this rank")
                for key in self.inputs.get(op.action, ()):
                    if (False, key) not in waited:
                        self.fail(rank, i, op, f"input {_name(key)} not waited for (WaitRecv) "
                                  "before this compute")
                done.add(op.action)
                step += 1
            elif isinstance(op, (Send, PostRecv)):
                sending, message = isinstance(op, Send), op.message
                if sending and self.flows[message.key].sender not in done:
                    self.fail(rank, i, op, f"sent before its compute "
                              f"{self.flows[message.key].sender} ran")
                channel = (op.peer, message.kind, sending)
                position = order.get(channel, 0)
                if message.seq != position:
                    self.fail(rank, i, op, f"channel position {position} but seq {message.seq}: "
                              f"{'sent' if sending else 'posted'} out of the sender's order")
                order[channel] = position + 1
                (sent if sending else posted)[message.key] = i
            elif isinstance(op, (WaitRecv, WaitSend)):
                sending, key = isinstance(op, WaitSend), op.message.key
                if key not in (sent if sending else posted):
                    self.fail(rank, i, op, f"no earlier {'Send' if sending else 'PostRecv'} "
                              "of it on this rank")
                if (sending, key) in waited:
                    self.fail(rank, i, op, "waited for twice")
                waited.add((sending, key))
            else:
                self.fail(rank, i, op, "not a plan op")
        last = len(self.plan.ranks[rank].ops) - 1
        if step < len(actions):
            self.fail(rank, last, self.plan.ranks[rank].ops[last] if last >= 0 else "(end)",
                      f"plan ends before the table's compute {actions[step]}")
        for sending, table in ((False, posted), (True, sent)):
            for key, i in table.items():
                if (sending, key) not in waited:
                    self.fail(rank, i, self.plan.ranks[rank].ops[i],
                              f"{_name(key)} never waited for "
                              f"({'WaitSend' if sending else 'WaitRecv'})")

    def execute(self) -> None:
        """All ranks together, MPI-like: posts never block; on a channel the n-th send
        pairs with the n-th receive; WaitRecv blocks until the paired send is posted,
        WaitSend until the paired receive is."""
        queues: dict[tuple[int, int, Kind, bool], list[tuple[int, int, Message]]] = {}
        pointer = [0] * len(self.flat)
        while True:
            progressed = False
            for rank, ops in enumerate(self.flat):
                while pointer[rank] < len(ops):
                    i, _, op = ops[pointer[rank]]
                    if isinstance(op, (Send, PostRecv)):
                        sending = isinstance(op, Send)
                        src, dst = (rank, op.peer) if sending else (op.peer, rank)
                        mine = queues.setdefault((src, dst, op.message.kind, sending), [])
                        theirs = queues.get((src, dst, op.message.kind, not sending), [])
                        mine.append((rank, i, op.message))
                        if len(theirs) >= len(mine):
                            pair = (mine[-1], theirs[len(mine) - 1])
                            self.compare(len(mine) - 1, *(pair if sending else pair[::-1]))
                    elif isinstance(op, (WaitRecv, WaitSend)):
                        flow = self.flows[op.message.key]
                        paired = queues.get((flow.src, flow.dst, flow.key[0],
                                             isinstance(op, WaitRecv)), [])
                        if len(paired) <= op.message.seq:
                            break
                    pointer[rank] += 1
                    progressed = True
            if all(p == len(ops) for p, ops in zip(pointer, self.flat)):
                return
            if not progressed:
                self.deadlock(pointer)

    def compare(self, position: int, send: tuple, recv: tuple) -> None:
        (src, i, sent), (dst, j, got) = send, recv
        if sent != got:
            what = "tensors" if sent.key == got.key else "messages"
            self.fail(dst, j, self.plan.ranks[dst].ops[j],
                      f"mismatched pair at position {position} of channel {src}->{dst} "
                      f"{sent.kind.value}: {what} differ: rank {src} op {i} sends "
                      f"{_describe(sent)}, this rank receives {_describe(got)}")

    def deadlock(self, pointer: list[int]) -> None:
        blocked = []
        for rank, ops in enumerate(self.flat):
            if pointer[rank] < len(ops):
                i, _, op = ops[pointer[rank]]
                flow = self.flows[op.message.key]
                what = (f"its send on rank {flow.src}" if isinstance(op, WaitRecv)
                        else f"its receive on rank {flow.dst}")
                blocked.append((rank, i, op, f"waits for {what}"))
        rank, i, op, why = blocked[0]
        others = "; ".join(f"rank {r} op {j} {o} {w}" for r, j, o, w in blocked[1:])
        self.fail(rank, i, op, f"deadlock: {why}" + (f"; also blocked: {others}" if others else ""))


def _name(key: Key) -> str:
    kind, producer, stage, sub = key
    if kind is Kind.ACTIVATION:
        return f"activation {producer}->stage {stage}"
    return f"gradient {Action(Op.B, stage, producer.microbatch, sub or 0)}->{producer}"


def _describe(message: Message) -> str:
    shapes = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in message.tensors)
    return f"{message} [{shapes}]"
