"""The paper's comparison baselines (planner.baselines): layouts, orders, balance, SEMU."""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Op, Part, validate
from pipeweaver_megatron.planner.baselines import Comparison, build_comparison
from pipeweaver_megatron.semu import CostModel, batch_shapes, simulate
from pipeweaver_megatron.workload import TokenRules, sample_workload

MODELS = ["tiny-vlm", "tiny-t2v", "vlm-s", "t2v-s"]
NAMES = [c.value for c in Comparison]


@lru_cache(maxsize=None)
def setup(name: str):
    """Model, cost model and two random global batches (the first is the reference)."""
    model = load_model(name)
    costs = CostModel(model, get_hardware(model.hardware))
    return model, costs, sample_workload(model, None, 2, seed=17)


@lru_cache(maxsize=None)
def baseline(model_name: str, name: str):
    _, costs, batches = setup(model_name)
    return build_comparison(name, costs, batches[0])


def role(model, module: str) -> str:
    """'encoder', 'lm' or 'generator': where a module sits relative to the LM."""
    order, lm = list(model.order), model.language_model.name
    if module == lm:
        return "lm"
    return "encoder" if order.index(module) < order.index(lm) else "generator"


def stage_params(model, layout) -> list[int]:
    return [sum(model.part_params(p.module, p.first_layer, p.last_layer) for p in s.parts)
            for s in layout.stages]


def max_load_of(weights, cuts) -> float:
    bounds = [0, *cuts, len(weights)]
    return max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))


def cuts_of(layout, model) -> tuple[list[tuple[str, int]], list[int]]:
    """Layers of the whole model in stage order, and the stage boundaries between them."""
    units, cuts = [], []
    for stage in layout.stages:
        if units:
            cuts.append(len(units))
        units += [(p.module, i) for p in stage.parts for i in range(p.first_layer, p.last_layer)]
    return units, cuts


def shifted(cuts: list[int], n: int):
    """Every split that moves one boundary by one layer and keeps every run non-empty."""
    for i, delta in itertools.product(range(len(cuts)), (-1, 1)):
        moved = cuts[:i] + [cuts[i] + delta] + cuts[i + 1:]
        if all(a < b for a, b in zip([0, *moved], [*moved, n])):
            yield moved


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model_name", MODELS)
def test_tables_validate_and_cover_every_layer(model_name, name):
    model, _, batches = setup(model_name)
    base = baseline(model_name, name)
    layout, pp = base.layout, model.parallel.pp
    for module in model.modules:
        layers = sorted(i for s in layout.stages for p in s.parts if p.module == module.name
                        for i in range(p.first_layer, p.last_layer))
        assert layers == list(range(module.num_layers))
    for batch in batches:
        table, shapes = base.plan(batch)
        validate(table)
        assert table.layout is layout and table.name == name
        assert table.num_microbatches == batch.num_microbatches and len(table.ranks) == pp
        for module in model.order:
            assert len(shapes[module]) == batch.num_microbatches
            assert all(len(subs) == 1 for subs in shapes[module])


@pytest.mark.parametrize("model_name", MODELS)
def test_stage_counts_and_ranks(model_name):
    model, _, _ = setup(model_name)
    pp, vp = model.parallel.pp, max(2, model.parallel.vp)
    vpp = baseline(model_name, "megatron-vpp").layout
    assert vpp.num_stages == pp * vp
    assert [s.rank for s in vpp.stages] == [i % pp for i in range(pp * vp)]
    nn = baseline(model_name, "nnscaler").layout
    assert [s.rank for s in nn.stages] == list(range(pp))
    opt = baseline(model_name, "optimus").layout
    roles = [{role(model, m) for m in s.modules} for s in opt.stages]
    assert all(len(r) == 1 for r in roles)  # Optimus never mixes encoder, LM and generator
    counts = {"encoder": pp, "lm": pp * vp, "generator": pp}
    expected = [r for r in ("encoder", "lm", "generator")
                if any(role(model, m) == r for m in model.order)]
    assert [next(iter(r)) for r in roles] == [r for r in expected for _ in range(counts[r])]
    assert [s.rank for s in opt.stages] == [i % pp for i in range(opt.num_stages)]


