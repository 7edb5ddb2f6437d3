"""Compiling schedule tables into per-rank execution plans: by construction every plan
runs (MPI-like check), pairs sends with receives, waits before use and posts receives
in the sender's order; the checker names the rank and op of a broken plan; JSON round
trips."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import (Action, Layout, ModuleInfo, Op, Part, ScheduleTable, Stage,
                                    dependencies, validate)
from pipeweaver_megatron.ir import random_order as ir_random_order
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings
from pipeweaver_megatron.planner.compile import (PlanCheckError, check_plan, compile_table,
                                                 table_flows)
from pipeweaver_megatron.ir.execplan import (Batch, Compute, ExecutionPlan, Kind,
                                                  PlanFormatError, PostRecv, RankPlan, Send,
                                                  WaitRecv, WaitSend, flat_ops, rank_plan_stats)
from pipeweaver_megatron.ir.messages import TensorSpec, stage_outputs
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import CostModel, batch_shapes, simulate
from pipeweaver_megatron.workload import TokenRules, sample_workload


def fake_shapes(src: int, dst: int, microbatch: int, sub: int) -> tuple[TensorSpec, ...]:
    """Distinct shapes per (src, microbatch, sub), so a mixed-up message shows."""
    tensors = (TensorSpec("hidden", (microbatch + 1, 1, 8 * (src + 1) + sub), "bfloat16"),)
    return tensors + ((TensorSpec("cond", (3, 1, 4), "float32"),) if src % 2 else ())


# ---- independent checks of a compiled plan ---------------------------------------------


def assert_plan_properties(plan: ExecutionPlan, table: ScheduleTable, shapes=fake_shapes) -> None:
    """What the compiler promises, checked without check_plan."""
    rank_of = [s.rank for s in table.layout.stages]
    sends, recvs = {}, {}
    for rank_plan in plan.ranks:
        for i, j, op in flat_ops(rank_plan.ops):
            if j is not None:
                assert isinstance(op, (Send, PostRecv))
            if isinstance(op, Send):
                assert op.message not in sends
                sends[op.message] = (rank_plan.rank, op.peer)
            elif isinstance(op, PostRecv):
                assert op.message not in recvs
                recvs[op.message] = (op.peer, rank_plan.rank)
    # every Send has exactly one PostRecv of the same message (same tensors) on the peer
    assert sends == recvs
    # the tensors are the ones shapes_of gives, the channel ends are the stages' ranks
    for message, (src, dst) in sends.items():
        p = message.producer
        assert message.tensors == shapes(p.stage, message.consumer_stage, p.microbatch, p.sub)
        assert src == rank_of[message.sender.stage] and dst == rank_of[message.receiver_stage]
        assert src != dst
    for rank_plan in plan.ranks:
        rank = rank_plan.rank
        ops = [op for _, _, op in flat_ops(rank_plan.ops)]
        computes = [op.action for op in ops if isinstance(op, Compute)]
        assert computes == list(table.ranks[rank])
        waited_recv, waited_send, done = set(), set(), set()
        posted: dict = {}
        for op in ops:
            if isinstance(op, Compute):
                for dep in dependencies(table, op.action):
                    if rank_of[dep.stage] != rank:  # a cross-rank input was waited for
                        assert any(m.sender == dep and op.action.stage in
                                   (m.consumer_stage, m.producer.stage) for m in waited_recv), \
                            (rank, op, dep)
                done.add(op.action)
            elif isinstance(op, PostRecv):
                posted.setdefault((op.peer, op.message.kind), []).append(op.message)
            elif isinstance(op, Send):
                assert op.message.sender in done  # sent after its compute
            elif isinstance(op, WaitRecv):
                waited_recv.add(op.message)
            elif isinstance(op, WaitSend):
                assert op.message in sends and op.message not in waited_send
                waited_send.add(op.message)
        assert waited_recv == {m for m, (_, dst) in recvs.items() if dst == rank}
        assert waited_send == {m for m, (src, _) in sends.items() if src == rank}
        # per channel, receives are posted in the order the sender sends them
        for (peer, kind), got in posted.items():
            sender_order = [op.message for _, _, op in flat_ops(plan.ranks[peer].ops)
                            if isinstance(op, Send) and op.peer == rank
                            and op.message.kind == kind]
            assert got == sender_order
            assert [m.seq for m in got] == list(range(len(got)))


def compile_and_check(table: ScheduleTable, shapes=fake_shapes, **kwargs) -> ExecutionPlan:
    plan = compile_table(table, shapes, **kwargs)
    check_plan(plan, table)
    assert_plan_properties(plan, table, shapes)
    assert ExecutionPlan.from_json(plan.to_json()) == plan
    return plan


# ---- random valid tables ---------------------------------------------------------------


def random_order(table: ScheduleTable, seed: int) -> ScheduleTable:
    """A random valid order of the table's actions (keeps the sub-microbatch counts)."""
    return ir_random_order(table, random.Random(seed))


