"""The schedule IR: actions, layouts, JSON round trip, hashing, validators, rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.ir import (Action, Layout, LayoutError, ModuleInfo, Op, Part,
                                    ScheduleFormatError, ScheduleTable, ScheduleValidationError,
                                    Stage, render_grid, validate)
from pipeweaver_megatron.schedules import build_baseline


@given(st.sampled_from(list(Op)), st.integers(0, 999), st.integers(0, 9999), st.integers(0, 99))
def test_action_string_round_trip(op, stage, microbatch, sub):
    action = Action(op, stage, microbatch, sub)
    assert Action.from_str(str(action)) == action


def test_action_string_form():
    assert str(Action(Op.F, 3, 12)) == "3F12"
    assert str(Action(Op.B, 0, 4, 2)) == "0B4.2"
    for bad in ("F3", "3X1", "3F", "3F1.", "a3F1"):
        with pytest.raises(ValueError):
            Action.from_str(bad)


def lm_layout(num_ranks: int, stages_per_rank: int = 1) -> Layout:
    n = num_ranks * stages_per_rank
    return Layout(num_ranks, (ModuleInfo("lm", n),),
                  tuple(Stage(i, i % num_ranks, (Part("lm", i, i + 1),)) for i in range(n)))


def table_of(layout: Layout, ranks: list[str], microbatches: int, subs=()) -> ScheduleTable:
    return ScheduleTable(layout=layout, num_microbatches=microbatches,
                         ranks=tuple(tuple(Action.from_str(a) for a in r.split()) for r in ranks),
                         sub_microbatches=subs)


ONE_F_ONE_B_P2_M3 = ["0F0 0F1 0B0 0F2 0B1 0B2", "1F0 1B0 1F1 1B1 1F2 1B2"]


def test_golden_1f1b_pp2_is_valid_and_what_megatron_runs():
    validate(table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3))
    generated = build_baseline(load_model("tiny-vlm"), "megatron-1f1b", 3, pp=2)
    assert [" ".join(map(str, r)) for r in generated.ranks] == ONE_F_ONE_B_P2_M3


def test_receiving_out_of_sending_order_is_valid():
    # Rank 1 takes microbatch 1 before 0: its receives are posted in rank 0's sending
    # order and microbatch 0's activation waits in its buffer (no deadlock, no reorder).
    validate(table_of(lm_layout(2), ["0F0 0F1 0B0 0B1", "1F1 1B1 1F0 1B0"], 2))


BROKEN = [
    ("same-rank order", ["0F0 0B0", "1B0 1F0"], 1, "needs 1F0, which comes later", (1, 0)),
    ("deadlock", ["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"], 2, "deadlock", (0, 1)),
    ("missing", ["0F0 0B0", "1F0"], 1, "1 actions missing: 1B0", None),
    ("duplicate", ["0F0 0F0 0B0", "1F0 1B0"], 1, "0F0 appears twice", (0, 1)),
    ("wrong rank", ["0F0 1F0 0B0", "1B0"], 1, "stage 1 belongs to rank 1", (0, 1)),
    ("no such microbatch", ["0F0 0F1 0B0", "1F0 1B0"], 1, "microbatch 1 not in", (0, 1)),
    ("no such sub", ["0F0 0F0.1 0B0", "1F0 1B0"], 1, "sub 1 not in [0, 1)", (0, 1)),
]


@pytest.mark.parametrize("label,ranks,m,reason,marked", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_tables_fail_with_marked_grid(label, ranks, m, reason, marked):
    with pytest.raises(ScheduleValidationError) as info:
        validate(table_of(lm_layout(2), ranks, m))
    assert reason in info.value.reason
    grid = info.value.grid
    assert grid.splitlines()[0].split() == ["step", "rank", "0", "rank", "1"]
    if marked is not None:
        rank, step = marked
        line = next(l for l in grid.splitlines()[1:] if l.split()[0] == str(step))
        assert "<-- ERROR HERE" in line and f"rank {rank}:" in line
        assert f">>{ranks[rank].split()[step]}<<" in line


def vlm_layout() -> Layout:
    """Modality-aware: vision (+ projector on its last chunk) then LM, 2 ranks."""
    modules = (ModuleInfo("vision", 2), ModuleInfo("projector", 1, ("vision",)),
               ModuleInfo("lm", 2, ("projector",)))
    stages = (Stage(0, 0, (Part("vision", 0, 1),)),
              Stage(1, 1, (Part("vision", 1, 2), Part("projector", 0, 1))),
              Stage(2, 0, (Part("lm", 0, 1),)), Stage(3, 1, (Part("lm", 1, 2),)))
    return Layout(2, modules, stages)


SUBS = (("vision", (2, 0)), ("projector", (2, 0)))
SUB_SCHEDULE = ["0F0 0F0.1 2F0 2F1 2B0 2B1 0B0 0B0.1",
                "1F0 1F0.1 3F0 3B0 3F1 3B1 1B0 1B0.1"]


def test_layout_edges_aligned_inside_a_module_gathering_across():
    edges = {(e.src, e.dst): e.aligned for e in vlm_layout().edges}
    assert edges == {(0, 1): True, (1, 2): False, (2, 3): True}


def test_sub_microbatches_and_text_only_microbatch_validate():
    validate(table_of(vlm_layout(), SUB_SCHEDULE, 2, SUBS))


def test_lm_before_all_encoder_subs_deadlocks():
    ranks = ["0F0 2F0 0F0.1 2F1 2B0 2B1 0B0 0B0.1", SUB_SCHEDULE[1]]
    with pytest.raises(ScheduleValidationError, match="deadlock"):
        validate(table_of(vlm_layout(), ranks, 2, SUBS))


def test_modules_sharing_a_stage_must_agree_on_subs():
    with pytest.raises(ScheduleValidationError, match="different sub-microbatch counts"):
        validate(table_of(vlm_layout(), SUB_SCHEDULE, 2, (("vision", (2, 0)),)))


def test_encoder_work_for_a_text_only_microbatch_is_rejected():
    ranks = [SUB_SCHEDULE[0] + " 0F1 0B1", SUB_SCHEDULE[1]]
    with pytest.raises(ScheduleValidationError, match="sub 0 not in \\[0, 0\\)"):
        validate(table_of(vlm_layout(), ranks, 2, SUBS))


def test_layout_rejects_gaps_and_backward_edges():
    modules = (ModuleInfo("lm", 4),)
    with pytest.raises(LayoutError, match="starts at layer 3, expected 2"):
        Layout(2, modules, (Stage(0, 0, (Part("lm", 0, 2),)), Stage(1, 1, (Part("lm", 3, 4),))))
    with pytest.raises(LayoutError, match="layers 2..4 are on no stage"):
        Layout(2, modules, (Stage(0, 0, (Part("lm", 0, 2),)),))
    with pytest.raises(LayoutError, match="not earlier in pipeline order"):
        Layout(2, (ModuleInfo("v", 1), ModuleInfo("lm", 1, ("v",))),
               (Stage(0, 0, (Part("lm", 0, 1),)), Stage(1, 1, (Part("v", 0, 1),))))


@pytest.mark.parametrize("name,baseline", [("vlm-s", "megatron-interleaved"),
                                           ("t2v-s", "megatron-1f1b"), ("tiny-vlm", "gpipe")])
def test_json_round_trip_and_stable_hash(name, baseline):
    table = build_baseline(load_model(name), baseline)
    text = json.dumps(table.to_json())
    back = ScheduleTable.loads(text)
    assert back == table
    assert back.content_hash == table.content_hash
    data = json.loads(text)
    assert data["schema_version"] == 1 and data["ranks"][0][0]["op"] == "F"
    assert set(data["stages"][0]) == {"stage", "rank", "parts"}


def test_hash_follows_content():
    table = table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3)
    same = table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3)
    swapped = table_of(lm_layout(2), ["0F0 0F1 0F2 0B0 0B1 0B2", ONE_F_ONE_B_P2_M3[1]], 3)
    assert table.content_hash == same.content_hash
    assert table.content_hash != swapped.content_hash
    validate(swapped)


def test_sub_microbatches_survive_json():
    table = table_of(vlm_layout(), SUB_SCHEDULE, 2, SUBS)
    back = ScheduleTable.from_json(json.loads(table.dumps()))
    assert back.subs(0, 0) == 2 and back.subs(1, 1) == 0 and back.subs(2, 0) == 1
    validate(back)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(schema_version=7), "schema_version: 7 is not supported"),
    (lambda d: d["ranks"][0][0].update(op="X"), "ranks[0][0].op: 'X' is not one of"),
    (lambda d: d["ranks"][1][0].pop("stage"), "ranks[1][0].stage: missing"),
    (lambda d: d["stages"][0].update(rank="0"), "stages[0].rank: expected an integer"),
    (lambda d: d["stages"][1]["parts"][0].update(layers=[5, 9]), "stages: module 'lm'"),
])
def test_malformed_json_names_the_key(edit, message):
    data = table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3).to_json()
    edit(data)
    with pytest.raises(ScheduleFormatError) as info:
        ScheduleTable.from_json(data)
    assert message in str(info.value)


def test_long_grid_is_cut_around_the_error():
    table = build_baseline(load_model("vlm-s"), "megatron-interleaved")
    grid = render_grid(table, {(2, 200): "here"})
    lines = grid.splitlines()
    assert len(lines) < 60 and "  ..." in lines
    assert any(l.split()[0] == "200" and "<-- ERROR HERE (rank 2: here)" in l for l in lines[1:]
               if l.strip() != "...")
