"""What a worker sends back, and the parent's check of every plan before it is served.

[Note: wire format] Workers answer with JSON (never pickle): the table and the
execution plan in their versioned JSON forms, the sample ids of each microbatch, the
sub-microbatch members, dtype, tp and the plan's content hash. The parent rebuilds the
IterationPlan around the batch it submitted, so the plan served always carries the
trainer's own sample metadata; a plan naming other samples is rejected. (Batches go to
the workers through multiprocessing's pickling: they are the parent's own values.)

read_plan checks, in this order, and raises InvalidPlan naming the first failure:
readable; every sample of the batch exactly once and in the batch's microbatches; the
microbatch count; the run's layout; dtype and tp; the sub-microbatch members against
the table's counts; the table itself (ir.validate); the execution plan against the
table (planner.check_plan); the content hash the worker sent. The worker runs the whole
check on its own message before sending it (at idle priority, off the training ranks'
critical path) and says so ("validated"); the parent then repeats all but the table and
execution-plan checks, so what it serves still names exactly the batch it submitted and
hashes to what the worker checked.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ..ir import Layout, ScheduleFormatError, ScheduleTable, ScheduleValidationError, validate
from ..planner.compile import PlanCheckError, check_plan
from ..ir.execplan import ExecutionPlan, PlanFormatError
from ..ir.plan import IterationPlan
from ..workload import GlobalBatch

WIRE_VERSION = 1


class InvalidPlan(ValueError):
    """A worker's plan that must not run; str() is the reason's detail."""


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}).encode()


def decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data.decode())
    if not isinstance(message, dict) or "kind" not in message:
        raise ValueError(f"not a service message: {str(message)[:80]}")
    return message


def encode_plan(iteration: int, plan: IterationPlan, validated: bool = False,
                **info: Any) -> bytes:
    """The plan message of one iteration (info: planning time, prediction, ...);
    validated: the sender vouches that read_plan accepts it."""
    return encode("plan", schema_version=WIRE_VERSION, iteration=iteration, validated=validated,
                  hash=plan.content_hash, table=plan.table.to_json(),
                  execution=plan.execution.to_json(),
                  microbatches=[list(mb.sample_ids) for mb in plan.batch.microbatches],
                  members=plan.members, dtype=plan.dtype, tp=plan.tp,
                  sequence_parallel=plan.sequence_parallel,
                  memory=[list(c) for c in plan.memory], info=info)


def read_plan(message: dict[str, Any], batch: GlobalBatch, layout: Layout, dtype: str,
              tp: int, sequence_parallel: bool = False, validated: bool = False
              ) -> IterationPlan:
    """The checked IterationPlan of a plan message for `batch` (see the module note).
    validated: the worker ran this same check on the message it sent (the parent then
    skips the table and execution-plan checks, the costly part, and keeps the rest)."""
    try:
        if message.get("schema_version") != WIRE_VERSION:
            raise ValueError(f"schema_version {message.get('schema_version')!r}, "
                             f"expected {WIRE_VERSION}")
        table = ScheduleTable.from_json(message["table"])
        execution = ExecutionPlan.from_json(message["execution"])
        ids = [[int(i) for i in mb] for mb in message["microbatches"]]
        members = {str(module): tuple(tuple(tuple(int(i) for i in sub) for sub in per_mb)
                                      for per_mb in subs)
                   for module, subs in message["members"].items()}
        memory = tuple(tuple(int(x) for x in c) for c in message.get("memory", []))
        if any(len(c) != 5 or min(c) < 0 for c in memory):
            raise ValueError("memory: entries are [stage, microbatch, sub, recompute, offload]")
        sent_hash = str(message["hash"])
        got_dtype, got_tp = str(message["dtype"]), int(message["tp"])
        got_sp = message.get("sequence_parallel", False)
        if not isinstance(got_sp, bool):
            raise ValueError(f"sequence_parallel {got_sp!r} is not a boolean")
    except (KeyError, TypeError, ValueError, AttributeError, ScheduleFormatError,
            PlanFormatError) as exc:
        raise InvalidPlan(f"unreadable: {_first_line(exc)}") from None
    check_samples(ids, batch)
    if table.num_microbatches != len(batch.microbatches):
        raise InvalidPlan(f"the table has {table.num_microbatches} microbatches, the batch "
                          f"{len(batch.microbatches)}")
    if table.layout != layout:
        raise InvalidPlan("the table's layout is not the run's")
    sequence_parallel = sequence_parallel and tp > 1
    if (got_dtype, got_tp, got_sp) != (dtype, tp, sequence_parallel):
        raise InvalidPlan(f"dtype {got_dtype} tp {got_tp} sequence_parallel {got_sp}, expected "
                          f"dtype {dtype} tp {tp} sequence_parallel {sequence_parallel}")
    _check_members(members, table)
    for stage, m, sub, _, _ in memory:
        if stage >= table.layout.num_stages or m >= table.num_microbatches \
                or sub >= table.subs(stage, m):
            raise InvalidPlan(f"memory: no forward ({stage}, {m}, {sub}) in the table")
    try:
        if not validated:
            validate(table)
            check_plan(execution, table)
    except (ScheduleValidationError, PlanCheckError) as exc:
        raise InvalidPlan(_first_line(exc)) from None
    plan = IterationPlan(table=table, execution=execution, batch=batch, members=members,
                         dtype=dtype, tp=tp, memory=memory, sequence_parallel=sequence_parallel)
    if plan.content_hash != sent_hash:
        raise InvalidPlan(f"hash mismatch: sent {sent_hash[:12]}, "
                          f"content {plan.content_hash[:12]}")
    return plan


def check_samples(ids: list[list[int]], batch: GlobalBatch) -> None:
    """Every sample of the batch exactly once, in the batch's microbatches."""
    want = Counter(batch.sample_ids)
    got = Counter(i for mb in ids for i in mb)
    missing = sorted(set(want) - set(got))
    unknown = sorted(set(got) - set(want))
    twice = sorted(i for i, n in got.items() if n > want.get(i, 0) and i in want)
    if missing or unknown or twice:
        parts = [f"{label} {values[:8]}" for label, values in
                 (("missing samples", missing), ("unknown samples", unknown),
                  ("repeated samples", twice)) if values]
        raise InvalidPlan("; ".join(parts))
    for m, (mine, theirs) in enumerate(zip(ids, batch.microbatches)):
        if tuple(mine) != theirs.sample_ids:
            raise InvalidPlan(f"microbatch {m} holds samples {mine[:8]}, the batch's "
                              f"{list(theirs.sample_ids[:8])}")
    if len(ids) != len(batch.microbatches):
        raise InvalidPlan(f"{len(ids)} microbatches, the batch has {len(batch.microbatches)}")


def _check_members(members: dict[str, tuple], table: ScheduleTable) -> None:
    for module, per_mb in members.items():
        if len(per_mb) != table.num_microbatches:
            raise InvalidPlan(f"members of {module}: {len(per_mb)} microbatches, the table "
                              f"{table.num_microbatches}")
        for m, subs in enumerate(per_mb):
            if len(subs) != table.module_subs(module, m):
                raise InvalidPlan(f"members of {module}, microbatch {m}: {len(subs)} "
                                  f"sub-microbatches, the table {table.module_subs(module, m)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