@st.composite
def random_tables(draw) -> ScheduleTable:
    """Encoder -> LM (-> generator) layouts with random stage cuts, random stage->rank
    maps (same-rank edges included), random sub-microbatch counts (0 for text-only
    microbatches, several on both sides of gathering edges) and a random order."""
    num_ranks = draw(st.sampled_from([1, 2, 3, 3, 4, 4]))
    names = ["vision", "lm"] + (["dit"] if draw(st.booleans()) else [])
    modules = tuple(ModuleInfo(n, draw(st.integers(1, 4)), (names[i - 1],) if i else ())
                    for i, n in enumerate(names))
    stages = []
    for module in modules:
        cuts = sorted(draw(st.sets(st.integers(1, module.num_layers - 1)))) \
            if module.num_layers > 1 else []
        bounds = [0] + cuts + [module.num_layers]
        for a, b in zip(bounds, bounds[1:]):
            stages.append(Stage(len(stages), draw(st.integers(0, num_ranks - 1)),
                                (Part(module.name, a, b),)))
    layout = Layout(num_ranks, modules, tuple(stages))
    m = draw(st.integers(1, 4))
    subs = tuple((n, tuple(draw(st.lists(st.integers(lo, 3), min_size=m, max_size=m))))
                 for n, lo in (("vision", 0), ("lm", 1), ("dit", 0)) if n in names)
    actions = [Action(op, s.index, mb, k) for s in stages for mb in range(m)
               for k in range(dict(subs)[s.parts[0].module][mb]) for op in Op]
    by_rank: list[list] = [[] for _ in range(num_ranks)]
    for a in actions:
        by_rank[stages[a.stage].rank].append(a)
    table = ScheduleTable(layout=layout, num_microbatches=m, ranks=tuple(map(tuple, by_rank)),
                          sub_microbatches=subs)
    return random_order(table, draw(st.integers(0, 2**16)))


@settings(max_examples=200, deadline=None)
@given(random_tables(), st.integers(0, 3))
def test_random_valid_tables_compile_to_plans_that_run(table, lookahead):
    validate(table)
    plan = compile_and_check(table, lookahead=lookahead)
    flows = table_flows(table)
    stats = rank_plan_stats(plan)
    assert sum(s.send for s in stats) == sum(s.post_recv for s in stats) == len(flows)
    for s in stats:
        assert s.forward + s.backward == len(table.ranks[s.rank])


