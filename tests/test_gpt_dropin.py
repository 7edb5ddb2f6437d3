"""The drop-in on GPT: Megatron-LM's own pretrain_gpt.py with --pipeweaver added, on the
GPT its flags build (megatron-core's GPTModel, captured from the script's own
gpt_builder) and the script's own mock data, inside Megatron's real pretrain(), run on
CPU through the stand-in (python -m pipeweaver_megatron.cpu_standin).

The independent reference is the same script without --pipeweaver at PP 1 in one
process: Megatron's own GPTModel and its no-pipelining schedule. Every run starts from
one checkpoint that the reference saved (one iteration at learning rate 0), dropout
off; --finetune starts from iteration 0 on the same data. At PP 4 the middle stages
read the data too (pretrain_gpt.py's get_batch reads only on the first and last stages
unless the drop-in tells it otherwise).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_lm import LOSS, VALID, logged, patched_script, standin
from pipeweaver_megatron.megatron.examples import TINY_GPT

GPT = [*TINY_GPT, "--eval-interval", "2"]
PIPEWEAVER = ["--pipeweaver", "--pipeweaver-hardware", "cpu", "--pipeweaver-search-budget-ms",
              "100"]
STAGES = re.compile(r"the layout gives each of the (\d+) pipeline ranks")
_PORT = iter(range(29900, 29950))


def megatron(script: Path, flags: list[str], procs: int = 1) -> str:
    """Run a Megatron-LM script through the CPU stand-in; its output."""
    return standin(script, flags, procs, next(_PORT))


def losses(log: str) -> dict[int, float]:
    return logged(LOSS, log)


def validation(log: str) -> dict[int, float]:
    return logged(VALID, log)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> Path:
    """pretrain_gpt.py of a fresh, patched Megatron-LM checkout at core_v0.16.1."""
    return patched_script(tmp_path_factory.mktemp("megatron"), "pretrain_gpt.py")


@pytest.fixture(scope="module")
def start(gpt, tmp_path_factory) -> Path:
    """The reference's checkpoint every run starts from (one iteration at lr 0)."""
    out = tmp_path_factory.mktemp("start")
    megatron(gpt, [*GPT, "--pipeline-model-parallel-size", "1", "--train-iters", "1",
                   "--lr", "0", "--min-lr", "0", "--eval-iters", "0", "--save", str(out),
                   "--save-interval", "1"])
    return out


@pytest.fixture(scope="module")
def reference(gpt, start) -> str:
    """Megatron's own GPT at PP 1 in one process, 4 iterations, evaluated at 2 and 4."""
    return megatron(gpt, [*GPT, "--pipeline-model-parallel-size", "1", "--load", str(start),
                          "--finetune", "--train-iters", "4", "--eval-iters", "1"])


def test_pipeweaver_pp2_reproduces_megatron_pp1_and_resumes_exactly(gpt, start, reference,
                                                                    tmp_path):
    theirs, their_valid = losses(reference), validation(reference)
    assert sorted(theirs) == [1, 2, 3, 4] and sorted(their_valid) == [2, 4]
    assert theirs[4] < theirs[1]  # it trains
    saved = tmp_path / "pipeweaver"
    log = megatron(gpt, [*GPT, *PIPEWEAVER, "--pipeline-model-parallel-size", "2",
                         "--load", str(start), "--finetune", "--train-iters", "4",
                         "--exit-interval", "2", "--eval-iters", "1", "--save", str(saved),
                         "--save-interval", "2"], procs=2)
    assert STAGES.search(log) and STAGES.search(log).group(1) == "2"
    ours = losses(log)
    assert sorted(ours) == [1, 2]
    for i in ours:
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), (i, ours, theirs)
    assert validation(log)[2] == pytest.approx(their_valid[2], rel=1e-5)
    # Resumed under --pipeweaver from its own checkpoint (optimizer, scheduler, iteration
    # and data position restored by Megatron's loader). With --log-interval 1 the second
    # logged loss of a process averages its first two iterations (training.py keeps the
    # first in its running totals).
    second = megatron(gpt, [*GPT, *PIPEWEAVER, "--pipeline-model-parallel-size", "2",
                            "--load", str(saved), "--train-iters", "4", "--eval-iters", "1"],
                      procs=2)
    resumed = losses(second)
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == pytest.approx(theirs[3], rel=1e-5)
    assert resumed[4] == pytest.approx((theirs[3] + theirs[4]) / 2, rel=1e-5)
    assert validation(second)[4] == pytest.approx(their_valid[4], rel=1e-5)


def test_pipeweaver_pp4_reads_the_data_on_the_middle_stages_too(gpt, start, reference):
    theirs = losses(reference)
    log = megatron(gpt, [*GPT, *PIPEWEAVER, "--pipeline-model-parallel-size", "4",
                         "--load", str(start), "--finetune", "--train-iters", "4",
                         "--eval-iters", "0"], procs=4)
    ours = losses(log)
    assert sorted(ours) == [1, 2, 3, 4]
    for i in ours:
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), (i, ours, theirs)
