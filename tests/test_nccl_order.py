"""The NCCL-order replay (planner/nccl_order.py): plans the compiler makes run under
NCCL's rules as the runtime issues them there (one communicator per channel, every
operation alone); the transports it must not use hang on plans that MPI semantics run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compile import (compile_and_check, fake_shapes, random_tables, small_plan, unbatched,
                          with_ops)

from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.planner.compile import PlanCheckError, _Checker, compile_table
from pipeweaver_megatron.ir.execplan import Batch, Kind, PostRecv, WaitRecv
from pipeweaver_megatron.planner.nccl_order import check_nccl_order
from pipeweaver_megatron.schedules import build_baseline


def mpi_check(plan, table) -> None:
    """check_plan's MPI-semantics part alone."""
    _Checker(plan, table).run()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_tables(), st.integers(0, 3))
def test_compiled_plans_run_under_nccl_order_per_channel_ungrouped(table, lookahead):
    plan = compile_and_check(table, lookahead=lookahead)
    check_nccl_order(plan, table, "per_channel", grouped=False)


def test_one_communicator_per_pair_hangs_1f1b_with_receives_posted_ahead():
    """What one process group with tags does on NCCL: a receive posted ahead queues on
    the pair's stream in front of a send the peer must match first."""
    table = build_baseline(load_model("tiny-vlm"), "megatron-1f1b", 4)
    plan = compile_table(table, fake_shapes, lookahead=1)
    mpi_check(plan, table)
    check_nccl_order(plan, table)  # per channel, ungrouped: runs
    for grouped in (False, True):
        with pytest.raises(PlanCheckError) as info:
            check_nccl_order(plan, table, "per_pair", grouped=grouped)
        text = str(info.value)
        assert "hangs under NCCL order (per_pair communicators" in text
        assert isinstance(info.value.op, WaitRecv) or "WaitSend" in str(info.value.op)
        assert f"rank {info.value.rank} op {info.value.index}" in text and "<-- ERROR HERE" in text
        assert "queued" in text


def test_grouped_receives_of_one_channel_hang_though_mpi_semantics_run_them():
    """Rank 1 posts all of its activation receives from rank 0 as one Batch at the first
    one's place: legal under MPI semantics (posts never block), but one NCCL group
    completes as a whole, so the first wait needs sends rank 0 makes only after
    gradients rank 1 computes later."""
    table, plan = small_plan()
    ops = unbatched(plan, 1)
    recvs = [op for op in ops if isinstance(op, PostRecv) and op.peer == 0
             and op.message.kind is Kind.ACTIVATION]
    first = ops.index(recvs[0])
    ops = [op for op in ops if op not in recvs]
    ops.insert(first, Batch(tuple(recvs)))
    grouped_plan = with_ops(plan, 1, ops)
    mpi_check(grouped_plan, table)
    check_nccl_order(grouped_plan, table, "per_channel", grouped=False)
    with pytest.raises(PlanCheckError) as info:
        check_nccl_order(grouped_plan, table, "per_channel", grouped=True)
    assert "hangs under NCCL order (per_channel communicators, Batches grouped)" in str(info.value)
    # rank 1's first wait is stuck on the group, for a later send of the same channel
    stuck = f"WaitRecv({recvs[0].message}): its group (op {first}) needs the send of "
    assert stuck in str(info.value)
    later = str(info.value).split(stuck)[1].split(" on rank 0")[0]
    assert later in {str(op.message) for op in recvs[1:]}


def test_a_plan_that_deadlocks_under_mpi_semantics_also_hangs_under_nccl_order():
    table, plan = small_plan()
    ops = unbatched(plan, 0)
    grad = next(op for op in ops if isinstance(op, PostRecv) and op.message.kind is Kind.GRADIENT)
    first_send = next(i for i, op in enumerate(ops) if op.__class__.__name__ == "Send")
    ops = [op for op in ops if op not in (grad, WaitRecv(grad.message))]
    ops[first_send:first_send] = [grad, WaitRecv(grad.message)]
    with pytest.raises(PlanCheckError) as info:
        check_nccl_order(with_ops(plan, 0, ops), table)
    assert (info.value.rank, info.value.index) == (0, first_send + 1)
    assert "not posted yet" in str(info.value)


def test_per_pair_matching_ignores_kind_and_names_the_mismatched_pair():
    """Under one communicator per pair, a receive pairs with the peer's next send of
    either kind. Posting a gradient receive before an activation receive from the same
    peer keeps every channel's order (MPI semantics run it) but pairs the gradient
    buffer with the activation the peer sends first."""
    table = build_baseline(load_model("tiny-vlm"), "megatron-interleaved", 4, pp=2)
    plan = compile_table(table, fake_shapes, lookahead=0)
    for rank in range(len(plan.ranks)):
        plan = with_ops(plan, rank, unbatched(plan, rank))
    ops = unbatched(plan, 1)
    gradient = lambda op: isinstance(op, PostRecv) and op.message.kind is Kind.GRADIENT  # noqa: E731
    i = next(i for i, op in enumerate(ops) if isinstance(op, PostRecv) and not gradient(op))
    j = next(j for j in range(i, len(ops)) if gradient(ops[j]))
    ops.insert(i, ops.pop(j))
    moved = with_ops(plan, 1, ops)
    mpi_check(moved, table)
    check_nccl_order(moved, table)  # per channel: kinds never meet
    with pytest.raises(PlanCheckError) as info:
        check_nccl_order(moved, table, "per_pair", grouped=False)
    assert (info.value.rank, info.value.index) == (1, i)
    assert "tags ignored) this pairs with a[" in str(info.value)  # the gradient buffer meets an activation
