"""The optimizer's state across pipeline layouts, with Megatron-LM's pretrain_vlm.py
through the CPU stand-in (torch-format checkpoints, the non-distributed optimizer).

Megatron's own LLaVA at PP 1 trains 2 of 6 iterations at lr 1e-3 and saves, so Adam's
moments are not trivial; the independent reference is the same script at PP 1 resuming
from that checkpoint with its optimizer. A --pipeweaver run at PP 2 loads the PP-1
checkpoint without --no-load-optim (script_checkpoint.py maps the optimizer state by
parameter name) and must follow the reference per iteration; the same run with
--no-load-optim (weights, iteration and scheduler alike, Adam's moments lost) must not,
so the comparison can fail. A checkpoint Megatron saved at PP 2 resumes under
--pipeweaver as Megatron's own PP-2 resumption does. The --pipeweaver run's checkpoint,
converted to Megatron's PP-2 layout (lm_convert.py), loads into the script without
--pipeweaver, optimizer included, and continues on the reference's trajectory. --bf16
moves the fp32 main parameters too (within Megatron's own bf16 error); the distributed
optimizer's state is refused with the reason. Losses are Megatron's logged "lm
loss" lines (test_megatron_dropin.py's helpers); a process logs its second iteration as
the average of its first two, so runs that resume at the same iteration compare line by
line, and a later start's second line compares with the reference's average.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_lm import TORCHRUN, run, script_env
from test_megatron_dropin import _PORT, LLAVA, PIPEWEAVER, losses, megatron, vlm  # noqa: F401

TRAIN = ["--train-iters", "6", "--eval-iters", "0", "--lr", "1e-3"]
"""Every run's schedule: Megatron's scheduler checks the saved decay steps against it."""


def saved_at_2(vlm: Path, out: Path, *extra: str, procs: int = 1) -> Path:
    """Megatron's own LLaVA (PP 1 unless extra says otherwise): iterations 1 and 2 of 6,
    saved at 2."""
    megatron(vlm, [*LLAVA, *TRAIN, "--pipeline-model-parallel-size", "1", "--exit-interval",
                   "2", "--save", str(out), "--save-interval", "2", *extra], procs=procs)
    return out


@pytest.fixture(scope="module")
def start(vlm, tmp_path_factory) -> Path:
    return saved_at_2(vlm, tmp_path_factory.mktemp("start"))


@pytest.fixture(scope="module")
def reference(vlm, start) -> dict[int, float]:
    """Megatron's PP-1 LLaVA resumed with its optimizer: iterations 3 to 6."""
    return losses(megatron(vlm, [*LLAVA, *TRAIN, "--pipeline-model-parallel-size", "1",
                                 "--load", str(start)]))


@pytest.fixture(scope="module")
def resumed(vlm, start, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """--pipeweaver at PP 2 from the PP-1 checkpoint, optimizer loaded: iterations 3 and
    4, saved at 4. (losses, checkpoint)."""
    saved = tmp_path_factory.mktemp("pipeweaver")
    log = megatron(vlm, [*LLAVA, *PIPEWEAVER, *TRAIN, "--load", str(start), "--exit-interval",
                         "4", "--save", str(saved), "--save-interval", "4"], procs=2)
    return losses(log), saved


def test_pipeweaver_pp2_resumes_megatron_pp1_with_its_optimizer(vlm, start, reference,
                                                                  resumed):
    assert sorted(reference) == [3, 4, 5, 6]
    ours = resumed[0]
    assert sorted(ours) == [3, 4]  # the iteration continues from the checkpoint
    for i in (3, 4):
        assert ours[i] == pytest.approx(reference[i], rel=1e-5), (i, ours, reference)
    # Without Adam's moments the same weights, iteration and scheduler train elsewhere
    # (iteration 3's loss precedes the first update).
    fresh = losses(megatron(vlm, [*LLAVA, *PIPEWEAVER, *TRAIN, "--load", str(start),
                                  "--no-load-optim"], procs=2))
    assert sorted(fresh) == [3, 4, 5, 6]
    assert fresh[3] == pytest.approx(reference[3], rel=1e-5)
    apart = max(abs(fresh[i] - reference[i]) / abs(reference[i]) for i in (4, 5, 6))
    assert apart > 100 * 1e-5, (fresh, reference)

def test_pipeweaver_resumes_a_megatron_pp2_checkpoint_with_its_optimizer(vlm,
                                                                         tmp_path_factory):
    """Any PP: Megatron at PP 2 saves both stages' optimizers (its groups gathered over
    the pipeline); its own PP-2 resumption is the reference."""
    start = saved_at_2(vlm, tmp_path_factory.mktemp("pp2"), "--pipeline-model-parallel-size",
                       "2", procs=2)
    theirs = losses(megatron(vlm, [*LLAVA, *TRAIN, "--pipeline-model-parallel-size", "2",
                                   "--load", str(start)], procs=2))
    ours = losses(megatron(vlm, [*LLAVA, *PIPEWEAVER, *TRAIN, "--load", str(start)], procs=2))
    assert sorted(ours) == sorted(theirs) == [3, 4, 5, 6]
    for i in ours:
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), (i, ours, theirs)


