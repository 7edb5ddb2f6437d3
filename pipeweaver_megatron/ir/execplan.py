"""Execution plans: what one rank runs, op by op, for one iteration (planner/compile.py makes them).

A plan is a per-rank tuple of ops. The runtime executes them strictly in order:

- ``Compute(action)``: run the forward or backward of one stage on one (sub-)microbatch.
  Its cross-rank inputs were waited for by earlier ``WaitRecv`` ops; same-rank inputs
  are local tensors. After a forward the runtime keeps every output that a later
  ``Send`` or a same-rank consumer needs; after a backward, every input gradient.
- ``PostRecv(peer, message)``: allocate a buffer of the message's tensors (shapes and
  dtypes from the plan, no handshake) and post a non-blocking receive from ``peer``.
- ``Send(peer, message)``: post a non-blocking send of the message's tensors to ``peer``.
  The tensors are outputs (activation) or input gradients (gradient) of the message's
  sending compute, which has already run on this rank.
- ``WaitRecv(message)``: block until the receive posted for the message completed; the
  buffer then holds the tensors (it stays alive until every consumer compute has run).
- ``WaitSend(message)``: block until the send completed; the runtime may then free (or
  Megatron-style pseudo-free) the sent tensors.
- ``Batch(ops)``: several ``Send`` / ``PostRecv`` posted together (one
  ``batch_isend_irecv`` call), in the order given.

[Note: P2P channels] Messages travel on channels ``(sender rank, receiver rank, kind)``;
activations and gradients never share a channel. On a channel, sends and receives are
matched in posting order, as in MPI, NCCL and gloo: the n-th ``Send`` posted by the
sender pairs with the n-th ``PostRecv`` posted by the receiver. ``Message.seq`` is that
position n (counted from 0); compile.check_plan verifies both sides agree.

Compact JSON form (``ExecutionPlan.to_json``; enums by name)::

    {"schema_version": 1, "table_hash": "<ScheduleTable.content_hash>",
     "tensors":  [[["hidden", [4096, 1, 1024], "bfloat16"], ...], ...],
     "messages": [["ACTIVATION", "3F2.1", 4, null, 5, 0],
                  ["GRADIENT",   "3F2.1", 4, 0,    5, 0], ...],
     "ranks":    [["C:0F0", ["S1:a0", "R1:g7"], "WS:a0", "WR:g7", "C:0B0", ...], ...]}

``tensors`` lists every distinct tensor tuple once as ``[name, shape, dtype]`` triples.
``messages`` lists every message once as ``[kind, producer action, consumer stage,
consumer sub (null for an activation), seq, index into tensors]``. An op is one string:
``C:<action>`` Compute, ``S<peer>:<k><i>`` Send, ``R<peer>:<k><i>`` PostRecv,
``WS:<k><i>`` WaitSend, ``WR:<k><i>`` WaitRecv, where ``i`` indexes ``messages`` and
``k`` is ``a`` (activation) or ``g`` (gradient), checked on reading; a JSON list of such
strings is a Batch.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Union

from .action import Action, Op

SCHEMA_VERSION = 1

TRANSPORTS = ("tags", "nccl-order")
"""The runtime's transports (runtime/p2p.py): one gloo group with a tag per kind, or one
communicator per channel issued as this module's default replay (NCCL's order)."""


class TensorLike(Protocol):
    """What a plan needs of a tensor spec (ir.messages.TensorSpec has it)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> Any: ...


class Kind(str, enum.Enum):
    """What a message carries."""

    ACTIVATION = "activation"
    """Outputs of a forward, sent downstream."""
    GRADIENT = "gradient"
    """Gradients of such outputs, sent back upstream by a backward."""


