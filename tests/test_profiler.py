"""`pipeweaver profile` on this CPU: a real (quick) measurement run, its file, its fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Part
from pipeweaver_megatron.semu import CostModel, ModuleShape, OpClass, load_calibration

SCRIPT = Path(sys.executable).parent / "pipeweaver"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "cpu.json"
    result = subprocess.run([str(SCRIPT), "profile", "--device", "cpu", "--quick", "--out",
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout
    return load_calibration(out)


def test_profile_writes_a_complete_calibration(calibration):
    assert calibration.hardware == "cpu" and calibration.device == "cpu"
    for cls in OpClass:
        assert calibration.factor(cls).overhead_s >= 0
    points = calibration.measurements["points"]
    for cls in ("gemm", "attention", "elementwise", "collective", "p2p"):
        assert len(points[cls]) >= 3
    assert set(calibration.layer_factors) == {"vision_encoder", "language_model"}
    assert 0 < calibration.causal_fraction <= 1
    assert calibration.peak_flops > 0 and calibration.memory_bandwidth > 0


def test_measured_roofline_is_never_beaten(calibration):
    """Every factor is >= 1 against the measured peaks, so no predicted op is faster
    than its roofline, and no measured GEMM or elementwise op beat those peaks."""
    for cls in OpClass:
        f = calibration.factor(cls)
        assert min(f.a_f, f.a_m, f.a_n) >= 1.0
    for row in calibration.measurements["points"]["gemm"]:
        assert row["flops"] / row["seconds"] <= calibration.peak_flops * (1 + 1e-9)
    model = load_model("tiny-vlm")
    costs = CostModel(model, get_hardware("cpu"), calibration)
    for graph in costs.graphs((Part("lm", 0, 8),), {"lm": ModuleShape((100, 156))}):
        for op in graph.ops:
            bound = max(op.flops / costs.roofline.peak_flops,
                        op.mem_bytes / costs.roofline.memory_bandwidth)
            assert costs.op_latency(op) >= bound


def test_layer_factors_only_add_time(calibration):
    model = load_model("tiny-vlm")
    hw = get_hardware("cpu")
    shape = {"lm": ModuleShape((200,))}
    plain = CostModel(model, hw, calibration.__class__(hardware="cpu", factors=calibration.factors,
                                                       peak_flops=calibration.peak_flops,
                                                       memory_bandwidth=calibration.memory_bandwidth,
                                                       causal_fraction=calibration.causal_fraction))
    layered = CostModel(model, hw, calibration)
    a = plain.stage_cost((Part("lm", 1, 3),), shape)
    b = layered.stage_cost((Part("lm", 1, 3),), shape)
    factors = calibration.layer("language_model")
    assert b.forward_s >= a.forward_s + 2 * factors.forward.overhead_s * 0.999
    assert b.backward_s >= a.backward_s


def test_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([str(SCRIPT), "profile", "--device", "cuda", "--out",
                             str(tmp_path / "x.json")], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such device on this machine" in lines[0]
