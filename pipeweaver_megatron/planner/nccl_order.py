"""Replay a plan under NCCL's rules, as the runtime issues it on NCCL (check_nccl_order).

check_plan's MPI-like replay lets every posted operation complete on its own as soon as
its partner is posted. NCCL does not:

- Operations on one communicator run in issue order on that communicator's stream: an
  operation starts only after every operation issued before it on the same
  communicator, by the same rank, has completed.
- A group (``batch_isend_irecv``, i.e. ncclGroupStart/End) is one kernel: it completes
  as a whole, when every operation in it has met its partner, and its work handles
  all report that completion.
- A send and its receive progress only while both of their groups are running.
- Tags are ignored: on a communicator, the n-th send from a to b pairs with the n-th
  receive on b from a.
- A wait blocks what the rank issues after it (the compute stream waits for the
  operation, and every later operation is ordered after the compute stream).

How plan ops map to communicators and groups is the transport's choice
(runtime/p2p.py). ``per_channel`` gives each channel (sender rank, receiver rank, kind)
its own communicator; ``per_pair`` is one communicator per pair of ranks for both kinds
and directions, what a single process group with tags becomes on NCCL. ``grouped``
issues each Batch as one group per communicator (its ops in the listed order);
ungrouped, every operation is issued alone.

What the transport does on NCCL and in ``--transport nccl-order`` is per_channel and
ungrouped, the default here, and check_plan replays every plan that way. There the
rules reduce to check_plan's MPI replay (a channel's n-th operation cannot complete
before its (n-1)-th, whose partner was posted first). The other modes are what the
transport must not do, and the tests show plans that pass MPI semantics and hang under
them: grouping a channel's receives posted ahead makes a wait for the first one wait
for the sender's later sends; one communicator per pair queues a receive behind a send
to the same peer that the peer can only match after that receive.

The replay runs all ranks together and raises PlanCheckError naming the rank, the op
and what it hangs on where the plan would deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

from ..ir import ScheduleTable
from ..ir.execplan import Batch, ExecutionPlan, Kind, PostRecv, Send, WaitRecv, WaitSend

COMMUNICATORS = ("per_channel", "per_pair")


Channel = tuple[int, int, Kind]
"""(sender rank, receiver rank, kind)."""


def communicator_of(mode: str) -> Callable[[Channel], Hashable]:
    """The communicator a channel's operations go to under a transport mode."""
    if mode == "per_channel":
        return lambda channel: channel
    if mode == "per_pair":
        return lambda channel: (min(channel[:2]), max(channel[:2]))
    raise ValueError(f"unknown communicator mode {mode!r}; known: {', '.join(COMMUNICATORS)}")


@dataclass(slots=True)
class _Group:
    rank: int
    index: int
    """Top-level op index of the post (or Batch) that issued it."""
    communicator: Hashable
    ops: list  # of _Post
    running: bool = False
    complete: bool = False


@dataclass(slots=True)
class _Post:
    group: _Group
    channel: Channel
    sending: bool
    message: object
    partner: "_Post | None" = None
    done: bool = False


@dataclass
class _Replay:
    plan: ExecutionPlan
    communicator: Callable[[Channel], Hashable]
    queues: dict = field(default_factory=dict)
    """(rank, communicator) -> groups issued and not complete, in issue order."""
    unmatched: dict = field(default_factory=dict)
    """(communicator, src, dst, sending) -> posts waiting for their partner, in issue
    order."""
    mismatches: list = field(default_factory=list)
    """(rank, op index, op, partner post) of every pair of different messages."""
    posts: dict = field(default_factory=dict)
    """(rank, sending, message key) -> its _Post."""

    def issue(self, rank: int, index: int, ops: list, grouped: bool) -> None:
        groups: dict[Hashable, _Group] = {}
        for op in ops:
            if not grouped:
                groups = {}
            sending = isinstance(op, Send)
            src, dst = (rank, op.peer) if sending else (op.peer, rank)
            channel = (src, dst, op.message.kind)
            comm = self.communicator(channel)
            group = groups.get(comm)
            if group is None:
                group = groups[comm] = _Group(rank, index, comm, [])
                self.queues.setdefault((rank, comm), []).append(group)
            post = _Post(group, channel, sending, op.message)
            group.ops.append(post)
            self.posts[(rank, sending, op.message.key)] = post
            # Tags are ignored: pairs are matched per communicator and direction.
            waiting = self.unmatched.setdefault((comm, src, dst, not sending), [])
            if waiting:
                partner = waiting.pop(0)
                post.partner, partner.partner = partner, post
                if partner.message != post.message:
                    self.mismatches.append((rank, index, op, partner))
            else:
                self.unmatched.setdefault((comm, src, dst, sending), []).append(post)

    def settle(self) -> None:
        """Run groups to completion wherever NCCL's rules let them (a fixed point)."""
        changed = True
        while changed:
            changed = False
            for queue in self.queues.values():
                if not queue:
                    continue
                if not queue[0].running:
                    queue[0].running, changed = True, True
                group = queue[0]
                for post in group.ops:
                    if not post.done and post.partner is not None and post.partner.group.running:
                        post.done = post.partner.done = True
                if all(post.done for post in group.ops):
                    group.complete, group.running = True, False
                    queue.pop(0)
                    changed = True

    def waits_for(self, rank: int, op) -> _Group | None:
        """The incomplete group a wait blocks on (None: it may go on)."""
        post = self.posts[(rank, isinstance(op, WaitSend), op.message.key)]
        return None if post.group.complete else post.group


