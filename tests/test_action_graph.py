"""The action graph (ir/graph.py): hand-checked dependencies and messages of a small
modality-aware table, consistency of its two views (dependencies and messages) on
baseline and PipeWeaver tables, and the differential against the golden outputs of the
planning side from before the graph (tests/golden/make_differential.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_ir import SUB_SCHEDULE, SUBS, table_of, vlm_layout

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Action, required_actions
from pipeweaver_megatron.ir.execplan import Kind
from pipeweaver_megatron.ir.graph import EdgeKind, action_graph, table_flows
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings, partition
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import CostModel
from pipeweaver_megatron.workload import sample_workload

GOLDEN = Path(__file__).with_name("golden")
A = Action.from_str


def test_a_small_tables_dependencies_are_the_hand_derived_ones():
    """vision (2 subs in microbatch 0, none in 1) on stages 0-1 (+ projector on 1), the LM
    on stages 2-3; ranks 0, 1, 0, 1."""
    graph = action_graph(table_of(vlm_layout(), SUB_SCHEDULE, 2, SUBS))
    want = {  # consumer: its producers, in order (own forward first for a backward)
        "1F0.1": ["0F0.1"],                     # aligned inside the vision module
        "2F0": ["1F0", "1F0.1"],                # the LM gathers every vision sub
        "2F1": [],                              # text-only microbatch: no vision work
        "3F1": ["2F1"],
        "2B0": ["2F0", "3B0"],
        "1B0.1": ["1F0.1", "2B0"],              # every LM sub read vision sub 1
        "0B0": ["0F0", "1B0"],
        "3B1": ["3F1"],
    }
    for consumer, producers in want.items():
        assert graph.inputs(A(consumer)) == [A(p) for p in producers], consumer
    kinds = {(str(graph.actions[d.producer]), str(graph.actions[d.consumer])): d.kind
             for d in graph.dependencies}
    assert kinds[("1F0", "2F0")] is EdgeKind.GATHERING
    assert kinds[("0F0.1", "1F0.1")] is EdgeKind.ALIGNED
    assert kinds[("2F0", "2B0")] is EdgeKind.OWN_FORWARD
    assert graph.rank[graph.id(A("3F0"))] == 1 and A("0F1") not in graph


def test_a_small_tables_messages_are_the_hand_derived_ones():
    table = table_of(vlm_layout(), SUB_SCHEDULE, 2, SUBS)
    flows = table_flows(table)
    got = [(f.id.kind.name, str(f.sender), [str(c) for c in f.consumers], f.src, f.dst)
           for f in flows]
    assert got == [  # rank 0 in its order, then rank 1
        ("ACTIVATION", "0F0", ["1F0"], 0, 1),
        ("ACTIVATION", "0F0.1", ["1F0.1"], 0, 1),
        ("ACTIVATION", "2F0", ["3F0"], 0, 1),
        ("ACTIVATION", "2F1", ["3F1"], 0, 1),
        ("GRADIENT", "2B0", ["1B0"], 0, 1),     # one gradient per vision sub the LM read
        ("GRADIENT", "2B0", ["1B0.1"], 0, 1),
        ("ACTIVATION", "1F0", ["2F0"], 1, 0),
        ("ACTIVATION", "1F0.1", ["2F0"], 1, 0),
        ("GRADIENT", "3B0", ["2B0"], 1, 0),
        ("GRADIENT", "3B1", ["2B1"], 1, 0),
        ("GRADIENT", "1B0", ["0B0"], 1, 0),
        ("GRADIENT", "1B0.1", ["0B0.1"], 1, 0),
    ]
    assert flows[4].id.producer == A("1F0") and flows[4].id.consumer_sub == 0


def tables():
    for name, pp in (("tiny-vlm", 2), ("tiny-vlm", 4), ("tiny-t2v", 4)):
        model = load_model(name)
        batches = sample_workload(model, model.dataset, 3, 5)
        for schedule in ("megatron-1f1b", "megatron-interleaved"):
            yield build_baseline(model, schedule, len(batches[0].microbatches), pp=pp,
                                 vp=model.parallel.vp if "interleaved" in schedule else 1)
        costs = CostModel(model, get_hardware(model.hardware))
        planner = PipeWeaverPlanner(costs, partition(costs, num_ranks=pp, reference=batches[0]),
                                    SearchSettings(max_evaluations=4))
        for i, batch in enumerate(batches):
            yield planner.plan(batch, 60_000, i).table


@pytest.mark.parametrize("table", list(tables()), ids=lambda t: t.name or "table")
def test_dependencies_and_messages_are_two_views_of_one_graph(table):
    graph = action_graph(table)
    assert set(graph.actions) == set(required_actions(table))
    assert sorted(graph.actions) == sorted(a for _, _, a in table.actions())
    for action, rank in zip(graph.actions, graph.rank):
        assert table.layout.stages[action.stage].rank == rank
    carried = {}
    for dep in graph.dependencies:
        assert dep.cross_rank == (graph.rank[dep.producer] != graph.rank[dep.consumer])
        assert (dep.message is not None) == dep.cross_rank
        if dep.message is not None:
            carried.setdefault(dep.message.key, set()).add(graph.actions[dep.consumer])
    flows = table_flows(table)
    assert len({f.key for f in flows}) == len(flows) == len(graph.messages)
    # every cross-rank dependency travels in exactly the message that names it, and each
    # message reaches exactly the consumers that depend on it
    assert {f.key for f in flows} == set(carried)
    for flow in flows:
        assert set(flow.consumers) == carried[flow.key]
        assert flow.src == graph.rank[graph.id(flow.sender)]
        assert all(graph.rank[graph.id(c)] == flow.dst for c in flow.consumers)
        if flow.id.kind is Kind.ACTIVATION:
            assert flow.sender == flow.id.producer
        else:
            assert flow.sender.stage == flow.id.consumer_stage
    assert action_graph(table) is graph  # built once per layout and split


def test_the_planning_side_is_unchanged_on_320_random_batches():
    """Tables, execution plans, iteration plans and SEMU's predictions of 320 random
    batches (PipeWeaver and both Megatron baselines) are those recorded before the graph
    replaced the per-module derivations (regenerate: tests/golden/make_differential.py)."""
    spec = importlib.util.spec_from_file_location("make_differential",
                                                  GOLDEN / "make_differential.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    want = json.loads((GOLDEN / "differential.json").read_text())
    found = module.outcomes()
    assert found.keys() == want.keys()
    for case in want:
        assert len(found[case]) == len(want[case]) == 80
        for i, (got, expected) in enumerate(zip(found[case], want[case])):
            assert got == expected, (case, i)