def test_converted_pipeweaver_checkpoint_continues_in_megatron_with_its_optimizer(
        vlm, reference, resumed, tmp_path):
    converted = tmp_path / "megatron"
    done = run(Path(sys.executable).parent / "pipeweaver", "checkpoint", "convert", "--from",
               "pipeweaver", "--to", "megatron", "--load", resumed[1], "--save", converted,
               "--pipeline-model-parallel-size", "2", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert len(result["files"]) == 2 and result["optimizer"] is True
    # Megatron's own PP-2 LLaVA loads model and optimizer (no --no-load-optim) and
    # continues where the reference went after iteration 4.
    log = megatron(vlm, [*LLAVA, *TRAIN, "--pipeline-model-parallel-size", "2", "--load",
                         str(converted)], procs=2)
    assert "load_return" not in log  # no missing or unexpected keys
    continued = losses(log)
    assert sorted(continued) == [5, 6]
    assert continued[5] == pytest.approx(reference[5], rel=1e-5), (continued, reference)
    # Its second line averages iterations 5 and 6; the reference's 6th line is its own.
    assert continued[6] == pytest.approx((reference[5] + reference[6]) / 2, rel=1e-5), \
        (continued, reference)


def test_bf16_optimizer_state_within_megatrons_own_bf16_error(vlm, reference,
                                                              tmp_path_factory):
    """--bf16: Adam's moments and the fp32 main parameters move by name; the tolerance
    is what bf16 costs Megatron itself against fp32 (twice its largest difference)."""
    start = saved_at_2(vlm, tmp_path_factory.mktemp("bf16"), "--bf16")
    theirs = losses(megatron(vlm, [*LLAVA, *TRAIN, "--pipeline-model-parallel-size", "1",
                                   "--load", str(start), "--bf16"]))
    ours = losses(megatron(vlm, [*LLAVA, *PIPEWEAVER, *TRAIN, "--load", str(start), "--bf16"],
                           procs=2))
    assert sorted(ours) == sorted(theirs) == [3, 4, 5, 6]
    # bf16 moves Megatron's losses by ~3e-4 from fp32's; lost moments would move
    # iteration 5 by ~2e-2 (as the fp32 test's --no-load-optim run does).
    allowed = 2 * max(abs(theirs[i] - reference[i]) for i in theirs)
    for i in (3, 4, 5, 6):
        assert abs(ours[i] - theirs[i]) <= allowed, (i, ours, theirs, reference)


def test_the_distributed_optimizer_state_is_refused_with_the_reason(vlm, start):
    done = run(TORCHRUN, "--nproc-per-node", 2, "--master-port", next(_PORT), "-m",
               "pipeweaver_megatron.cpu_standin", vlm, *LLAVA, *PIPEWEAVER, *TRAIN, "--load",
               start, "--use-distributed-optimizer", cwd=vlm.parent, env=script_env(),
               timeout=600)
    assert done.returncode != 0
    assert "--use-distributed-optimizer" in done.stdout + done.stderr
    assert "--no-load-optim" in done.stdout + done.stderr