def check_nccl_order(plan: ExecutionPlan, table: ScheduleTable,
                     communicators: str = "per_channel", grouped: bool = False) -> None:
    """Raise PlanCheckError where the plan would hang under NCCL's rules (see the module
    docstring). Run after check_plan: it assumes posts, peers and pairs are right."""
    from .compile import PlanCheckError, _context

    replay = _Replay(plan, communicator_of(communicators))
    pointer = [0] * len(plan.ranks)
    while True:
        progressed = False
        for rank, rank_plan in enumerate(plan.ranks):
            ops = rank_plan.ops
            while pointer[rank] < len(ops):
                op = ops[pointer[rank]]
                if isinstance(op, (Send, PostRecv, Batch)):
                    replay.issue(rank, pointer[rank],
                                 list(op.ops) if isinstance(op, Batch) else [op], grouped)
                    replay.settle()
                    if replay.mismatches:
                        _mismatch(plan, replay.mismatches[0], _mode(communicators, grouped))
                elif isinstance(op, (WaitRecv, WaitSend)) and replay.waits_for(rank, op):
                    break
                pointer[rank] += 1
                progressed = True
        if all(p == len(r.ops) for p, r in zip(pointer, plan.ranks)):
            return
        if not progressed:
            rank = next(r for r, p in enumerate(pointer) if p < len(plan.ranks[r].ops))
            index = pointer[rank]
            op = plan.ranks[rank].ops[index]
            raise PlanCheckError(rank, index, op, f"hangs under NCCL order "
                                 f"({_mode(communicators, grouped)}): "
                                 + _blocked(replay, plan, pointer),
                                 _context(plan.ranks[rank], index))


def _mode(communicators: str, grouped: bool) -> str:
    return f"{communicators} communicators, " + ("Batches grouped" if grouped else "ungrouped")


def _mismatch(plan: ExecutionPlan, found: tuple, mode: str) -> None:
    from .compile import PlanCheckError, _context

    rank, index, op, partner = found
    raise PlanCheckError(rank, index, op, f"under NCCL order ({mode}, "
                         f"tags ignored) this pairs with {partner.message} posted by rank "
                         f"{partner.group.rank} op {partner.group.index}",
                         _context(plan.ranks[rank], index))


def _blocked(replay: _Replay, plan: ExecutionPlan, pointer: list[int]) -> str:
    """Why every blocked rank waits: the group it waits on, and what holds that group."""
    lines = []
    for rank, rank_plan in enumerate(plan.ranks):
        if pointer[rank] >= len(rank_plan.ops):
            continue
        op = rank_plan.ops[pointer[rank]]
        group = replay.waits_for(rank, op)
        queue = replay.queues[(rank, group.communicator)]
        if queue[0] is not group:
            head = queue[0]
            why = (f"queued on communicator {_comm(group.communicator)} behind the group "
                   f"posted at op {head.index}, still incomplete")
        else:
            missing = [p for p in group.ops if not p.done]
            post = missing[0]
            peer = post.channel[1] if post.sending else post.channel[0]
            why = (f"its group (op {group.index}) needs "
                   f"{'the receive' if post.sending else 'the send'} of {post.message} on rank "
                   f"{peer}, " + ("not posted yet" if post.partner is None else
                                  f"queued there behind op "
                                  f"{replay.queues[(peer, group.communicator)][0].index}"))
        lines.append(f"rank {rank} op {pointer[rank]} {op}: {why}")
    return "; ".join(lines)


def _comm(comm: Hashable) -> str:
    if len(comm) == 3:
        return f"{comm[0]}->{comm[1]} {comm[2].value}"
    return f"{{{comm[0]}, {comm[1]}}}"
