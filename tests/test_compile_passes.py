"""compile_table's named passes, each with computes in and its exact output (Megatron's
1F1B at PP 2 with 3 microbatches: rank 0 runs 0F0 0F1 0B0 0F2 0B1 0B2, rank 1 1F0 1B0
1F1 1B1 1F2 1B2; a slot t is the gap before a rank's compute t), and the golden plans
of tests/golden/compile/ (python tests/golden/make_compile_golden.py rewrites them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_ir import ONE_F_ONE_B_P2_M3, lm_layout, table_of

from pipeweaver_megatron.ir.messages import TensorSpec
from pipeweaver_megatron.planner.compile import (compile_table, emit_pass, messages_pass,
                                                 receives_pass, wait_sends_pass)

GOLDEN = Path(__file__).with_name("golden")


def shapes(src, dst, m, k):
    return (TensorSpec("hidden", (4, 1, 8), "float32"),)


@pytest.fixture
def table():
    return table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3)


def test_messages_pass_lists_every_message_in_send_order_with_its_channel_position(table):
    found = messages_pass(table, shapes)
    got = [(m.kind.name, str(f.sender), [str(c) for c in f.consumers], m.seq)
           for f, m in zip(found.flows, found.messages)]
    assert got == [("ACTIVATION", "0F0", ["1F0"], 0), ("ACTIVATION", "0F1", ["1F1"], 1),
                   ("ACTIVATION", "0F2", ["1F2"], 2), ("GRADIENT", "1B0", ["0B0"], 0),
                   ("GRADIENT", "1B1", ["0B1"], 1), ("GRADIENT", "1B2", ["0B2"], 2)]
    assert {(s, d, k.name): ids for (s, d, k), ids in found.channels.items()} == {
        (0, 1, "ACTIVATION"): (0, 1, 2), (1, 0, "GRADIENT"): (3, 4, 5)}
    assert all(t.shape == (4, 1, 8) for m in found.messages for t in m.tensors)


@pytest.mark.parametrize("lookahead,rank0,rank1", [
    # per slot (sends, receives posted, receives waited); messages 0-2 activations
    # 0F0..0F2 -> 1F0..1F2, 3-5 gradients 1B0..1B2 -> 0B0..0B2
    (0, [((), (), ()), ((0,), (), ()), ((1,), (3,), (3,)), ((), (), ()),
         ((2,), (4,), (4,)), ((), (5,), (5,)), ((), (), ())],
        [((), (0,), (0,)), ((), (), ()), ((3,), (1,), (1,)), ((), (), ()),
         ((4,), (2,), (2,)), ((), (), ()), ((5,), (), ())]),
    (1, [((), (), ()), ((0,), (3,), ()), ((1,), (), (3,)), ((), (4,), ()),
         ((2,), (5,), (4,)), ((), (), (5,)), ((), (), ())],
        [((), (0,), (0,)), ((), (1,), ()), ((3,), (), (1,)), ((), (2,), ()),
         ((4,), (), (2,)), ((), (), ()), ((5,), (), ())]),
])
def test_receives_pass_posts_lookahead_computes_before_the_first_use(table, lookahead, rank0,
                                                                    rank1):
    slots = receives_pass(table, messages_pass(table, shapes), None, lookahead)
    assert [[(s.sends, s.recvs, s.waits) for s in rank] for rank in slots] == [rank0, rank1]
    assert all(not s.wait_sends for rank in slots for s in rank)


def test_wait_sends_pass_waits_once_the_receive_is_known_to_be_posted(table):
    found = messages_pass(table, shapes)
    slots = wait_sends_pass(table, found, receives_pass(table, found, None, 1), None)
    # 0F0's and 0F1's sends are awaited after 0B0 (its gradient proves rank 1 posted
    # both receives), 0F2's after 0B1; rank 1's last send waits at the rank's end
    assert [[s.wait_sends for s in rank] for rank in slots] == [
        [(), (), (), (0, 1), (), (2,), ()], [(), (), (), (3,), (), (4,), (5,)]]


def test_emit_pass_writes_the_exact_op_lists(table):
    found = messages_pass(table, shapes)
    plan = emit_pass(table, found, wait_sends_pass(table, found,
                                                   receives_pass(table, found, None, 1), None))
    assert [[str(op) for op in rank.ops] for rank in plan.ranks] == [
        ["Compute(0F0)", "Batch(Send(to 1, a[0F0->stage 1]#0), PostRecv(from 1, g[1B0->0F0]#0))",
         "Compute(0F1)", "Send(to 1, a[0F1->stage 1]#1)", "WaitRecv(g[1B0->0F0]#0)",
         "Compute(0B0)", "PostRecv(from 1, g[1B1->0F1]#1)", "WaitSend(a[0F0->stage 1]#0)",
         "WaitSend(a[0F1->stage 1]#1)", "Compute(0F2)",
         "Batch(Send(to 1, a[0F2->stage 1]#2), PostRecv(from 1, g[1B2->0F2]#2))",
         "WaitRecv(g[1B1->0F1]#1)", "Compute(0B1)", "WaitSend(a[0F2->stage 1]#2)",
         "WaitRecv(g[1B2->0F2]#2)", "Compute(0B2)"],
        ["PostRecv(from 0, a[0F0->stage 1]#0)", "WaitRecv(a[0F0->stage 1]#0)", "Compute(1F0)",
         "PostRecv(from 0, a[0F1->stage 1]#1)", "Compute(1B0)", "Send(to 0, g[1B0->0F0]#0)",
         "WaitRecv(a[0F1->stage 1]#1)", "Compute(1F1)", "PostRecv(from 0, a[0F2->stage 1]#2)",
         "WaitSend(g[1B0->0F0]#0)", "Compute(1B1)", "Send(to 0, g[1B1->0F1]#1)",
         "WaitRecv(a[0F2->stage 1]#2)", "Compute(1F2)", "WaitSend(g[1B1->0F1]#1)",
         "Compute(1B2)", "Send(to 0, g[1B2->0F2]#2)", "WaitSend(g[1B2->0F2]#2)"]]
    assert plan.content_hash == compile_table(table, shapes).content_hash


def test_the_golden_plans_are_unchanged():
    spec = importlib.util.spec_from_file_location("make_compile_golden",
                                                  GOLDEN / "make_compile_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = module.cases()
    assert len(cases) >= 4
    for name, text in cases.items():
        assert (GOLDEN / "compile" / f"{name}.txt").read_text() == text, name
