"""Memory strategies executed (models/memory.py): recompute and offload of a chunk's
transformer layers leave losses and every gradient bitwise unchanged (with dropout too,
one process; at PP 2 and PP 4 through the runtime), the planner's choice travels in the
IterationPlan, its hash and the service's wire format, and the saved-activation counter
sees what each strategy keeps."""

from __future__ import annotations

import pytest
import torch

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings
from pipeweaver_megatron.planner.iteration import memory_choices, plan_iteration
from pipeweaver_megatron.runtime.verify import verify
from pipeweaver_megatron.semu import CostModel
from pipeweaver_megatron.service.wire import InvalidPlan, decode, encode_plan, read_plan
from pipeweaver_megatron.workload import TokenRules, sample_workload

pytestmark = pytest.mark.filterwarnings("ignore")


def transformer_layers(model) -> int:
    return sum(m.num_layers for m in model.modules if m.is_transformer)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_and_offload_keep_losses_and_gradients_bitwise(dropout):
    from pipeweaver_megatron.models import (build_reference, init_single_process, microbatch_data,
                                            teardown)
    from pipeweaver_megatron.models.memory import SavedBytes, layer_memory
    from pipeweaver_megatron.models.rng import seed_cpu

    model = load_model("tiny-vlm")
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, 0)[0]
    layers = transformer_layers(model)
    init_single_process(0)
    try:
        net = build_reference(model, seed=0, use_te=False, dropout=dropout)
        data = microbatch_data(model, batch.microbatches[0], rules, 0)
        runs = {}
        for name, (recompute, offload) in {"none": (0, 0), "recompute": (layers, 0),
                                           "offload": (0, layers), "mixed": (3, 4)}.items():
            net.zero_grad(set_to_none=True)
            seed_cpu(7)  # the same generator states (and so dropout masks) for every run
            counter = SavedBytes()
            with layer_memory(recompute, offload, net.parameters(), counter):
                result = net({}, data)
            result.loss.backward()
            assert counter.device == 0 and counter.host == 0  # all freed by the backward
            grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
            runs[name] = (result.loss.item(), grads, counter)
    finally:
        teardown()
    loss, grads, plain = runs["none"]
    for name, (other_loss, other_grads, _) in runs.items():
        assert other_loss == loss, name
        assert other_grads.keys() == grads.keys()
        assert all(torch.equal(other_grads[n], grads[n]) for n in grads), name
    recompute, offload, mixed = (runs[n][2] for n in ("recompute", "offload", "mixed"))
    assert recompute.peak_device < 0.2 * plain.peak_device and recompute.peak_host == 0
    assert offload.peak_device < 0.2 * plain.peak_device and offload.peak_host > 0.5 * plain.peak_device
    assert recompute.peak_device < mixed.peak_device < plain.peak_device and mixed.peak_host > 0


def test_a_strategy_naming_more_layers_than_the_chunk_runs_is_an_error():
    from pipeweaver_megatron.models import (build_reference, init_single_process, microbatch_data,
                                            teardown)
    from pipeweaver_megatron.models.memory import layer_memory

    model = load_model("tiny-vlm")
    batch = sample_workload(model, model.dataset, 1, 0)[0]
    init_single_process(0)
    try:
        net = build_reference(model, seed=0, use_te=False)
        data = microbatch_data(model, batch.microbatches[0], TokenRules.from_model(model), 0)
        with pytest.raises(ValueError, match="names 99 transformer layers, the chunk ran"):
            with layer_memory(90, 9, net.parameters()):
                net({}, data)
    finally:
        teardown()


@pytest.mark.parametrize("pp,strategies", [(4, ("mixed",))])  # each kind alone: bitwise
# in one process above (test_recompute_and_offload_keep_losses_and_gradients_bitwise)
def test_forced_strategies_through_the_runtime_are_bitwise_the_no_strategy_run(pp, strategies):
    plain = verify("tiny-vlm", "pipeweaver", pp=pp, batches=1, seed=5, timeout_s=90,
                   memory_strategy="none")
    assert plain.ok and plain.memory == [0]
    for strategy in strategies:
        forced = verify("tiny-vlm", "pipeweaver", pp=pp, batches=1, seed=5, timeout_s=90,
                        memory_strategy=strategy)
        assert forced.ok and forced.memory[0] > 0, strategy
        assert forced.plans != plain.plans  # the strategy is part of the plan's hash
        assert forced.losses == plain.losses and forced.grad_digests == plain.grad_digests


def test_the_planners_choice_travels_in_the_plan_its_hash_and_the_wire():
    """Under a tight memory capacity the planner recomputes or offloads; the plan
    carries exactly those choices, and the service's message round-trips them."""
    model = load_model("tiny-vlm")
    costs = CostModel(model, get_hardware(model.hardware))
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, 0)[0]
    roomy = PipeWeaverPlanner(costs, settings=SearchSettings(max_evaluations=4))
    free = roomy.plan(batch, 60_000, 0)
    static = max(s.total_bytes for s in costs.static_memory(roomy.layout))
    peak = max(free.simulation.peak_memory_bytes)
    tight = PipeWeaverPlanner(costs, roomy.chunks, SearchSettings(max_evaluations=4),
                              capacity_bytes=static + 0.5 * (peak - static))
    result = tight.plan(batch, 60_000, 0)
    assert result.memory.strategies, "a capacity between static and peak memory forces some"
    plan = plan_iteration(model, result.table, batch, rules, members=result.sub_microbatches.members,
                          strategies=result.memory.strategies)
    assert plan.memory == memory_choices(result.memory.strategies) and plan.memory
    for stage, m, sub, recompute, offload in plan.memory:
        chosen = result.memory.strategies[(stage, m, sub)]
        assert (chosen.recompute_layers, chosen.offload_layers) == (recompute, offload)
        assert plan.strategy(stage, m, sub) == (recompute, offload)
    without = plan_iteration(model, result.table, batch, rules,
                             members=result.sub_microbatches.members)
    assert without.memory == () and without.content_hash != plan.content_hash
    message = decode(encode_plan(0, plan))
    back = read_plan(message, batch, plan.table.layout, plan.dtype, plan.tp)
    assert back.memory == plan.memory and back.content_hash == plan.content_hash
    message["memory"] = [[len(plan.table.layout.stages), 0, 0, 1, 0]]
    with pytest.raises(InvalidPlan, match="memory: no forward"):
        read_plan(message, batch, plan.table.layout, plan.dtype, plan.tp)
