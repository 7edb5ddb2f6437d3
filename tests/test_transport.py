"""The runtime's transports on real processes: nccl-order (one communicator per channel,
one tag, no batching: what runs on NCCL) matches the single-process reference at PP 2
and PP 4, so the transport relies on no tag; the CUDA watchdog names a hung operation."""

from __future__ import annotations

import pytest
from test_runtime import check

from pipeweaver_megatron.ir.execplan import Kind
from pipeweaver_megatron.runtime.p2p import Watchdog, layout_channels
from pipeweaver_megatron.runtime.verify import build_plans, verify

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("model,pp", [("tiny-vlm", 2), ("tiny-t2v", 2), ("tiny-t2v", 4)])
def test_nccl_order_transport_matches_one_process(model, pp):
    check(verify(model, "pipeweaver", pp=pp, batches=1, seed=3, timeout_s=90,
                 transport="nccl-order"))


def test_a_silent_peer_under_nccl_order_ends_in_a_timeout_naming_rank_and_op():
    with pytest.raises(RuntimeError, match=r"rank 1, op \d+ \(WaitRecv\(a\[0F0->stage 1\]") as info:
        verify("tiny-vlm", "megatron-1f1b", pp=2, batches=1, timeout_s=4, fault="silent-peer",
               transport="nccl-order")
    assert "did not complete within 4 s" in str(info.value)


def test_layout_channels_are_the_cross_rank_edges_in_both_kinds():
    plans, _ = build_plans("tiny-vlm", "pipeweaver", 4, 1, 1, 0)
    layout = plans[0].table.layout
    channels = layout_channels(layout)
    edges = {(layout.stages[e.src].rank, layout.stages[e.dst].rank) for e in layout.edges}
    want = {(a, b, Kind.ACTIVATION) for a, b in edges if a != b} | \
           {(b, a, Kind.GRADIENT) for a, b in edges if a != b}
    assert set(channels) == want and len(channels) == len(want)
    # every message of the plan travels on one of them
    for rank_plan in plans[0].execution.ranks:
        for op in rank_plan.ops:
            for inner in getattr(op, "ops", (op,)):
                if type(inner).__name__ == "Send":
                    assert (rank_plan.rank, inner.peer, inner.message.kind) in want


class FakeWork:
    def __init__(self) -> None:
        self.done = False

    def is_completed(self) -> bool:
        return self.done


def test_watchdog_names_the_oldest_overdue_operation_and_forgets_completed_ones():
    hung: list[str] = []
    dog = Watchdog(rank=5, timeout_s=10, poll_s=3600, on_hang=hung.append)
    first, second = FakeWork(), FakeWork()
    dog.watch("recv of a[0F0->stage 1]#0", [first])
    dog.watch("send of g[1B0->0F0]#0", [second])
    began = dog._entries[0][0]
    assert dog.check(began + 5) is None
    first.done = True
    found = dog.check(began + 11)
    assert found is not None and found.startswith("rank 5: send of g[1B0->0F0]#0 did not "
                                                  "complete within 10 s")
    second.done = True
    assert dog.check(began + 100) is None and dog._entries == []


@pytest.mark.parametrize("model", ["tiny-vlm", "tiny-t2v"])
def test_bf16_runs_and_messages_in_bfloat16_within_the_measured_tolerance(model):
    """The chunks compute in bf16 with fp32 gradient sums; the plan's messages are bf16
    (the executor refuses a tensor of another dtype); the run stays within
    LOW_PRECISION_FACTOR times the one-process bf16 difference from fp32, which is
    itself well above the fp32 run's."""
    plans, _ = build_plans(model, "pipeweaver", 2, 1, 1, 5, dtype="bfloat16")
    specs = [t for p in plans[0].execution.ranks for op in p.ops
             for inner in getattr(op, "ops", (op,)) if hasattr(inner, "message")
             for t in inner.message.tensors]
    assert specs and all(str(t.dtype) == "bfloat16" for t in specs)
    result = verify(model, "pipeweaver", pp=2, batches=1, seed=5, timeout_s=90,
                    dtype="bfloat16")
    assert result.ok and result.dtype == "bfloat16", result
    assert result.tolerance > 1e-3  # a multiple of a real bf16 gap, not the fp32 one
    assert result.max_grad_diff > 1e-3  # it did compute in bf16
