"""Execute one rank's execution plan: computes, P2P posts and waits, in plan order.

Per forward F(s, m, k) the executor gathers the stage's inputs (received buffers or
outputs of a stage on this rank), makes each a leaf that requires grad, runs the
forward callback and keeps outputs and leaves until B(s, m, k). Per backward it sums
the gradients of each output (received, or left by a consumer stage on this rank),
back-propagates (the loss itself on a stage with a head), and keeps each leaf's
gradient for its producer (sent, or read locally). Over a gathering edge the received
"image_embeds" are concatenated in sub order; gradients split back by autograd since
every message stays its own leaf (see models/lmm.py [Note: chunk forward]).

Any failure raises ExecutionError naming the rank, the op index and the op, so a broken
plan or a silent peer ends with a clear error instead of a hang (waits time out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..ir import Action, Op
from ..ir.graph import table_flows
from ..ir.execplan import (Batch, Compute, Kind, Message, PostRecv, Send,
                                WaitRecv, WaitSend)
from ..ir.plan import IterationPlan
from ..ir.messages import stage_inputs
from .p2p import DTYPES, Transport


class OpClock:
    """Op start and end times: perf_counter on the host; on CUDA, events recorded on the
    current stream and read once per iteration (kernels run asynchronously, so host time
    around an op measures its launch, not its run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = time.perf_counter()
        self.first = self.mark() if self.cuda else None

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def resolve(self, marks: list) -> list[tuple[int, str, float, float]]:
        """(op index, op, start, end) in perf_counter seconds (on CUDA: from the first
        event, which was recorded at self.base)."""
        if not self.cuda or not marks:
            return marks
        marks[-1][3].synchronize()
        at = lambda event: self.base + self.first.elapsed_time(event) / 1000.0  # noqa: E731
        return [(index, op, at(start), at(end)) for index, op, start, end in marks]


class ExecutionError(RuntimeError):
    """A rank could not execute an op of its plan."""


class Steps(Protocol):
    """What the executor asks of the model side."""

    def forward(self, action: Action, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """Run a stage forward; returns outputs by name and the loss to back-propagate
        (None on stages without a head)."""

    def backward(self, action: Action, tensors: list[Tensor], grads: list[Tensor | None]) -> None:
        """Back-propagate (torch.autograd.backward with Megatron's hooks around it)."""


@dataclass
class _Saved:
    outputs: dict[str, Tensor]
    loss: Tensor | None
    leaves: list[tuple[Action, str, Tensor]]
    """(producer forward, tensor name, leaf) of every input."""


@dataclass
class RankExecutor:
    """Runs rank `rank` of an IterationPlan with model callbacks and a transport."""

    plan: IterationPlan
    rank: int
    steps: Steps
    transport: Transport
    model: object
    """The ModelSpec (for the message layout)."""
    rules: object
    saved: dict[Action, _Saved] = field(default_factory=dict)
    outputs: dict[Action, dict[str, Tensor]] = field(default_factory=dict)
    received: dict[tuple, dict[str, Tensor]] = field(default_factory=dict)
    grads: dict[tuple, dict[str, Tensor]] = field(default_factory=dict)
    """(producer forward, consumer stage, consumer sub) -> input gradients by name."""
    forward_only: bool = False
    """Run the forwards alone (evaluation): backwards and gradient messages are skipped."""
    readers: dict[tuple, int] = field(default_factory=dict)
    """Received activation -> forwards on this rank still to read it."""

    timeline: list[tuple[int, str, float, float]] = field(default_factory=list)
    """Measured (op index, op, start, end) of every op, perf_counter seconds."""
    freed: int = 0
    """Output tensors whose storage was freed after sending."""
    sends_left: dict[Action, int] = field(default_factory=dict)
    """Forward -> its activation messages not yet completed (see [Note: output freeing])."""

    def __post_init__(self) -> None:
        layout = self.plan.table.layout
        for flow in table_flows(self.plan.table):
            if flow.dst == self.rank and flow.key[0] == Kind.ACTIVATION:
                self.readers[flow.key] = len(flow.consumers)
            if flow.src == self.rank and flow.key[0] == Kind.ACTIVATION:
                producer = flow.key[1]
                local = any(layout.stages[e.dst].rank == self.rank
                            for e in layout.successors(producer.stage))
                if not local:
                    self.sends_left[producer] = self.sends_left.get(producer, 0) + 1

    def run(self) -> None:
        ops = self.plan.execution.ranks[self.rank].ops
        clock = OpClock(self.transport.device)
        marks = []
        for index, op in enumerate(ops):
            try:
                began = clock.mark()
                self._run(op)
                marks.append((index, str(op), began, clock.mark()))
            except ExecutionError:
                raise
            except Exception as exc:
                raise ExecutionError(f"rank {self.rank}, op {index} ({op}): "
                                     f"{type(exc).__name__}: {exc}") from exc
        self.transport.drain()
        self.timeline = clock.resolve(marks)

    def _run(self, op) -> None:
        if self.forward_only:
            op = self._forward_part(op)
            if op is None:
                return
        if isinstance(op, Compute):
            (self._forward if op.action.op == Op.F else self._backward)(op.action)
        elif isinstance(op, Batch):
            self.transport.post([self._post_item(o) for o in op.ops])
        elif isinstance(op, (PostRecv, Send)):
            self.transport.post([self._post_item(op)])
        elif isinstance(op, WaitRecv):
            tensors = self.transport.wait("recv", op.message)
            self.received[op.message.key] = dict(zip((t.name for t in op.message.tensors), tensors))
        elif isinstance(op, WaitSend):
            self.transport.wait("send", op.message)
            if op.message.kind == Kind.ACTIVATION:
                self._sent(op.message.producer)
        else:
            raise ExecutionError(f"rank {self.rank}: unknown op {op!r}")

    def _sent(self, producer: Action) -> None:
        """[Note: output freeing] As Megatron's deallocate_output_tensor: once every
        message of a forward's outputs has been sent and no stage on this rank reads them,
        their storage is freed; the autograd graph stays (the backward runs through the
        engine without shape checks). An output that is also one of the stage's inputs
        (the DiT forwards "cond" unchanged) keeps its storage: autograd may hold it."""
        left = self.sends_left.get(producer)
        if left is None:
            return
        self.sends_left[producer] = left - 1
        saved = self.saved.get(producer)
        if left > 1 or saved is None:
            return
        inputs = {id(leaf) for _, _, leaf in saved.leaves}
        for tensor in saved.outputs.values():
            if id(tensor) not in inputs and tensor._base is None:
                tensor.data = torch.empty((1,), dtype=tensor.dtype, device=tensor.device)
                self.freed += 1

    def _forward_part(self, op):
        """The op without its backward work (None when nothing is left)."""
        if isinstance(op, Compute):
            return op if op.action.op == Op.F else None
        if isinstance(op, Batch):
            kept = tuple(o for o in op.ops if o.message.kind == Kind.ACTIVATION)
            return Batch(kept) if kept else None
        return op if op.message.kind == Kind.ACTIVATION else None

    def _post_item(self, op) -> tuple:
        message: Message = op.message
        if isinstance(op, PostRecv):
            return ("recv", op.peer, message, self.transport.allocate(message))
        if message.kind == Kind.ACTIVATION:
            source = self.outputs[message.producer]
        else:
            source = self.grads[(message.producer, message.consumer_stage, message.consumer_sub)]
        tensors = [source[t.name].contiguous() for t in message.tensors]
        for t, spec in zip(tensors, message.tensors):
            if tuple(t.shape) != tuple(spec.shape):
                raise ExecutionError(f"rank {self.rank}: {message} {spec.name} has shape "
                                     f"{tuple(t.shape)}, the plan says {tuple(spec.shape)}")
            if t.dtype != DTYPES[str(spec.dtype)]:
                raise ExecutionError(f"rank {self.rank}: {message} {spec.name} is {t.dtype}, "
                                     f"the plan says {spec.dtype}")
        return ("send", op.peer, message, tensors)

    def _incoming(self, action: Action):
        plan, layout = self.plan, self.plan.table.layout
        module = layout.stages[action.stage].parts[0].module
        members = plan.sub_members(module, action.microbatch, action.sub)
        return stage_inputs(self.model, layout, action.stage, plan.batch.microbatches[action.microbatch],
                            members, self.rules, plan.dtype, plan.tp, plan.sequence_parallel,
                            subs=plan.subs_of(action.microbatch))

    def _forward(self, action: Action) -> None:
        layout, m = self.plan.table.layout, action.microbatch
        inputs: dict[str, list[Tensor]] = {}
        leaves = []
        for message in self._incoming(action):
            producer = Action(Op.F, message.src, m, message.sub)
            if layout.stages[message.src].rank == self.rank:
                source = self.outputs[producer]
            else:
                key = (Kind.ACTIVATION, producer, action.stage, None)
                source = self.received[key]
                self.readers[key] -= 1
                if not self.readers[key]:  # the leaves below keep the storage alive
                    del self.received[key]
            for spec in message.tensors:
                leaf = source[spec.name].detach().requires_grad_()
                leaves.append((producer, spec.name, leaf))
                inputs.setdefault(spec.name, []).append(leaf)
        merged = {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in inputs.items()}
        outputs, loss = self.steps.forward(action, merged)
        if not self.forward_only:
            self.saved[action] = _Saved(outputs, loss, leaves)
        self.outputs[action] = outputs

    def _backward(self, action: Action) -> None:
        layout, m = self.plan.table.layout, action.microbatch
        forward = Action(Op.F, action.stage, m, action.sub)
        saved = self.saved.pop(forward)
        wanted: dict[str, Tensor] = {}
        for edge in layout.successors(action.stage):
            for j in range(self.plan.table.subs(edge.dst, m)):
                key = (forward, edge.dst, j)
                if layout.stages[edge.dst].rank == self.rank:
                    got = self.grads.pop(key, None)
                else:
                    got = self.received.pop((Kind.GRADIENT,) + key, None)
                for name, grad in (got or {}).items():
                    wanted[name] = grad if name not in wanted else wanted[name] + grad
        tensors, grads = [], []
        if saved.loss is not None:
            tensors.append(saved.loss)
            grads.append(None)
        for name, output in saved.outputs.items():
            if name in wanted and output.requires_grad:
                tensors.append(output)
                grads.append(wanted[name])
        if tensors:
            self.steps.backward(action, tensors, grads)
        for producer, name, leaf in saved.leaves:
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            self.grads.setdefault((producer, action.stage, action.sub), {})[name] = grad
        self.outputs.pop(forward, None)