@dataclass(frozen=True, slots=True)
class Message:
    """One point-to-point transfer of a plan.

    An activation carries the outputs of forward ``producer`` (stage s) that stage
    ``consumer_stage`` (d) reads: one message per (producer action, consumer stage), used
    by every sub-microbatch of d that needs it. A gradient carries the gradient of that
    same output computed by the backward of sub ``consumer_sub`` of d; the backward of
    ``producer`` sums the gradients from all of d's sub-microbatches that used it.
    """

    kind: Kind
    producer: Action
    """The forward whose output is carried (or, for a gradient, differentiated)."""
    consumer_stage: int
    consumer_sub: int | None
    """Gradient: the sub-microbatch of consumer_stage whose backward sends it. None for
    an activation."""
    tensors: tuple[TensorLike, ...]
    seq: int
    """Position on its channel (see [Note: P2P channels])."""

    @property
    def sender(self) -> Action:
        """The compute after which this message is sent."""
        if self.kind is Kind.ACTIVATION:
            return self.producer
        return Action(Op.B, self.consumer_stage, self.producer.microbatch, self.consumer_sub or 0)

    @property
    def receiver_stage(self) -> int:
        """The stage whose rank receives it."""
        return self.consumer_stage if self.kind is Kind.ACTIVATION else self.producer.stage

    @property
    def key(self) -> tuple[Kind, Action, int, int | None]:
        """Identity without tensors and position."""
        return (self.kind, self.producer, self.consumer_stage, self.consumer_sub)

    def __str__(self) -> str:
        if self.kind is Kind.ACTIVATION:
            return f"a[{self.producer}->stage {self.consumer_stage}]#{self.seq}"
        return f"g[{self.sender}->{self.producer}]#{self.seq}"


@dataclass(frozen=True, slots=True)
class Compute:
    """Run one action (forward or backward of a stage)."""

    action: Action

    def __str__(self) -> str:
        return f"Compute({self.action})"


@dataclass(frozen=True, slots=True)
class PostRecv:
    """Post a non-blocking receive of message from peer (buffer shapes from the plan)."""

    peer: int
    message: Message

    def __str__(self) -> str:
        return f"PostRecv(from {self.peer}, {self.message})"


@dataclass(frozen=True, slots=True)
class Send:
    """Post a non-blocking send (isend) of message to peer."""

    peer: int
    message: Message

    def __str__(self) -> str:
        return f"Send(to {self.peer}, {self.message})"


@dataclass(frozen=True, slots=True)
class WaitRecv:
    """Block until the posted receive of message has completed."""

    message: Message

    def __str__(self) -> str:
        return f"WaitRecv({self.message})"


@dataclass(frozen=True, slots=True)
class WaitSend:
    """Block until the send of message has completed; its tensors may then be freed."""

    message: Message

    def __str__(self) -> str:
        return f"WaitSend({self.message})"


@dataclass(frozen=True, slots=True)
class Batch:
    """Sends and receives posted together (one batch_isend_irecv), in this order."""

    ops: tuple[Union[Send, PostRecv], ...]

    def __str__(self) -> str:
        return "Batch(" + ", ".join(map(str, self.ops)) + ")"


PlanOp = Union[Compute, PostRecv, Send, WaitRecv, WaitSend, Batch]


def flat_ops(ops: tuple[PlanOp, ...]) -> Iterator[tuple[int, int | None, PlanOp]]:
    """(op index, index inside its Batch or None, op) with Batches opened."""
    for i, op in enumerate(ops):
        if isinstance(op, Batch):
            for j, inner in enumerate(op.ops):
                yield i, j, inner
        else:
            yield i, None, op


@dataclass(frozen=True, slots=True)
class RankPlan:
    """The ops one rank runs, in order."""

    rank: int
    ops: tuple[PlanOp, ...]

    def render(self) -> str:
        """One op per line, numbered (for logs and error messages)."""
        return "\n".join(f"{i:>5}  {op}" for i, op in enumerate(self.ops))


@dataclass(frozen=True, slots=True)
class RankPlanStats:
    """Ops of one rank by kind (Batch members counted by their own kind)."""

    rank: int
    forward: int
    backward: int
    send: int
    post_recv: int
    wait_send: int
    wait_recv: int
    batches: int

    def to_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__slots__}


