"""Sequence parallelism on the planning side (no torch): a sequence-parallel plan's
hidden-state messages are each TP rank's ceil(n / tp) rows of the same plan's messages
without it, the flag is part of the plan's identity on the wire, and the service prices
what the run executes."""

from __future__ import annotations

import math

import pytest

from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.ir.execplan import Kind
from pipeweaver_megatron.semu.shapes import microbatch_shapes
from pipeweaver_megatron.service import InvalidPlan, ServiceSettings, fallback_plan, read_plan
from pipeweaver_megatron.service.wire import decode, encode_plan
from pipeweaver_megatron.service.worker import make_costs
from pipeweaver_megatron.workload import TokenRules, sample_workload

SHARDED = {"hidden", "cond"}
"""Messages over the sequence; the projector's "image_embeds" stay whole."""


def messages(plan) -> dict:
    """Every sent message of the plan by its identity, with its tensors."""
    found = {}
    for rank in plan.execution.ranks:
        for op in rank.ops:
            for inner in getattr(op, "ops", (op,)):
                if type(inner).__name__ == "Send":
                    m = inner.message
                    found[(m.kind, m.producer, m.consumer_stage, m.consumer_sub)] = m.tensors
    return found


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_sequence_parallel_messages_are_each_tp_ranks_rows(name):
    model = load_model(name)
    rules = TokenRules.from_model(model)
    for seed in range(3):
        batch = sample_workload(model, model.dataset, 1, seed)[0]
        whole = messages(fallback_plan(model, batch, rules, "megatron-1f1b", 2, 2))
        rows = messages(fallback_plan(model, batch, rules, "megatron-1f1b", 2, 2,
                                      sequence_parallel=True))
        assert whole.keys() == rows.keys() and whole
        odd = 0
        for key, tensors in whole.items():
            for plain, sharded in zip(tensors, rows[key], strict=True):
                assert plain.name == sharded.name
                if plain.name in SHARDED:
                    assert sharded.shape == (math.ceil(plain.shape[0] / 2),) + plain.shape[1:]
                    odd += plain.shape[0] % 2
                else:
                    assert sharded.shape == plain.shape
        kinds = {key[0] for key in whole}
        assert kinds == {Kind.ACTIVATION, Kind.GRADIENT}
        assert odd or seed < 2  # some sequence over the three batches needs padding


def test_sequence_parallel_needs_tensor_parallelism():
    model = load_model("tiny-vlm")
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, 0)[0]
    plan = fallback_plan(model, batch, rules, "megatron-1f1b", 2, 1, sequence_parallel=True)
    assert not plan.sequence_parallel  # as Megatron's flag: nothing to shard over at TP 1
    assert plan.content_hash == fallback_plan(model, batch, rules, "megatron-1f1b", 2,
                                              1).content_hash


def test_the_wire_carries_the_flag_and_refuses_a_plan_for_another_run():
    model = load_model("tiny-vlm")
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, 0)[0]
    plan = fallback_plan(model, batch, rules, "megatron-1f1b", 2, 2, sequence_parallel=True)
    plain = fallback_plan(model, batch, rules, "megatron-1f1b", 2, 2)
    assert plan.content_hash != plain.content_hash
    message = decode(encode_plan(0, plan))
    back = read_plan(message, batch, plan.table.layout, "float32", 2, sequence_parallel=True)
    assert back.sequence_parallel and back.content_hash == plan.content_hash
    with pytest.raises(InvalidPlan, match="sequence_parallel True, expected .* "
                                          "sequence_parallel False"):
        read_plan(message, batch, plan.table.layout, "float32", 2)
    message["sequence_parallel"] = "yes"
    with pytest.raises(InvalidPlan, match="not a boolean"):
        read_plan(message, batch, plan.table.layout, "float32", 2, sequence_parallel=True)


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_the_service_prices_what_the_run_executes(name):
    """The settings, which the run's flag sets, decide what SEMU prices, whatever the
    model file says; the payload SEMU prices for a stage is the bytes of the plan's
    message from that stage, with and without the flag."""
    vlm_s = load_model("VLM-S")
    assert vlm_s.parallel.sequence_parallel
    off = ServiceSettings(model="VLM-S", tp=2, sequence_parallel=False)
    assert not make_costs(off, vlm_s).parallel.sequence_parallel
    unset = ServiceSettings(model="VLM-S", tp=2)  # a script's own model: the file decides
    assert make_costs(unset, vlm_s).parallel.sequence_parallel
    assert not unset.resolve().sequence_parallel  # and messages stay whole
    model = load_model(name)
    assert not model.parallel.sequence_parallel
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, 1)[0]
    for flag in (True, False):
        costs = make_costs(ServiceSettings(model=name, tp=2, sequence_parallel=flag), model)
        assert costs.parallel.sequence_parallel is flag and costs.parallel.tp == 2
        plan = fallback_plan(model, batch, rules, "megatron-1f1b", 2, 2,
                             sequence_parallel=flag)
        layout = plan.table.layout
        priced = 0
        for (kind, producer, _, _), tensors in messages(plan).items():
            if kind != Kind.ACTIVATION:
                continue
            shapes = microbatch_shapes(model, batch.microbatches[producer.microbatch], rules)
            cost = costs.stage_cost(layout.stages[producer.stage].parts, shapes)
            sent = sum(math.prod(t.shape) * 4 for t in tensors)  # float32
            assert cost.output_bytes == sent, (flag, producer, cost.output_bytes, sent)
            priced += 1
        assert priced