def test_gathering_edges_send_one_message_per_sub_and_gradients_per_consumer_sub():
    # vision (2 subs) on rank 0 feeds the LM on rank 1; the LM feeds a DiT with 3 subs on
    # rank 0: 2 activations into the LM, 3 gradients back into its output.
    modules = (ModuleInfo("vision", 1), ModuleInfo("lm", 1, ("vision",)),
               ModuleInfo("dit", 1, ("lm",)))
    layout = Layout(2, modules, (Stage(0, 0, (Part("vision", 0, 1),)),
                                 Stage(1, 1, (Part("lm", 0, 1),)),
                                 Stage(2, 0, (Part("dit", 0, 1),))))
    order = "0F0 0F0.1 2F0 2F0.1 2F0.2 2B0.2 2B0 2B0.1 0B0.1 0B0|1F0 1B0"
    table = ScheduleTable(layout=layout, num_microbatches=1,
                          ranks=tuple(tuple(map(Action.from_str, r.split()))
                                      for r in order.split("|")),
                          sub_microbatches=(("vision", (2,)), ("dit", (3,))))
    plan = compile_and_check(table, lookahead=0)
    lm = [op for _, _, op in flat_ops(plan.ranks[1].ops)]
    got = [(type(op).__name__, str(op.message)) for op in lm if not isinstance(op, Compute)]
    assert got[:4] == [("PostRecv", "a[0F0->stage 1]#0"), ("PostRecv", "a[0F0.1->stage 1]#1"),
                       ("WaitRecv", "a[0F0->stage 1]#0"), ("WaitRecv", "a[0F0.1->stage 1]#1")]
    grads = [op.message for op in lm if isinstance(op, WaitRecv) and op.message.kind is Kind.GRADIENT]
    assert [str(m.sender) for m in grads] == ["2B0.2", "2B0", "2B0.1"]  # rank 0's send order
    assert {m.producer for m in grads} == {Action(Op.F, 1, 0)}
    sent = [op.message for op in lm if isinstance(op, Send)]
    # one activation for all 3 DiT subs; one gradient per vision sub
    assert [(m.kind, m.producer, m.consumer_stage) for m in sent] == [
        (Kind.ACTIVATION, Action(Op.F, 1, 0), 2), (Kind.GRADIENT, Action(Op.F, 0, 0, 0), 1),
        (Kind.GRADIENT, Action(Op.F, 0, 0, 1), 1)]


def test_text_only_microbatch_and_same_rank_edges_send_nothing():
    modules = (ModuleInfo("vision", 1), ModuleInfo("lm", 2, ("vision",)))
    layout = Layout(2, modules, (Stage(0, 0, (Part("vision", 0, 1),)),
                                 Stage(1, 0, (Part("lm", 0, 1),)),
                                 Stage(2, 1, (Part("lm", 1, 2),))))
    table = ScheduleTable(layout=layout, num_microbatches=2,
                          ranks=(tuple(map(Action.from_str, "0F0 1F0 1F1 1B0 0B0 1B1".split())),
                                 tuple(map(Action.from_str, "2F0 2B0 2F1 2B1".split()))),
                          sub_microbatches=(("vision", (1, 0)),))
    plan = compile_and_check(table)
    messages = {op.message for p in plan.ranks for _, _, op in flat_ops(p.ops)
                if isinstance(op, Send)}
    assert {(m.kind, m.producer.stage) for m in messages} == {(Kind.ACTIVATION, 1),
                                                              (Kind.GRADIENT, 1)}
    assert len(messages) == 4


def test_timeline_posts_receives_earlier_and_lookahead_zero_posts_as_late_as_possible():
    model = load_model("tiny-vlm")
    costs = CostModel(model, get_hardware(model.hardware))
    batch = sample_workload(model, None, 1, 0)[0]
    table = build_baseline(model, "megatron-interleaved", len(batch.microbatches))
    timeline = simulate(costs, table, batch_shapes(model, batch, TokenRules.from_model(model)))
    late = compile_and_check(table, lookahead=0)
    timed = compile_and_check(table, timeline=timeline, lookahead=0)

    def post_positions(plan):
        out = {}
        for rank_plan in plan.ranks:
            computes = 0
            for _, _, op in flat_ops(rank_plan.ops):
                computes += isinstance(op, Compute)
                if isinstance(op, PostRecv):
                    out[op.message] = computes  # computes run before the post
        return out

    late_at, timed_at = post_positions(late), post_positions(timed)
    assert late_at.keys() == timed_at.keys()
    assert all(timed_at[m] <= late_at[m] for m in late_at)
    assert any(timed_at[m] < late_at[m] for m in late_at)
    # lookahead 0: a receive is posted in the slot of the first compute that consumes it
    # or a later message of its channel (the sender's order forces the earlier ones)
    for rank_plan in late.ranks:
        slot, posted, consumed = 0, [], []
        for _, _, op in list(flat_ops(rank_plan.ops)) + [(0, None, Compute(None))]:
            if isinstance(op, PostRecv):
                posted.append(op.message)
            elif isinstance(op, WaitRecv):
                consumed.append(op.message)
            elif isinstance(op, Compute):
                for m in posted:
                    assert any(c.kind == m.kind and rank_of(table, c) == rank_of(table, m)
                               and c.seq >= m.seq for c in consumed), (slot, m)
                slot, posted, consumed = slot + 1, [], []


