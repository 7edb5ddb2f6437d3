"""Fitting SEMU's per-action runtime overhead from measured traces."""

from __future__ import annotations

import json

import pytest

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Part
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import (Calibration, CalibrationError, CostModel, ModuleShape,
                                     batch_shapes, load_calibration, simulate, write_trace)
from pipeweaver_megatron.semu.runtime_fit import fit_action_overhead
from pipeweaver_megatron.workload import TokenRules, sample_workload

MODEL = load_model("tiny-vlm")
HARDWARE = get_hardware(MODEL.hardware)


def write_run(directory, extra_forward: float, extra_backward: float, iterations: int = 3):
    """Predicted traces and 'measured' ops that take the prediction plus known extras."""
    costs = CostModel(MODEL, HARDWARE)
    rules = TokenRules.from_model(MODEL)
    for i, batch in enumerate(sample_workload(MODEL, "obelics", iterations, 0)):
        table = build_baseline(MODEL, "megatron-1f1b", len(batch.microbatches), pp=2)
        result = simulate(costs, table, batch_shapes(MODEL, batch, rules))
        write_trace(result, table.layout, directory / f"predicted_{i:06d}.json")
        for rank, actions in enumerate(result.actions):
            ops, clock = [], 0.0
            for action, start, end in zip(actions, result.starts[rank], result.ends[rank]):
                took = end - start + (extra_forward if action.op.name == "F" else extra_backward)
                ops.append({"op": f"Compute({action})", "start_s": clock, "end_s": clock + took})
                clock += took
            (directory / f"measured_{i:06d}_rank{rank:04d}.json").write_text(json.dumps(ops))


def test_the_fit_recovers_known_overheads(tmp_path):
    write_run(tmp_path, 0.002, 0.005)
    fitted = fit_action_overhead(Calibration(hardware="cpu"), tmp_path)
    assert fitted.action_overhead_s == pytest.approx((0.002, 0.005), abs=2e-6)


def test_overheads_enter_every_stage_cost_and_survive_a_round_trip(tmp_path):
    plain = CostModel(MODEL, HARDWARE)
    fitted = Calibration(hardware="cpu", action_overhead_s=(0.001, 0.003))
    shape = {"lm": ModuleShape((128, 64))}
    a = plain.stage_cost((Part("lm", 0, 2),), shape)
    b = CostModel(MODEL, HARDWARE, fitted).stage_cost((Part("lm", 0, 2),), shape)
    assert b.forward_s - a.forward_s == pytest.approx(0.001)
    assert b.backward_s - a.backward_s == pytest.approx(0.003)
    fitted.save(tmp_path / "c.json")
    assert load_calibration(tmp_path / "c.json").action_overhead_s == (0.001, 0.003)


def test_nothing_to_match_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="no measured forward and backward actions"):
        fit_action_overhead(Calibration(hardware="cpu"), tmp_path)
