"""Baselines against megatron-core 0.16.1's own schedule functions.

The expected per-rank order is derived from megatron.core.pipeline_parallel.schedules:
get_pp_rank_microbatches gives the warm-up and remaining counts for a (PP, VP, rank) set
through megatron's parallel_state, get_schedule_table gives the virtual microbatch
order, and the loop below is the warm-up / steady 1F1B / cool-down structure of
forward_backward_pipelining_with(out)_interleaving. Our generators share no code with it.
"""

from __future__ import annotations

import itertools
import warnings

import pytest

from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.ir import Layout, ModuleInfo, Op, Part, Stage, validate
from pipeweaver_megatron.schedules import (ScheduleError, build_baseline, megatron_1f1b,
                                           megatron_interleaved)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules as mcore


def megatron_order(pp: int, vp: int, microbatches: int, group: int, rank: int):
    """(op, stage, microbatch) in the order megatron-core runs them on one rank."""
    parallel_state.set_pipeline_model_parallel_world_size(pp)
    parallel_state.set_pipeline_model_parallel_rank(rank)
    parallel_state.set_virtual_pipeline_model_parallel_world_size(vp if vp > 1 else None)
    try:
        total, _, warmup, remaining = mcore.get_pp_rank_microbatches(microbatches, vp, group)
    finally:
        parallel_state.set_pipeline_model_parallel_world_size(None)
        parallel_state.set_pipeline_model_parallel_rank(None)
        parallel_state.set_virtual_pipeline_model_parallel_world_size(None)
    if vp > 1:
        table = mcore.get_schedule_table(microbatches, vp, group)
    else:
        table = [(m, 0) for m in range(microbatches)]

    def fwd(k):
        mb, chunk = table[k]
        return ("F", chunk * pp + rank, mb)

    def bwd(k):
        mb, chunk = table[k]
        return ("B", (vp - 1 - chunk) * pp + rank, mb)

    order = [fwd(k) for k in range(warmup)]
    for k in range(remaining):
        order += [fwd(k + warmup), bwd(k)]
    order += [bwd(k) for k in range(remaining, total)]
    return order


def lm_layout(pp: int, vp: int) -> Layout:
    """One-module layout with stage c*P + r on rank r."""
    stages = tuple(Stage(i, i % pp, (Part("lm", i, i + 1),)) for i in range(pp * vp))
    return Layout(pp, (ModuleInfo("lm", pp * vp),), stages)


def ours(table, rank):
    return [(a.op.value, a.stage, a.microbatch) for a in table.ranks[rank]]


ONE_F_ONE_B = [(pp, m) for pp in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 7, 8, 16)]


@pytest.mark.parametrize("pp,microbatches", ONE_F_ONE_B)
def test_1f1b_matches_megatron(pp, microbatches):
    table = megatron_1f1b(lm_layout(pp, 1), microbatches)
    validate(table)
    for rank in range(pp):
        assert ours(table, rank) == megatron_order(pp, 1, microbatches, pp, rank)


def interleaved_cases():
    cases = []
    for pp, vp, m in itertools.product((2, 3, 4, 8), (2, 3, 4), (4, 6, 8, 9, 12, 16, 24)):
        for group in sorted({pp, pp + 1, 2 * pp, m}):
            if pp <= group <= m and not 0 < m % group < pp:
                cases.append((pp, vp, m, group))
    return cases


@pytest.mark.parametrize("pp,vp,microbatches,group", interleaved_cases())
def test_interleaved_matches_megatron(pp, vp, microbatches, group):
    table = megatron_interleaved(lm_layout(pp, vp), microbatches, group)
    validate(table)
    for rank in range(pp):
        assert ours(table, rank) == megatron_order(pp, vp, microbatches, group, rank)


def test_enough_interleaved_cases():
    assert len(interleaved_cases()) >= 100


@pytest.mark.parametrize("name", ["vlm-s", "vlm-l", "t2v-s", "tiny-vlm", "tiny-t2v"])
def test_shipped_models_interleaved_matches_megatron(name):
    model = load_model(name)
    table = build_baseline(model, "megatron-interleaved")
    pp, vp = model.parallel.pp, model.parallel.vp
    for rank in range(pp):
        assert ours(table, rank) == megatron_order(pp, vp, table.num_microbatches, pp, rank)


@pytest.mark.parametrize("pp,m,group,message", [
    (4, 8, 3, "must lie in"), (4, 8, 9, "must lie in"), (4, 10, 4, "last group of 2"),
])
def test_group_size_rules_follow_megatron(pp, m, group, message):
    with pytest.raises(ScheduleError, match=message):
        megatron_interleaved(lm_layout(pp, 2), m, group)


def test_interleaved_needs_chunks_and_1f1b_needs_one():
    with pytest.raises(ScheduleError, match="vp >= 2"):
        megatron_interleaved(lm_layout(4, 1), 8)
    with pytest.raises(ScheduleError, match="one model chunk per rank"):
        megatron_1f1b(lm_layout(4, 2), 8)


def test_every_action_once_and_balanced_counts():
    table = megatron_interleaved(lm_layout(4, 2), 8)
    for rank, actions in enumerate(table.ranks):
        assert sum(a.op == Op.F for a in actions) == sum(a.op == Op.B for a in actions) == 16
