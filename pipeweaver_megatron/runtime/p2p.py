"""Point-to-point transport of an execution plan over torch.distributed.

Pipeline ranks of the plan map to global ranks of the pipeline group. Buffers take the
shapes and dtypes the plan gives: no handshake. Two modes (planner/nccl_order.py's
``TRANSPORTS``):

- ``tags`` (the default on gloo): one process group; each message kind has its own tag
  (activations 0, gradients 1), and a plan's Batch is one ``batch_isend_irecv``. gloo
  honours tags and completes every operation on its own: check_plan's MPI replay.
- ``nccl-order`` (always on NCCL): one communicator per channel (sender rank, receiver
  rank, kind) of the layout, created once per run for every pipeline as Megatron
  creates its groups; every message with tag 0; every operation issued alone, in plan
  order, so each communicator carries one channel whose operations both ends post in
  the same order. See [Note: NCCL channels].

[Note: NCCL channels] NCCL ignores tags, runs a communicator's operations in issue
order on one stream and completes a group (batch_isend_irecv) as a whole.
planner/nccl_order.py replays plans under those rules: with one communicator per pair,
or with a Batch's receives of one channel grouped, plans that run under MPI semantics
hang (the tests build them); per channel and ungrouped they do not, and check_plan
replays every plan that way. On gloo, ``--transport nccl-order`` runs exactly this code
path, so a run that matches the reference there does not rely on tags.

On CUDA a wait does not block the host: it orders the compute stream after the
operation (NCCL accepts no timeout there). A Watchdog thread then names the rank and the
operation that did not complete within timeout_s, and ends the process.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from ..ir.execplan import Kind, Message

TAGS = {Kind.ACTIVATION: 0, Kind.GRADIENT: 1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Channel = tuple[int, int, Kind]
"""(sending pipeline rank, receiving pipeline rank, kind)."""


def layout_channels(layout) -> list[Channel]:
    """Every channel a plan of this layout can use (cross-rank edges, both kinds)."""
    found = set()
    for edge in layout.edges:
        src, dst = layout.stages[edge.src].rank, layout.stages[edge.dst].rank
        if src != dst:
            found.add((src, dst, Kind.ACTIVATION))
            found.add((dst, src, Kind.GRADIENT))
    return sorted(found, key=lambda c: (c[0], c[1], c[2].name))


_MADE: dict = {}
"""Channels.create's groups by (layout, pipeline ranks, world group)."""


@dataclass
class Channels:
    """One process group per channel, for this rank's pipeline."""

    groups: dict[Channel, dist.ProcessGroup]

    @staticmethod
    def create(layout, pipeline_ranks: Sequence[int]) -> "Channels":
        """Collective over the world: every rank calls it, with its own pipeline's global
        ranks; groups are made for every pipeline in one order on all ranks, once per
        (layout, pipeline) in a process (later calls return the same groups)."""
        key = (layout, tuple(pipeline_ranks), id(dist.group.WORLD))
        if key not in _MADE:
            _MADE[key] = Channels._create(layout, pipeline_ranks)
        return _MADE[key]

    @staticmethod
    def _create(layout, pipeline_ranks: Sequence[int]) -> "Channels":
        pipelines: list = [None] * dist.get_world_size()
        dist.all_gather_object(pipelines, tuple(pipeline_ranks))
        channels = layout_channels(layout)
        mine = {}
        for ranks in sorted(set(pipelines)):
            for channel in channels:
                group = dist.new_group([ranks[channel[0]], ranks[channel[1]]])
                if ranks == tuple(pipeline_ranks):
                    mine[channel] = group
        return Channels(mine)

    def group(self, channel: Channel) -> dist.ProcessGroup:
        try:
            return self.groups[channel]
        except KeyError:
            raise RuntimeError(f"no communicator for channel {channel[0]}->{channel[1]} "
                               f"{channel[2].value}: the plan's layout differs from the one "
                               "the channels were made for") from None


@dataclass
class Pending:
    """Posted but not yet waited for: the work handles and the tensors involved."""

    works: list
    tensors: list[torch.Tensor]


