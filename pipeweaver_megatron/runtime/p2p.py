"""Point-to-point transport of an execution plan over torch.distributed.

Pipeline ranks of the plan map to global ranks of the pipeline group. Each message
kind has its own tag (activations 0, gradients 1), so the two channels between a pair
of ranks never match each other's messages (gloo honours tags; see [Note: NCCL
channels]). Buffers take the shapes and dtypes the plan gives: no handshake.

[Note: NCCL channels] NCCL ignores tags and matches P2P in issue order per pair of
ranks. The compiler posts receives in each sender's order per (pair, kind); on NCCL the
two kinds of one pair may still interleave differently on both sides. Untested here (no
GPU on CI): the CUDA path runs the same code, and a per-kind communicator is the fix if
a GPU check shows a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from ..planner.execplan import Kind, Message

TAGS = {Kind.ACTIVATION: 0, Kind.GRADIENT: 1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    posted: dict = field(default_factory=dict)

    def allocate(self, message: Message) -> list[torch.Tensor]:
        return [torch.empty(t.shape, dtype=DTYPES[str(t.dtype)], device=self.device)
                for t in message.tensors]

    def ops(self, kind: str, peer: int, message: Message, tensors: list[torch.Tensor]) -> list:
        fn = dist.isend if kind == "send" else dist.irecv
        return [dist.P2POp(fn, t, self.ranks[peer], self.group, TAGS[message.kind])
                for t in tensors]

    def post(self, items: list[tuple[str, int, Message, list[torch.Tensor]]]) -> None:
        """Post sends and receives together (one batch_isend_irecv when several)."""
        ops, owners = [], []
        for kind, peer, message, tensors in items:
            made = self.ops(kind, peer, message, tensors)
            ops += made
            owners.append((kind, message, tensors, len(made)))
        works = dist.batch_isend_irecv(ops) if ops else []
        start = 0
        for kind, message, tensors, count in owners:
            self.posted[(kind, message.key)] = Pending(works[start:start + count], tensors)
            start += count

    def wait(self, kind: str, message: Message) -> list[torch.Tensor]:
        """Block until the posted send or receive completes (raises TimeoutError)."""
        pending = self.posted.pop((kind, message.key))
        for work in pending.works:
            try:
                work.wait(timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:  # gloo reports a timeout as a RuntimeError
                raise TimeoutError(f"{kind} of {message} did not complete within "
                                   f"{self.timeout_s:g} s: {str(exc).splitlines()[0]}") from exc
        return pending.tensors

    def drain(self) -> None:
        """Wait for everything still posted (sends never waited for by the plan)."""
        for kind, key in list(self.posted):
            pending = self.posted.pop((kind, key))
            for work in pending.works:
                work.wait(timedelta(seconds=self.timeout_s))
