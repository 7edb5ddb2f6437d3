"""scripts/pretrain_lmm.py end to end under torchrun on CPU: training runs with the
default flags and the loss falls, recorded plans replay to the same losses, faults fall
back, a resumed run continues exactly where a complete checkpoint left off, bf16. (TP x
PP and DP with clipping against one process: test_train_reference.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
KEYS = {"iteration", "loss", "iteration_time_s", "predicted_time_s", "plan_latency_ms", "fallback"}


def train(tmp_path: Path, name: str, procs: int, *flags: str, port: int,
          budget: str | None = "100") -> list[dict]:
    """budget: --pipeweaver-search-budget-ms (None: the default, auto)."""
    log = tmp_path / f"{name}.jsonl"
    budget_flags = ["--pipeweaver-search-budget-ms", budget] if budget else []
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", str(procs), "--master-port", str(port),
                           str(ROOT / "scripts" / "pretrain_lmm.py"), "--pipeweaver",
                           "--pipeweaver-model-config", "tiny-vlm", "--pipeweaver-log", str(log),
                           *budget_flags, *flags],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_two_ranks_train_with_default_flags_and_replay_the_same_plans(tmp_path):
    """The user's command (auto search budget): the loss falls, every plan is the
    planner's, each search ran within its budget; the recorded plans, replayed with no
    planner running, train the very same losses."""
    flags = ("--pipeline-model-parallel-size", "2", "--train-iters", "8", "--lr", "3e-3")
    plans = tmp_path / "plans"
    records = train(tmp_path, "pp2", 2, *flags, "--pipeweaver-record-plans", str(plans),
                    port=29701, budget=None)
    assert [r["iteration"] for r in records] == list(range(8))
    assert all(KEYS <= set(r) for r in records)
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.3, losses
    assert [r["source"] for r in records] == ["planner"] * 8
    for r in records:
        assert 0 < r["busiest_compute_s"] <= r["iteration_time_s"]
        assert r["plan_budget_ms"] > 0 and r["plan_search"]["evaluations"] >= 1
        if r["plan_cpu_budget_ms"]:  # training on every core: the CPU share bounds it
            assert r["plan_search"]["cpu_ms"] < r["plan_cpu_budget_ms"] + 300
    assert len(list(plans.glob("group*/plan_*.json"))) == 8
    replayed = train(tmp_path, "replay", 2, *flags, "--pipeweaver-replay-plans", str(plans),
                     port=29662, budget=None)
    assert [r["source"] for r in replayed] == ["replay"] * 8
    assert [r["loss"] for r in replayed] == losses
    assert [r["predicted_time_s"] for r in replayed] == [r["predicted_time_s"] for r in records]


def test_planner_faults_fall_back_and_training_goes_on(tmp_path):
    flags = ("--pipeline-model-parallel-size", "2", "--train-iters", "5", "--lr", "3e-3")
    clean = train(tmp_path, "clean", 2, *flags, port=29707)
    faulty = train(tmp_path, "faulty", 2, *flags, "--pipeweaver-plan-timeout-ms", "3000",
                   "--pipeweaver-inject-fault", "planner-crash@1",
                   "--pipeweaver-inject-fault", "planner-hang@2",
                   "--pipeweaver-inject-fault", "bad-plan@3", port=29708)
    assert [r["fallback"] for r in faulty] == [False, True, True, True, False]
    reasons = [r["fallback_reason"] for r in faulty]
    assert reasons[1] == "planner died" and reasons[2] in ("hung", "late")  # late if the
    assert reasons[3].startswith("invalid plan")  # wait for the hung worker ran out first
    assert faulty[-1]["fallbacks"] == 3 and not any(r["fallback"] for r in clean)
    # the same batches and the same math, in another order: the same losses
    assert [r["loss"] for r in faulty] == pytest.approx([r["loss"] for r in clean], rel=1e-4)


def test_a_run_killed_between_shard_writes_resumes_from_the_previous_complete_checkpoint(
        tmp_path):
    """The last rank dies in the checkpoint after iteration 4, once rank 0's file is on
    disk: `latest` still names iteration 2, and the resumed run trains iterations 2 and 3
    with the uninterrupted run's losses (model, optimizer and every RNG restored)."""
    flags = ("--pipeline-model-parallel-size", "2", "--lr", "3e-3")
    whole = train(tmp_path, "whole", 2, *flags, "--train-iters", "4", port=29710)
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "killed.jsonl"
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", "29711",
                           str(ROOT / "scripts" / "pretrain_lmm.py"), "--pipeweaver",
                           "--pipeweaver-model-config", "tiny-vlm", "--pipeweaver-log", str(log),
                           "--pipeweaver-search-budget-ms", "100", *flags, "--train-iters", "4",
                           "--save", str(ckpt), "--save-interval", "2",
                           "--pipeweaver-inject-fault", "crash-mid-save@4"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode != 0
    assert "injected fault: rank 1 dies in the checkpoint of iteration 4" in done.stderr
    assert (ckpt / "iter_0000004" / "rank_00000.pt").exists()
    assert not (ckpt / "iter_0000004" / "rank_00001.pt").exists()
    assert (ckpt / "latest").read_text().strip() == "2"
    resumed = train(tmp_path, "resumed", 2, *flags, "--train-iters", "4", "--load", str(ckpt),
                    port=29712)
    assert [r["iteration"] for r in resumed] == [2, 3]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole[2:]], rel=1e-5)


def test_bf16_trains_near_fp32_and_resumes_from_its_fp32_main_copies(tmp_path):
    """--bf16: chunks compute and stages exchange bf16, Adam steps fp32 main copies. The
    losses follow the fp32 run's (bf16 rounding only), and a resumed run continues with
    the uninterrupted bf16 run's losses exactly (the main copies are in the checkpoint)."""
    flags = ("--pipeline-model-parallel-size", "2", "--lr", "3e-3", "--train-iters", "4")
    fp32 = train(tmp_path, "fp32", 2, *flags, port=29713)
    bf16 = train(tmp_path, "bf16", 2, *flags, "--bf16", port=29714)
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], rel=2e-2)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=1e-3)
    assert [r["loss"] for r in bf16] != [r["loss"] for r in fp32]  # it did run in bf16
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", 2, *flags[:-1], "2", "--bf16", "--save", str(ckpt), port=29715)
    resumed = train(tmp_path, "resumed", 2, *flags, "--bf16", "--load", str(ckpt), port=29716)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in bf16[2:]], rel=1e-6)
