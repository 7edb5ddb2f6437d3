"""Planner pieces so far: chunk partitioner, sub-microbatch partitioner, greedy interleave."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Op, validate
from pipeweaver_megatron.planner import build_problem, interleave, partition, split_batch, split_evenly
from pipeweaver_megatron.semu import CostModel, price, simulate
from pipeweaver_megatron.workload import TokenRules, sample_workload


def costs_of(name: str) -> CostModel:
    model = load_model(name)
    return CostModel(model, get_hardware(model.hardware))


@given(st.integers(0, 200), st.integers(1, 40))
def test_split_evenly_is_uniform_and_complete(count, size):
    runs = split_evenly(count, size)
    assert [i for r in runs for i in r] == list(range(count))
    assert len(runs) == (count + size - 1) // size
    if runs:
        lengths = [len(r) for r in runs]
        assert max(lengths) - min(lengths) <= 1 and max(lengths) <= size


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v", "vlm-s", "vlm-l", "t2v-s"])
def test_chunks_are_modality_aware(name):
    costs = costs_of(name)
    plan = partition(costs)
    model, layout = costs.model, plan.layout
    for stage in layout.stages:
        stacks = {p.module for p in stage.parts if model.module(p.module).is_transformer}
        assert len(stacks) == 1  # never two transformer modules in one stage
    for module, k in plan.segments.items():
        stages = [s for s in layout.stages if s.parts[0].module == module]
        assert len(stages) == model.parallel.pp * k
        assert [s.rank for s in stages] == [i % model.parallel.pp for i in range(len(stages))]
    fastest = min(plan.latency_s.values())
    for module, k in plan.segments.items():
        layers = model.module(module).num_layers
        assert k == max(1, min(int(plan.latency_s[module] // fastest), layers // model.parallel.pp))


def test_sub_size_keeps_95_percent_of_peak_throughput():
    from pipeweaver_megatron.ir import Part
    from pipeweaver_megatron.planner.partition import unit_shape

    costs = costs_of("vlm-s")
    b = partition(costs).sub_size["vision"]
    def rate(n):
        c = costs.stage_cost((Part("vision", 1, 2),), {"vision": unit_shape(costs.model, "vision", n)})
        return n / (c.forward_s + c.backward_s)
    best = max(rate(n) for n in (1, 2, 4, 8, 16, 32, 48))
    assert rate(b) >= 0.95 * best
    assert b == 1 or rate(b // 2) < 0.95 * best


def test_sub_microbatches_cover_every_image_once():
    costs = costs_of("vlm-s")
    plan = partition(costs)
    model = costs.model
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, "obelics", 1, 3)[0]
    subs = split_batch(model, batch, rules, plan.sub_size)
    for m, microbatch in enumerate(batch.microbatches):
        images = microbatch.num_images
        members = [i for group in subs.members["vision"][m] for i in group]
        assert members == list(range(images))
        assert subs.counts["vision"][m] == -(-images // plan.sub_size["vision"])
        assert subs.counts["projector"][m] == subs.counts["vision"][m]
        assert subs.counts["lm"][m] == 1
        tokens = sum(s.tokens for s in subs.shapes["vision"][m])
        assert tokens == sum(microbatch.image_encoder_tokens(rules))


@pytest.mark.parametrize("name,dataset", [("tiny-vlm", "obelics"), ("tiny-t2v", None),
                                          ("vlm-s", "dynamic"), ("t2v-s", None)])
def test_greedy_interleave_gives_valid_tables(name, dataset):
    costs = costs_of(name)
    model = costs.model
    plan = partition(costs)
    rules = TokenRules.from_model(model)
    for batch in sample_workload(model, dataset, 2, 1):
        subs = split_batch(model, batch, rules, plan.sub_size)
        priced = price(costs, plan.layout, subs.shapes)
        problem = build_problem(costs, plan.layout, subs.counts, priced.costs,
                                len(batch.microbatches))
        result = interleave(problem)
        validate(result.table)
        simulated = simulate(costs, result.table, subs.shapes, priced=priced)
        assert simulated.pipeline_time_s == pytest.approx(result.makespan_s)
        for actions in result.table.ranks:
            assert {a.op for a in actions} <= {Op.F, Op.B}


def test_partition_rejects_a_rank_without_room_for_its_weights():
    from pipeweaver_megatron.planner import PartitionError

    with pytest.raises(PartitionError, match=r"rank 0 needs .* GiB for weights"):
        partition(costs_of("vlm-s"), capacity_bytes=2**30)