@pytest.mark.parametrize("model_name", MODELS)
def test_megatron_vpp_chunks_are_parameter_balanced(model_name):
    model, _, _ = setup(model_name)
    layout = baseline(model_name, "megatron-vpp").layout
    units, cuts = cuts_of(layout, model)
    weights = [model.part_params(m, i, i + 1) for m, i in units]
    mine = max(stage_params(model, layout))
    assert mine == max_load_of(weights, cuts)
    if len(units) <= 20:  # brute force over every split of the tiny models
        best = min(max_load_of(weights, list(c))
                   for c in itertools.combinations(range(1, len(units)), len(cuts)))
        assert mine == best
    for moved in shifted(cuts, len(units)):
        assert mine <= max_load_of(weights, moved)
    params = stage_params(model, layout)
    assert max(params) < sum(params)  # more than one chunk carries weights


def mean_layer_seconds(costs, batch, units) -> list[float]:
    """Independent pricing: each layer alone on every microbatch, averaged."""
    model = costs.model
    shapes = batch_shapes(model, batch, TokenRules.from_model(model))
    out = []
    for module, layer in units:
        times = [costs.stage_cost((Part(module, layer, layer + 1),), {module: subs[0]})
                 for subs in shapes[module]]
        out.append(sum(t.forward_s + t.backward_s for t in times) / len(times))
    return out


@pytest.mark.parametrize("model_name", MODELS)
def test_nnscaler_split_is_balanced_by_semu_time(model_name):
    model, costs, batches = setup(model_name)
    layout = baseline(model_name, "nnscaler").layout
    units, cuts = cuts_of(layout, model)
    seconds = mean_layer_seconds(costs, batches[0], units)
    mine = max_load_of(seconds, cuts)
    for moved in shifted(cuts, len(units)):
        assert mine <= max_load_of(seconds, moved) * (1 + 1e-6)


def test_nnscaler_without_reference_profiles_the_first_batch_of_the_dataset():
    _, costs, _ = setup("tiny-vlm")
    base = build_comparison("nnscaler", costs)
    first = sample_workload(costs.model, None, 1, 0)[0]
    table, _ = base.plan(first)
    assert dict(table.metadata)["reference_iteration"] == 0
    assert base.layout == build_comparison("nnscaler", costs, first).layout


@pytest.mark.parametrize("model_name", MODELS)
def test_optimus_runs_encoder_work_around_the_lm(model_name):
    model, _, batches = setup(model_name)
    base = baseline(model_name, "optimus")
    table, _ = base.plan(batches[1])
    roles = {s.index: role(model, s.modules[0]) for s in base.layout.stages}
    light = "encoder" if "encoder" in roles.values() else "lm"
    for actions in table.ranks:
        kinds = [(roles[a.stage], a.op) for a in actions]
        first = [i for i, k in enumerate(kinds) if k == (light, Op.F)]
        last = [i for i, k in enumerate(kinds) if k == (light, Op.B)]
        others = [i for i, (r, _) in enumerate(kinds) if r != light]
        assert first and last and others
        assert max(first) < min(others) and max(others) < min(last)
        if light == "encoder":
            assert [actions[i].microbatch for i in first] == list(range(table.num_microbatches))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model_name", MODELS)
def test_simulated_makespan_is_at_least_its_lower_bound(model_name, name):
    _, costs, batches = setup(model_name)
    base = baseline(model_name, name)
    for batch in batches:
        table, shapes = base.plan(batch)
        result = simulate(costs, table, shapes, detail=False)
        assert result.pipeline_time_s >= max(result.busy_s) * (1 - 1e-9)
        assert result.iteration_time_s >= result.lower_bound_s * (1 - 1e-9)
        assert 0 < result.mfu < 1


def test_unknown_name_is_a_clear_error():
    _, costs, _ = setup("tiny-vlm")
    with pytest.raises(ValueError, match="unknown comparison baseline 'zero-bubble'.*optimus"):
        build_comparison("zero-bubble", costs)