class PlanFormatError(ValueError):
    """A serialized plan cannot be read; the message names the key and the reason."""


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """Every rank's ops for one ScheduleTable (identified by its content hash)."""

    schema_version: int
    table_hash: str
    ranks: tuple[RankPlan, ...]

    def to_json(self) -> dict[str, Any]:
        """The compact, versioned JSON form (see the module docstring)."""
        tensors: dict[tuple, int] = {}
        messages: dict[Message, int] = {}
        rows: list[list] = []

        def ref(message: Message) -> str:
            if message not in messages:
                tensors.setdefault(message.tensors, len(tensors))
                messages[message] = len(messages)
            return f"{'a' if message.kind is Kind.ACTIVATION else 'g'}{messages[message]}"

        def code(op: PlanOp) -> Any:
            if isinstance(op, Compute):
                return f"C:{op.action}"
            if isinstance(op, Send):
                return f"S{op.peer}:{ref(op.message)}"
            if isinstance(op, PostRecv):
                return f"R{op.peer}:{ref(op.message)}"
            if isinstance(op, WaitSend):
                return f"WS:{ref(op.message)}"
            if isinstance(op, WaitRecv):
                return f"WR:{ref(op.message)}"
            if isinstance(op, Batch):
                return [code(inner) for inner in op.ops]
            raise TypeError(f"not a plan op: {op!r}")

        for plan in self.ranks:
            rows.append([code(op) for op in plan.ops])
        return {
            "schema_version": self.schema_version,
            "table_hash": self.table_hash,
            "tensors": [[[t.name, list(t.shape), _dtype_name(t.dtype)] for t in group]
                        for group in tensors],
            "messages": [[m.kind.name, str(m.producer), m.consumer_stage, m.consumer_sub, m.seq,
                          tensors[m.tensors]] for m in messages],
            "ranks": rows,
        }

    def dumps(self) -> str:
        """Canonical JSON text (sorted keys, compact): the hashed form."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @property
    def content_hash(self) -> str:
        """Stable SHA-256 of the canonical JSON form."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    @staticmethod
    def from_json(data: Any, tensor_spec: Callable[[str, tuple[int, ...], str], Any] | None = None
                  ) -> "ExecutionPlan":
        """Read the JSON form. tensor_spec(name, shape, dtype name) builds a tensor spec
        (default: ir.messages.TensorSpec). Errors raise PlanFormatError."""
        if tensor_spec is None:
            tensor_spec = _default_tensor_spec()
        return _Reader(tensor_spec).plan(data)

    @staticmethod
    def loads(text: str, tensor_spec: Callable[[str, tuple[int, ...], str], Any] | None = None
              ) -> "ExecutionPlan":
        """Read JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanFormatError(f"not JSON: {exc}") from None
        return ExecutionPlan.from_json(data, tensor_spec)


def rank_plan_stats(plan: ExecutionPlan) -> tuple[RankPlanStats, ...]:
    """Ops per kind per rank, for logs."""
    out = []
    for rank_plan in plan.ranks:
        count = dict.fromkeys(RankPlanStats.__slots__, 0)
        count["rank"] = rank_plan.rank
        count["batches"] = sum(isinstance(op, Batch) for op in rank_plan.ops)
        for _, _, op in flat_ops(rank_plan.ops):
            if isinstance(op, Compute):
                count["forward" if op.action.op is Op.F else "backward"] += 1
            else:
                count[{Send: "send", PostRecv: "post_recv", WaitSend: "wait_send",
                       WaitRecv: "wait_recv"}[type(op)]] += 1
        out.append(RankPlanStats(**count))
    return tuple(out)


def _dtype_name(dtype: Any) -> str:
    return dtype.name if isinstance(dtype, enum.Enum) else str(dtype)


def _default_tensor_spec() -> Callable[[str, tuple[int, ...], str], Any]:
    try:
        from .messages import TensorSpec
    except ImportError as exc:  # the message shapes module is optional for reading
        raise PlanFormatError(f"no tensor spec type to read plans into ({exc}); pass "
                              "tensor_spec=") from None
    return TensorSpec


class _Reader:
    """Strict reader of the JSON form; every error names the key path."""

    def __init__(self, tensor_spec: Callable[[str, tuple[int, ...], str], Any]) -> None:
        self.tensor_spec = tensor_spec

    def get(self, obj: Any, key: str, kind: type, where: str = "") -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise PlanFormatError(f"{where}{key}: missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PlanFormatError(f"{where}{key}: expected {kind.__name__}, got {value!r}")
        return value

    def plan(self, data: Any) -> ExecutionPlan:
        if not isinstance(data, dict):
            raise PlanFormatError("the document must be a JSON object")
        version = self.get(data, "schema_version", int)
        if version != SCHEMA_VERSION:
            raise PlanFormatError(f"schema_version: {version} is not supported (this reader "
                                  f"knows {SCHEMA_VERSION})")
        groups = [self.tensors(g, f"tensors[{i}]")
                  for i, g in enumerate(self.get(data, "tensors", list))]
        messages = [self.message(m, groups, f"messages[{i}]")
                    for i, m in enumerate(self.get(data, "messages", list))]
        ranks = tuple(
            RankPlan(r, tuple(self.op(op, messages, f"ranks[{r}][{i}]", True)
                              for i, op in enumerate(self.check(ops, list, f"ranks[{r}]"))))
            for r, ops in enumerate(self.get(data, "ranks", list)))
        return ExecutionPlan(version, self.get(data, "table_hash", str), ranks)

    def check(self, value: Any, kind: type, where: str) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PlanFormatError(f"{where}: expected {kind.__name__}, got {value!r}")
        return value

    def tensors(self, group: Any, where: str) -> tuple:
        out = []
        for j, item in enumerate(self.check(group, list, where)):
            here = f"{where}[{j}]"
            if not (isinstance(item, list) and len(item) == 3):
                raise PlanFormatError(f"{here}: expected [name, shape, dtype]")
            name, shape, dtype = item
            self.check(name, str, here + ".name")
            self.check(dtype, str, here + ".dtype")
            dims = tuple(self.check(d, int, f"{here}.shape") for d in self.check(shape, list, here))
            out.append(self.tensor_spec(name, dims, dtype))
        return tuple(out)

    def message(self, item: Any, groups: list, where: str) -> Message:
        if not (isinstance(item, list) and len(item) == 6):
            raise PlanFormatError(f"{where}: expected [kind, producer, consumer stage, "
                                  "consumer sub, seq, tensors]")
        kind, producer, stage, sub, seq, group = item
        if kind not in Kind.__members__:
            raise PlanFormatError(f"{where}.kind: {kind!r} is not one of "
                                  f"{', '.join(Kind.__members__)}")
        try:
            action = Action.from_str(self.check(producer, str, where + ".producer"))
        except ValueError as exc:
            raise PlanFormatError(f"{where}.producer: {exc}") from None
        if (Kind[kind] is Kind.ACTIVATION) != (sub is None):
            raise PlanFormatError(f"{where}: consumer sub must be null exactly for activations")
        if sub is not None:
            self.check(sub, int, where + ".consumer_sub")
        if not 0 <= self.check(group, int, where + ".tensors") < len(groups):
            raise PlanFormatError(f"{where}.tensors: no tensor group {group}")
        return Message(Kind[kind], action, self.check(stage, int, where + ".consumer_stage"),
                       sub, groups[group], self.check(seq, int, where + ".seq"))

    def op(self, item: Any, messages: list[Message], where: str, top: bool) -> PlanOp:
        if isinstance(item, list) and top:
            ops = tuple(self.op(x, messages, f"{where}[{j}]", False) for j, x in enumerate(item))
            if not all(isinstance(x, (Send, PostRecv)) for x in ops):
                raise PlanFormatError(f"{where}: a batch holds only sends and receives")
            return Batch(ops)
        text = self.check(item, str, where)
        head, _, tail = text.partition(":")
        peer = head[1:] if head[:1] in ("S", "R") and head[1:].isdigit() else None
        if head not in ("C", "WS", "WR") and peer is None:
            raise PlanFormatError(f"{where}: {text!r} is not an op (C:, S<peer>:, R<peer>:, "
                                  "WS:, WR:)")
        try:
            if head == "C":
                return Compute(Action.from_str(tail))
            message = self.ref(tail, messages)
        except ValueError as exc:
            raise PlanFormatError(f"{where}: {text!r}: {exc}") from None
        if head == "WS":
            return WaitSend(message)
        if head == "WR":
            return WaitRecv(message)
        return (Send if head[0] == "S" else PostRecv)(int(peer), message)

    @staticmethod
    def ref(text: str, messages: list[Message]) -> Message:
        letter, number = text[:1], text[1:]
        if letter not in ("a", "g") or not number.isdigit() or int(number) >= len(messages):
            raise ValueError(f"no message {text!r}")
        message = messages[int(number)]
        if (letter == "a") != (message.kind is Kind.ACTIVATION):
            raise ValueError(f"message {number} is a {message.kind.value}, not {letter!r}")
        return message
