"""The drop-in: Megatron-LM's own pretrain_vlm.py with --pipeweaver added, on the user's
LLaVA (the script's flags) and the script's own data, inside Megatron's real pretrain()
(get_model, megatron-core DDP and optimizer, train_step, evaluate, checkpoints), run on
CPU through the stand-in (python -m pipeweaver_megatron.cpu_standin).

The independent reference is the same script without --pipeweaver at PP 1 in one
process: Megatron's own LLaVAModel and its no-pipelining schedule. Megatron seeds every
pipeline stage differently, so every run starts from one checkpoint that the reference
saved (one iteration at learning rate 0), with dropout off; --finetune starts from
iteration 0 on the same data. Megatron logs every iteration's "lm loss"; with
--log-interval 1 the second logged loss of a process averages its first two
iterations (training.py keeps the first in its running totals), so a resumed run's
second line is compared with that average.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_lm import LOSS, VALID, logged, patched_script, standin
from pipeweaver_megatron.megatron.examples import TINY_LLAVA

LLAVA = [*TINY_LLAVA, "--eval-interval", "2"]
PIPEWEAVER = ["--pipeweaver", "--pipeline-model-parallel-size", "2", "--pipeweaver-hardware",
              "cpu", "--pipeweaver-search-budget-ms", "100"]
_PORT = iter(range(29850, 29900))


def megatron(script: Path, flags: list[str], procs: int = 1, cwd: Path | None = None) -> str:
    """Run a Megatron-LM script through the CPU stand-in; its output."""
    return standin(script, flags, procs, next(_PORT), cwd=cwd)


def losses(log: str) -> dict[int, float]:
    return logged(LOSS, log)


def validation(log: str) -> dict[int, float]:
    return logged(VALID, log)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    """pretrain_vlm.py of a fresh, patched Megatron-LM checkout at core_v0.16.1."""
    return patched_script(tmp_path_factory.mktemp("megatron"), "pretrain_vlm.py")


@pytest.fixture(scope="module")
def start(vlm, tmp_path_factory) -> Path:
    """The reference's checkpoint every run starts from (one iteration at lr 0)."""
    out = tmp_path_factory.mktemp("start")
    megatron(vlm, [*LLAVA, "--pipeline-model-parallel-size", "1", "--train-iters", "1",
                   "--lr", "0", "--min-lr", "0", "--eval-iters", "0", "--save", str(out),
                   "--save-interval", "1"])
    return out


@pytest.fixture(scope="module")
def reference(vlm, start) -> str:
    """Megatron's own LLaVA at PP 1 in one process, 4 iterations, evaluated at 2 and 4."""
    return megatron(vlm, [*LLAVA, "--pipeline-model-parallel-size", "1", "--load", str(start),
                          "--finetune", "--train-iters", "4", "--eval-iters", "1"])


@pytest.fixture(scope="module")
def first_half(vlm, start, tmp_path_factory) -> tuple[str, Path]:
    """--pipeweaver at PP 2 (V chosen by the wrapper) from Megatron's PP-1 checkpoint:
    2 of 4 iterations, evaluated and saved at iteration 2. (log, checkpoint)."""
    saved = tmp_path_factory.mktemp("pipeweaver")
    log = megatron(vlm, [*LLAVA, *PIPEWEAVER, "--load", str(start), "--finetune",
                         "--train-iters", "4", "--exit-interval", "2", "--eval-iters", "1",
                         "--save", str(saved), "--save-interval", "2"], procs=2)
    return log, saved


def test_pipeweaver_pp2_reproduces_megatron_pp1_and_resumes_exactly(vlm, reference, first_half):
    theirs, their_valid = losses(reference), validation(reference)
    assert sorted(theirs) == [1, 2, 3, 4] and 2 in their_valid
    first, saved = first_half
    assert "--num-virtual-stages-per-pipeline-rank" in first
    ours = losses(first)
    assert sorted(ours) == [1, 2]
    for i in (1, 2):
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), (i, ours, theirs)
    assert validation(first)[2] == pytest.approx(their_valid[2], rel=1e-5)
    # Resumed under --pipeweaver from its own checkpoint (optimizer, scheduler,
    # iteration and data position restored by Megatron's loader).
    second = losses(megatron(vlm, [*LLAVA, *PIPEWEAVER, "--load", str(saved),
                                   "--train-iters", "4", "--eval-iters", "0"], procs=2))
    assert sorted(second) == [3, 4]
    assert second[3] == pytest.approx(theirs[3], rel=1e-5)
    assert second[4] == pytest.approx((theirs[3] + theirs[4]) / 2, rel=1e-5)


def test_pipeweaver_pp2_dp2_reproduces_megatron_pp1(vlm, start, reference):
    """Two data-parallel replicas, each a PP-2 PipeWeaver pipeline planned on its own
    half of every global batch (Megatron's sampler splits it), gradients reduced by
    megatron-core's DDP: the same losses as one process."""
    theirs = losses(reference)
    ours = losses(megatron(vlm, [*LLAVA, *PIPEWEAVER, "--load", str(start), "--finetune",
                                 "--train-iters", "4", "--eval-iters", "0"], procs=4))
    assert sorted(ours) == [1, 2, 3, 4]
    for i in ours:
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), (i, ours, theirs)


def test_bf16_matches_megatron_within_its_own_bf16_error(vlm, start, reference):
    theirs = losses(reference)
    their_bf16 = losses(megatron(vlm, [*LLAVA, "--pipeline-model-parallel-size", "1",
                                       "--load", str(start), "--finetune", "--train-iters", "4",
                                       "--eval-iters", "0", "--bf16"]))
    ours = megatron(vlm, [*LLAVA, *PIPEWEAVER, "--load", str(start), "--finetune",
                          "--train-iters", "4", "--eval-iters", "1", "--bf16",
                          "--use-distributed-optimizer"], procs=2)
    bf16 = losses(ours)
    assert sorted(bf16) == [1, 2, 3, 4] and all(math.isfinite(v) for v in bf16.values())
    assert bf16[4] < bf16[1] and validation(ours)
    # The tolerance is what bf16 costs Megatron itself against fp32, per iteration.
    for i in (1, 2, 3, 4):
        allowed = max(abs(their_bf16[i] - theirs[i]), 1e-6) * 2
        assert abs(bf16[i] - their_bf16[i]) <= allowed, (i, bf16, their_bf16, theirs)


