"""Baseline placement and generators on the shipped models."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver_megatron.config import list_models, load_model
from pipeweaver_megatron.ir import Op
from pipeweaver_megatron.schedules import ScheduleError, build_baseline, megatron_layout
from pipeweaver_megatron.schedules.placement import balanced_partition


def brute_force(weights, parts, extra):
    """All splits into `parts` non-empty runs: (best max, best sum of squares at that max)."""
    n = len(weights)
    results = []
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = list(zip((0,) + cuts, cuts + (n,)))
        loads = [sum(weights[lo:hi]) + (extra if lo == 0 else 0) for lo, hi in bounds]
        results.append((max(loads), sum(x * x for x in loads)))
    return min(results)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=2, max_size=9), st.integers(0, 120), st.data())
def test_partition_is_optimal(weights, extra, data):
    parts = data.draw(st.integers(1, len(weights)))
    bounds = balanced_partition(weights, parts, extra)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == len(weights)
    assert all(lo < hi for lo, hi in bounds)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    loads = [sum(weights[lo:hi]) + (extra if lo == 0 else 0) for lo, hi in bounds]
    assert (max(loads), sum(x * x for x in loads)) == brute_force(weights, parts, extra)


@pytest.mark.parametrize("name", ["vlm-s", "vlm-m", "vlm-l", "vlm-xl-16k", "tiny-vlm"])
def test_megatron_placement_puts_encoder_and_first_lm_layers_on_stage_0(name):
    model = load_model(name)
    pp, vp = model.parallel.pp, model.parallel.vp
    layout = megatron_layout(model, pp, vp)
    first = layout.stages[0]
    assert first.rank == 0
    assert [(p.module, p.first_layer) for p in first.parts] == [
        ("vision", 0), ("projector", 0), ("lm", 0)]
    assert first.parts[0].last_layer == model.module("vision").num_layers
    for stage in layout.stages[1:]:
        assert stage.modules == ("lm",)
        assert stage.rank == stage.index % pp


@pytest.mark.parametrize("name", ["vlm-s", "t2v-s", "vlm-xl-8k", "t2v-xl-6k"])
def test_megatron_placement_balances_the_rest_by_parameters(name):
    model = load_model(name)
    layout = megatron_layout(model, model.parallel.pp, model.parallel.vp)
    loads = []
    for stage in layout.stages[1:]:
        loads.append(sum(model.part_params(p.module, p.first_layer, p.last_layer)
                         for p in stage.parts))
    biggest_layer = max(model.layer_params(m.name) + model.output_params(m.name)
                        for m in model.modules if m.is_transformer)
    # Balanced up to one layer (plus an LM head or DiT output) per stage.
    assert max(loads) - min(loads) <= biggest_layer * 1.5


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("baseline", ["gpipe", "megatron-1f1b", "megatron-interleaved"])
def test_every_shipped_model_gets_valid_baselines(name, baseline):
    model = load_model(name)
    table = build_baseline(model, baseline, num_microbatches=2 * model.parallel.pp)
    counts = {(a.op, a.stage, a.microbatch) for r in table.ranks for a in r}
    assert len(counts) == 2 * table.layout.num_stages * table.num_microbatches
    assert table.layout.num_stages == model.parallel.pp * (
        model.parallel.vp if baseline == "megatron-interleaved" else 1)


def test_gpipe_runs_all_forwards_first():
    table = build_baseline(load_model("tiny-vlm"), "gpipe", 4)
    for actions in table.ranks:
        ops = [a.op for a in actions]
        assert ops == [Op.F] * (len(ops) // 2) + [Op.B] * (len(ops) // 2)


def test_too_many_stages_is_a_clear_error():
    with pytest.raises(ScheduleError, match="need at least 40 LM/generator layers"):
        build_baseline(load_model("tiny-vlm"), "megatron-interleaved", 8, pp=4, vp=10)
    with pytest.raises(ScheduleError, match="unknown baseline"):
        build_baseline(load_model("tiny-vlm"), "zb-v", 8)