def rank_of(table: ScheduleTable, message) -> int:
    """The sending rank of a message."""
    return table.layout.stages[message.sender.stage].rank


def test_with_timeline_wait_sends_come_after_the_predicted_transfer():
    model = load_model("tiny-vlm")
    costs = CostModel(model, get_hardware(model.hardware))
    batch = sample_workload(model, None, 1, 1)[0]
    table = build_baseline(model, "megatron-1f1b", len(batch.microbatches))
    timeline = simulate(costs, table, batch_shapes(model, batch, TokenRules.from_model(model)))
    plan = compile_and_check(table, timeline=timeline)
    ends = {a: e for acts, es in zip(timeline.actions, timeline.ends) for a, e in zip(acts, es)}
    arrival = {t.producer: t.end for t in timeline.transfers}
    for rank_plan in plan.ranks:
        last = None
        for _, _, op in flat_ops(rank_plan.ops):
            if isinstance(op, Compute):
                last = op.action
            elif isinstance(op, WaitSend):
                if last == table.ranks[rank_plan.rank][-1]:
                    continue  # the rank's end: every WaitSend left
                assert last != op.message.sender  # at least one compute after the send
                assert ends[last] >= arrival[op.message.sender]


@pytest.mark.parametrize("name", ["tiny-vlm", "vlm-s"])
@pytest.mark.parametrize("baseline", ["megatron-1f1b", "megatron-interleaved"])
def test_megatron_baselines_with_real_message_shapes(name, baseline):
    model = load_model(name)
    costs = CostModel(model, get_hardware(model.hardware))
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, None, 1, 0)[0]
    table = build_baseline(model, baseline, len(batch.microbatches))
    par = model.parallel

    def shapes(src, dst, m, sub):
        return stage_outputs(model, table.layout, src, batch.microbatches[m], None, rules,
                             "bfloat16", par.tp, par.sequence_parallel)

    timeline = simulate(costs, table, batch_shapes(model, batch, rules))
    plan = compile_and_check(table, shapes, timeline=timeline)
    first = next(op for _, _, op in flat_ops(plan.ranks[0].ops) if isinstance(op, Send))
    assert first.message.tensors[0].name == "hidden"
    # same-rank tables (pp=1) have no P2P at all
    single = build_baseline(model, "megatron-1f1b", 2, pp=1)
    assert all(isinstance(op, Compute) for op in compile_and_check(single, shapes).ranks[0].ops)


PLANNERS = {}


def planner(name: str) -> PipeWeaverPlanner:
    if name not in PLANNERS:
        model = load_model(name)
        PLANNERS[name] = PipeWeaverPlanner(CostModel(model, get_hardware(model.hardware)),
                                           settings=SearchSettings(max_evaluations=3))
    return PLANNERS[name]


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["tiny-vlm", "vlm-s", "tiny-t2v"]), st.integers(0, 1000),
       st.booleans(), st.integers(0, 9))
def test_pipeweaver_plans_compile_with_real_shapes_and_reorderings(name, seed, timed, reorder):
    pw = planner(name)
    model, rules = pw.model, pw.rules
    batch = sample_workload(model, None, 1, seed)[0]
    result = pw.plan(batch, 60_000, seed)
    table, subs = result.table, result.sub_microbatches
    par = model.parallel

    def shapes(src, dst, m, sub):
        module = table.layout.stages[src].parts[0].module
        members = subs.members[module][m][sub] if table.subs(src, m) > 1 else None
        return stage_outputs(model, table.layout, src, batch.microbatches[m], members, rules,
                             "bfloat16", par.tp, par.sequence_parallel)

    compile_and_check(table, shapes, timeline=result.simulation if timed else None)
    # the same sub-microbatches (gathering edges) in a random order, with its timeline
    shuffled = random_order(table, reorder)
    timeline = simulate(pw.costs, shuffled, subs.shapes, priced=result.memory.priced)
    compile_and_check(shuffled, shapes, timeline=timeline if timed else None, lookahead=0)