@dataclass
class Transport:
    """isend / irecv between the pipeline ranks of one group."""

    group: dist.ProcessGroup | None
    ranks: Sequence[int]
    """Global rank of every pipeline rank."""
    device: torch.device
    timeout_s: float = 300.0
    """How long one wait may block before the rank gives up with an error."""
    channels: Channels | None = None
    """Per-channel communicators (nccl-order); None: one group with tags."""
    rank: int = 0
    """This pipeline rank (for the channel of a message)."""
    watchdog: "Watchdog | None" = None
    posted: dict = field(default_factory=dict)

    def allocate(self, message: Message) -> list[torch.Tensor]:
        return [torch.empty(t.shape, dtype=DTYPES[str(t.dtype)], device=self.device)
                for t in message.tensors]

    def post(self, items: list[tuple[str, int, Message, list[torch.Tensor]]]) -> None:
        """Post sends and receives: together (one batch_isend_irecv) with tags, one by
        one on their channels' communicators in nccl-order."""
        if self.channels is None:
            ops, owners = [], []
            for kind, peer, message, tensors in items:
                fn = dist.isend if kind == "send" else dist.irecv
                made = [dist.P2POp(fn, t, self.ranks[peer], self.group, TAGS[message.kind])
                        for t in tensors]
                ops += made
                owners.append((kind, message, tensors, len(made)))
            works = dist.batch_isend_irecv(ops) if ops else []
            start = 0
            for kind, message, tensors, count in owners:
                self._posted(kind, message, works[start:start + count], tensors)
                start += count
            return
        for kind, peer, message, tensors in items:
            sending = kind == "send"
            channel = (self.rank, peer, message.kind) if sending else (peer, self.rank, message.kind)
            group = self.channels.group(channel)
            fn = dist.isend if sending else dist.irecv
            works = [fn(t, self.ranks[peer], group=group, tag=0) for t in tensors]
            self._posted(kind, message, works, tensors)

    def _posted(self, kind: str, message: Message, works: list, tensors: list) -> None:
        self.posted[(kind, message.key)] = Pending(works, tensors)
        if self.watchdog is not None:
            self.watchdog.watch(f"{kind} of {message}", works)

    def wait(self, kind: str, message: Message) -> list[torch.Tensor]:
        """Block until the posted send or receive completes (raises TimeoutError); on
        CUDA, order the current stream after it (the watchdog catches a hang)."""
        pending = self.posted.pop((kind, message.key))
        for work in pending.works:
            self._wait(work, f"{kind} of {message}")
        return pending.tensors

    def _wait(self, work, what: str) -> None:
        if self.device.type == "cuda":
            work.wait()
            return
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:  # gloo reports a timeout as a RuntimeError
            raise TimeoutError(f"{what} did not complete within {self.timeout_s:g} s: "
                               f"{str(exc).splitlines()[0]}") from exc

    def drain(self) -> None:
        """Wait for everything still posted (sends never waited for by the plan)."""
        for kind, key in list(self.posted):
            pending = self.posted.pop((kind, key))
            for work in pending.works:
                self._wait(work, f"{kind} of {key}")


class Watchdog:
    """Names the first posted operation that has not completed within timeout_s (on
    CUDA, where waits do not block the host), then ends the process."""

    def __init__(self, rank: int, timeout_s: float, poll_s: float = 1.0,
                 on_hang=None) -> None:
        self.rank, self.timeout_s, self.poll_s = rank, timeout_s, poll_s
        self.on_hang = on_hang or _abort
        self._entries: list[tuple[float, str, list]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pipeweaver-p2p-watchdog")
        self._thread.start()

    def watch(self, what: str, works: list) -> None:
        with self._lock:
            self._entries.append((time.monotonic(), what, works))

    def check(self, now: float) -> str | None:
        """Drop completed entries; the message for the oldest overdue one, if any."""
        with self._lock:
            self._entries = [e for e in self._entries
                             if not all(w.is_completed() for w in e[2])]
            for began, what, _ in self._entries:
                if now - began > self.timeout_s:
                    return (f"rank {self.rank}: {what} did not complete within "
                            f"{self.timeout_s:g} s (posted {now - began:.0f} s ago)")
        return None

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            found = self.check(time.monotonic())
            if found is not None:
                self.on_hang(found)
                return


def _abort(message: str) -> None:
    print(f"[pipeweaver] ERROR: {message}; ending the process", file=sys.stderr, flush=True)
    os._exit(1)
