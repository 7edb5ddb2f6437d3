"""The `pipeweaver` command as a user runs it: installed console script, exit codes,
one-line errors, JSON that the library reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.ir import ScheduleTable, validate
from pipeweaver_megatron.schedules import build_baseline

SCRIPT = Path(sys.executable).parent / "pipeweaver"


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_console_script_is_installed():
    assert SCRIPT.is_file()
    assert "config" in run("--help").stdout


def test_config_show_text_and_json():
    text = run("config", "show", "VLM-S").stdout
    assert "vision_encoder" in text and "169 LM tokens" in text and "TP=4 PP=4" in text
    data = json.loads(run("config", "show", "t2v-s", "--json").stdout)
    assert data["total_params"] == load_model("t2v-s").total_params
    assert data["modules"][1]["kind"] == "generator"


def test_schedule_json_is_the_ir_form():
    out = run("schedule", "--model", "tiny-vlm", "--baseline", "megatron-interleaved",
              "--microbatches", "8", "--json").stdout
    table = ScheduleTable.from_json(json.loads(out))
    validate(table)
    expected = build_baseline(load_model("tiny-vlm"), "megatron-interleaved", 8)
    assert table.content_hash == expected.content_hash


def test_schedule_grid_with_overrides():
    out = run("schedule", "--model", "vlm-s", "--baseline", "megatron-1f1b", "--microbatches",
              "6", "--pp", "2").stdout
    assert "megatron-1f1b for VLM-S: 2 ranks, 2 stages, 6 microbatches" in out
    assert out.splitlines()[4].split()[:3] == ["step", "rank", "0"]


def test_workload_sample_json_and_trace_replay(tmp_path):
    trace = tmp_path / "trace.jsonl"
    first = json.loads(run("workload", "sample", "--model", "tiny-vlm", "--dataset", "obelics",
                           "--iterations", "3", "--seed", "5", "--json", "--record",
                           str(trace)).stdout)
    assert trace.is_file() and first["iterations"] == 3
    replay = json.loads(run("workload", "sample", "--model", "tiny-vlm", "--dataset",
                            str(trace), "--iterations", "3", "--json").stdout)
    for key in ("microbatches", "samples", "mean_images_per_microbatch"):
        assert replay[key] == first[key]


@pytest.mark.parametrize("args,message", [
    (["config", "show", "no-such-model"], "no such file and no shipped model"),
    (["schedule", "--model", "tiny-vlm", "--baseline", "megatron-interleaved",
      "--microbatches", "10"], "last group of 2"),
    (["schedule", "--model", "tiny-vlm", "--baseline", "megatron-1f1b", "--pp", "16"],
     "need at least 16"),
    (["workload", "sample", "--model", "tiny-vlm", "--dataset", "no-such-data"], "no-such-data"),
])
def test_errors_are_one_line_without_traceback(args, message):
    result = run(*args, ok=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeweaver: error:")
    assert message in lines[0] and "Traceback" not in result.stderr


def test_broken_yaml_error_names_file_and_key(write_spec):
    path = write_spec("tiny-vlm", lambda d: d["parallel"].update(tp=3))
    result = run("config", "show", str(path), ok=False)
    assert result.returncode == 2
    assert f"{path}: parallel.tp: tp=3 does not divide" in result.stderr


def test_demo_trains_both_schedules_and_compares():
    out = subprocess.run([str(SCRIPT), "demo", "--iterations", "3", "--port", "29660"],
                         capture_output=True, text=True, timeout=600).stdout
    for schedule in ("pipeweaver", "megatron-1f1b"):
        assert f"--pipeweaver-schedule {schedule}" in out
        row = next(line for line in out.splitlines() if line.startswith(schedule + " "))
        measured, predicted = map(float, row.split()[1:3])
        assert measured > 0 and predicted > 0
    assert out.count("iteration     3/3 | loss") == 2
    assert "measured speedup of PipeWeaver over Megatron 1F1B" in out


def test_simulate_json_trace_and_plot(tmp_path):
    trace, plot = tmp_path / "t.json", tmp_path / "t.png"
    data = json.loads(run("simulate", "--model", "tiny-vlm", "--workload", "obelics",
                          "--schedule", "megatron-interleaved", "--iterations", "3", "--seed",
                          "1", "--trace", str(trace), "--plot", str(plot), "--json").stdout)
    for key in ("iteration_time_s", "mean_iteration_time_s", "lower_bound_s", "bubble_ratio",
                "mfu", "peak_memory_gib"):
        assert key in data
    assert len(data["iteration_time_s"]) == 3 and len(data["peak_memory_gib"]) == 4
    assert data["lower_bound_s"] <= data["mean_iteration_time_s"]
    assert "traceEvents" in json.loads(trace.read_text())
    assert plot.stat().st_size > 1000


def test_simulate_rejects_a_calibration_for_other_hardware(tmp_path):
    from pipeweaver_megatron.semu import Calibration

    path = tmp_path / "cal.json"
    Calibration(hardware="cpu", device="cpu").save(path)
    result = run("simulate", "--model", "tiny-vlm", "--schedule", "gpipe", "--hardware", "H100",
                 "--calibration", str(path), ok=False)
    assert result.returncode == 2 and "fitted for cpu, not H100" in result.stderr


def test_plan_json_is_a_valid_schedule_with_its_prediction(tmp_path):
    trace, plot = tmp_path / "p.json", tmp_path / "p.png"
    data = json.loads(run("plan", "--model", "vlm-s", "--workload", "obelics", "--budget-ms",
                          "300", "--seed", "2", "--json", "--trace", str(trace),
                          "--plot", str(plot)).stdout)
    table = ScheduleTable.from_json(data["schedule"])
    validate(table)
    assert data["lower_bound_s"] <= data["predicted_iteration_time_s"]
    assert max(data["peak_memory_gib"]) <= data["capacity_gib"] + 1e-9
    search = data["search"]
    assert search["candidates_evaluated"] >= 1 and search["elapsed_ms"] > 0
    history = [h["iteration_time_s"] for h in search["best_score_history"]]
    assert history and history[-1] == pytest.approx(data["predicted_iteration_time_s"])
    assert "traceEvents" in json.loads(trace.read_text()) and plot.stat().st_size > 1000


def test_plan_is_reproducible_with_an_evaluation_budget():
    args = ("plan", "--model", "tiny-vlm", "--workload", "obelics", "--evaluations", "8",
            "--budget-ms", "60000", "--seed", "4", "--json")
    first, second = (json.loads(run(*args).stdout) for _ in range(2))
    assert first["schedule"] == second["schedule"]


@pytest.mark.parametrize("schedule", ["pipeweaver", "megatron-vpp", "nnscaler", "optimus"])
def test_simulate_runs_every_comparison(schedule):
    data = json.loads(run("simulate", "--model", "tiny-vlm", "--workload", "obelics",
                          "--schedule", schedule, "--iterations", "2", "--budget-ms", "100",
                          "--json").stdout)
    assert len(data["iteration_time_s"]) == 2
    assert data["lower_bound_s"] <= data["mean_iteration_time_s"] * (1 + 1e-9)


def test_plan_rejects_unknown_model():
    result = run("plan", "--model", "no-such-model", ok=False)
    assert result.returncode == 2 and "no-such-model" in result.stderr