# ---- the checker on broken plans -------------------------------------------------------


def small_plan() -> tuple[ScheduleTable, ExecutionPlan]:
    model = load_model("tiny-vlm")
    table = build_baseline(model, "megatron-interleaved", 4)
    return table, compile_table(table, fake_shapes, lookahead=2)


def unbatched(plan: ExecutionPlan, rank: int) -> list:
    return [op for _, _, op in flat_ops(plan.ranks[rank].ops)]


def with_ops(plan: ExecutionPlan, rank: int, ops: list) -> ExecutionPlan:
    ranks = list(plan.ranks)
    ranks[rank] = RankPlan(rank, tuple(ops))
    return replace(plan, ranks=tuple(ranks))


def test_unbatched_plan_still_checks():
    table, plan = small_plan()
    for rank in range(len(plan.ranks)):
        plan = with_ops(plan, rank, unbatched(plan, rank))
    check_plan(plan, table)


def test_swapped_receives_of_one_channel_fail_naming_rank_and_op():
    table, plan = small_plan()
    ops = unbatched(plan, 1)
    recvs = [i for i, op in enumerate(ops) if isinstance(op, PostRecv)
             and op.peer == 0 and op.message.kind is Kind.ACTIVATION]
    a, b = recvs[0], recvs[1]
    ops[a], ops[b] = ops[b], ops[a]
    with pytest.raises(PlanCheckError) as info:
        check_plan(with_ops(plan, 1, ops), table)
    assert (info.value.rank, info.value.index) == (1, a)
    assert f"rank 1 op {a}" in str(info.value) and "out of the sender's order" in str(info.value)
    assert "<-- ERROR HERE" in str(info.value)


def test_dropped_send_fails_as_a_receive_never_sent():
    table, plan = small_plan()
    ops = unbatched(plan, 0)
    drop = next(op for op in ops if isinstance(op, Send))
    ops = [op for op in ops if op != drop and op != WaitSend(drop.message)]
    with pytest.raises(PlanCheckError) as info:
        check_plan(with_ops(plan, 0, ops), table)
    assert info.value.rank == drop.peer
    assert info.value.op == PostRecv(0, drop.message)
    assert "receive never sent" in str(info.value)
    assert info.value.index == next(i for i, _, op in flat_ops(plan.ranks[drop.peer].ops)
                                    if op == PostRecv(0, drop.message))


def test_changed_shape_fails_as_a_mismatched_pair():
    table, plan = small_plan()
    ops = unbatched(plan, 2)
    k = next(i for i, op in enumerate(ops) if isinstance(op, PostRecv))
    message = ops[k].message
    bad = TensorSpec(message.tensors[0].name, (999,) + message.tensors[0].shape[1:],
                     message.tensors[0].dtype)
    changed = replace(message, tensors=(bad,) + message.tensors[1:])
    ops = [PostRecv(op.peer, changed) if op == ops[k] else
           WaitRecv(changed) if op == WaitRecv(message) else op for op in ops]
    with pytest.raises(PlanCheckError) as info:
        check_plan(with_ops(plan, 2, ops), table)
    assert (info.value.rank, info.value.index) == (2, k)
    assert "mismatched pair" in str(info.value) and "tensors differ" in str(info.value)
    assert "999" in str(info.value)


def test_deadlock_names_the_blocked_ranks_and_ops():
    table, plan = small_plan()
    ops = unbatched(plan, 0)
    # rank 0 waits for its first gradient before sending its first activation
    grad = next(op for op in ops if isinstance(op, PostRecv) and op.message.kind is Kind.GRADIENT)
    first_send = next(i for i, op in enumerate(ops) if isinstance(op, Send))
    ops = [op for op in ops if op not in (grad, WaitRecv(grad.message))]
    ops[first_send:first_send] = [grad, WaitRecv(grad.message)]
    with pytest.raises(PlanCheckError) as info:
        check_plan(with_ops(plan, 0, ops), table)
    assert (info.value.rank, info.value.index) == (0, first_send + 1)
    assert "deadlock" in str(info.value) and "also blocked: rank 1" in str(info.value)


