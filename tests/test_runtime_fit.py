"""Fitting SEMU's runtime terms (per-action overhead and scale, per-iteration overhead)
from measured traces."""

from __future__ import annotations

import json

import pytest

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Part
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import (Calibration, CalibrationError, CostModel, ModuleShape,
                                     batch_shapes, load_calibration, simulate, write_trace)
from pipeweaver_megatron.semu.runtime_fit import fit_runtime
from pipeweaver_megatron.workload import TokenRules, sample_workload

MODEL = load_model("tiny-vlm")
HARDWARE = get_hardware(MODEL.hardware)


def write_run(directory, extra_forward: float, extra_backward: float, iterations: int = 3,
              scale: tuple[float, float] = (1.0, 1.0), outside: float = 0.0,
              kind_scale: dict | None = None):
    """Predicted traces and 'measured' ops that take scale * the prediction plus known
    extras, and iterations that take `outside` more than their longest rank."""
    costs = CostModel(MODEL, HARDWARE)
    rules = TokenRules.from_model(MODEL)
    for i, batch in enumerate(sample_workload(MODEL, "obelics", iterations, 0)):
        table = build_baseline(MODEL, "megatron-1f1b", len(batch.microbatches), pp=2)
        result = simulate(costs, table, batch_shapes(MODEL, batch, rules))
        write_trace(result, table.layout, directory / f"predicted_{i:06d}.json")
        longest = 0.0
        for rank, actions in enumerate(result.actions):
            ops, clock = [], 0.002  # the first op starts a little after the iteration
            for action, start, end in zip(actions, result.starts[rank], result.ends[rank]):
                forward = action.op.name == "F"
                kind = "+".join(table.layout.stages[action.stage].modules)
                slower = scale[0 if forward else 1] * (kind_scale or {}).get(kind, 1.0)
                took = (end - start) * slower + (extra_forward if forward else extra_backward)
                ops.append({"op": f"Compute({action})", "start_s": clock, "end_s": clock + took})
                clock += took
            longest = max(longest, clock - 0.002)
            (directory / f"measured_{i:06d}_rank{rank:04d}.json").write_text(json.dumps(ops))
        (directory / f"iteration_{i:06d}.json").write_text(
            json.dumps({"iteration_time_s": longest + outside}))


def test_the_fit_recovers_known_overheads(tmp_path):
    write_run(tmp_path, 0.002, 0.005)
    fitted = fit_runtime(Calibration(hardware="cpu"), [tmp_path])
    assert fitted.action_overhead_s == pytest.approx((0.002, 0.005), abs=2e-6)
    assert fitted.action_scale == pytest.approx((1.0, 1.0), abs=1e-6)


def test_the_fit_recovers_scales_and_the_iteration_overhead(tmp_path):
    """Two runs fitted together; the fit starts from a calibration that already had
    runtime terms, which it takes out of the predictions first."""
    prior = Calibration(hardware="cpu", action_overhead_s=(0.001, 0.0), action_scale=(2.0, 1.0))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_run(tmp_path / name, 0.002, 0.004, scale=(1.1, 1.25), outside=0.007)
    # The traces were predicted without runtime terms; express them as if the prior had
    # made them: prior prediction = 2 * compute + 1 ms for forwards.
    for path in tmp_path.glob("*/predicted_*.json"):
        trace = json.loads(path.read_text())
        for event in trace["traceEvents"]:
            if event.get("ph") == "X" and event.get("cat") == "forward":
                event["dur"] = event["dur"] * 2.0 + 1000.0
        path.write_text(json.dumps(trace))
    fitted = fit_runtime(prior, [tmp_path / "a", tmp_path / "b"], skip=0)
    assert fitted.action_overhead_s == pytest.approx((0.002, 0.004), abs=2e-6)
    assert fitted.action_scale == pytest.approx((1.1, 1.25), rel=1e-4)
    assert fitted.iteration_overhead_s == pytest.approx(0.007, abs=1e-9)