def test_compute_before_its_input_is_waited_for_fails():
    table, plan = small_plan()
    ops = unbatched(plan, 1)
    k = next(i for i, op in enumerate(ops) if isinstance(op, WaitRecv))
    consumer = next(i for i in range(k, len(ops)) if isinstance(ops[i], Compute))
    ops.insert(consumer + 1, ops.pop(k))
    with pytest.raises(PlanCheckError) as info:
        check_plan(with_ops(plan, 1, ops), table)
    assert (info.value.rank, info.value.index) == (1, consumer - 1)
    assert "not waited for" in str(info.value)


def test_plan_for_another_table_is_rejected():
    table, plan = small_plan()
    other = build_baseline(load_model("tiny-vlm"), "megatron-interleaved", 8)
    with pytest.raises(PlanCheckError, match="another table"):
        check_plan(plan, other)


# ---- serialization ---------------------------------------------------------------------


def test_json_round_trip_compact_form_and_stable_hash():
    table, plan = small_plan()
    data = plan.to_json()
    assert data["schema_version"] == 1 and data["table_hash"] == table.content_hash
    assert all(isinstance(op, (str, list)) for ops in data["ranks"] for op in ops)
    kinds = {op.split(":")[0][:1] for ops in data["ranks"] for op in ops if isinstance(op, str)}
    assert kinds == {"C", "S", "R", "W"}
    assert {m[0] for m in data["messages"]} == {"ACTIVATION", "GRADIENT"}
    again = ExecutionPlan.loads(plan.dumps())
    assert again == plan and again.content_hash == plan.content_hash
    assert compile_table(table, fake_shapes, lookahead=2).content_hash == plan.content_hash
    assert compile_table(table, fake_shapes, lookahead=0).content_hash != plan.content_hash


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(schema_version=2), "schema_version: 2 is not supported"),
    (lambda d: d["ranks"][0].__setitem__(0, "X:1"), "ranks[0][0]: 'X:1' is not an op"),
    (lambda d: d["ranks"][0].append("WS:g99999"), "no message"),
    (lambda d: d["messages"][0].__setitem__(0, "DATA"), "messages[0].kind"),
    (lambda d: d.pop("table_hash"), "table_hash: missing"),
])
def test_malformed_plan_json_names_the_key(edit, message):
    _, plan = small_plan()
    data = plan.to_json()
    edit(data)
    with pytest.raises(PlanFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ExecutionPlan.from_json(data)


def test_rank_plan_stats_count_ops_by_kind():
    table, plan = small_plan()
    for stats, rank_plan in zip(rank_plan_stats(plan), plan.ranks):
        ops = [op for _, _, op in flat_ops(rank_plan.ops)]
        assert stats.forward == sum(a.op is Op.F for a in table.ranks[stats.rank])
        assert stats.send == stats.wait_send == sum(isinstance(op, Send) for op in ops)
        assert stats.post_recv == stats.wait_recv == sum(isinstance(op, PostRecv) for op in ops)
        assert stats.batches == sum(isinstance(op, Batch) for op in rank_plan.ops)
        assert set(stats.to_dict()) >= {"rank", "forward", "send", "batches"}


def test_compile_rejects_invalid_tables_foreign_timelines_and_empty_messages():
    table, _ = small_plan()
    broken = replace(table, ranks=(table.ranks[0][1:] + table.ranks[0][:1],) + table.ranks[1:])
    with pytest.raises(ValueError, match="needs|deadlock"):
        compile_table(broken, fake_shapes)
    model = load_model("tiny-vlm")
    batch = sample_workload(model, None, 1, 0)[0]
    other = build_baseline(model, "megatron-1f1b", len(batch.microbatches))
    timeline = simulate(CostModel(model, get_hardware(model.hardware)), other,
                        batch_shapes(model, batch, TokenRules.from_model(model)))
    with pytest.raises(ValueError, match="not a detailed simulation of this table"):
        compile_table(build_baseline(model, "megatron-interleaved", len(batch.microbatches)),
                      fake_shapes, timeline=timeline)
    with pytest.raises(ValueError, match="no tensors"):
        compile_table(table, lambda *args: ())
    with pytest.raises(ValueError, match="lookahead"):
        compile_table(table, fake_shapes, lookahead=-1)