def test_overheads_enter_every_stage_cost_and_survive_a_round_trip(tmp_path):
    plain = CostModel(MODEL, HARDWARE)
    fitted = Calibration(hardware="cpu", action_overhead_s=(0.001, 0.003))
    shape = {"lm": ModuleShape((128, 64))}
    a = plain.stage_cost((Part("lm", 0, 2),), shape)
    b = CostModel(MODEL, HARDWARE, fitted).stage_cost((Part("lm", 0, 2),), shape)
    assert b.forward_s - a.forward_s == pytest.approx(0.001)
    assert b.backward_s - a.backward_s == pytest.approx(0.003)
    scaled = Calibration(hardware="cpu", action_overhead_s=(0.001, 0.003), action_scale=(1.5, 2.0),
                         iteration_overhead_s=0.004)
    c = CostModel(MODEL, HARDWARE, scaled).stage_cost((Part("lm", 0, 2),), shape)
    assert c.forward_s == pytest.approx(1.5 * a.forward_s + 0.001)
    assert c.backward_s == pytest.approx(2.0 * a.backward_s + 0.003)
    scaled.save(tmp_path / "c.json")
    loaded = load_calibration(tmp_path / "c.json")
    assert (loaded.action_overhead_s, loaded.action_scale, loaded.iteration_overhead_s) == \
        ((0.001, 0.003), (1.5, 2.0), 0.004)


def test_nothing_to_match_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="no measured forward and backward actions"):
        fit_runtime(Calibration(hardware="cpu"), [tmp_path])


def test_the_iteration_overhead_adds_to_every_iteration_and_its_bound():
    batch = sample_workload(MODEL, "obelics", 1, 0)[0]
    table = build_baseline(MODEL, "megatron-1f1b", len(batch.microbatches), pp=2)
    shapes = batch_shapes(MODEL, batch, TokenRules.from_model(MODEL))
    plain = simulate(CostModel(MODEL, HARDWARE), table, shapes)
    fixed = simulate(CostModel(MODEL, HARDWARE, Calibration(hardware="cpu",
                                                            iteration_overhead_s=0.01)),
                     table, shapes)
    assert fixed.iteration_time_s == pytest.approx(plain.iteration_time_s + 0.01)
    assert fixed.lower_bound_s == pytest.approx(plain.lower_bound_s + 0.01)
    assert fixed.pipeline_time_s == pytest.approx(plain.pipeline_time_s)


def test_chunk_kinds_get_terms_of_their_own(tmp_path):
    """Stages that hold the LM alone run 1.2x slower than the rest: their kind's scale
    says so, the others' stay 1, and SEMU prices each kind with its own terms."""
    layout = build_baseline(MODEL, "megatron-1f1b", 8, pp=2).layout
    kinds = {"+".join(stage.modules) for stage in layout.stages}
    assert "lm" in kinds and len(kinds) == 2
    write_run(tmp_path, 0.002, 0.003, iterations=4, kind_scale={"lm": 1.2})
    fitted = fit_runtime(Calibration(hardware="cpu"), [tmp_path], skip=0)
    assert set(fitted.chunk_runtime) == kinds
    for kind in kinds:
        terms = fitted.chunk_runtime[kind]
        want = 1.2 if kind == "lm" else 1.0
        assert terms.scale == pytest.approx((want, want), rel=1e-4), kind
        assert terms.overhead_s == pytest.approx((0.002, 0.003), abs=2e-6), kind
    shape = {"lm": ModuleShape((128, 64))}
    plain = CostModel(MODEL, HARDWARE).stage_cost((Part("lm", 0, 2),), shape)
    priced = CostModel(MODEL, HARDWARE, fitted).stage_cost((Part("lm", 0, 2),), shape)
    assert priced.forward_s == pytest.approx(1.2 * plain.forward_s + 0.002, rel=1e-4)
    fitted.save(tmp_path / "c.json")
    assert load_calibration(tmp_path / "c.json").chunk_runtime == fitted.chunk_runtime
