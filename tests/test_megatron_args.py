"""The --pipeweaver flags and install(): composable with Megatron's extra_args_provider,
and Megatron's own forward_backward function restored when not installed."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

import pipeweaver_megatron
from pipeweaver_megatron.megatron import install, uninstall


def parse(*argv: str, provider=None):
    parser = (provider or pipeweaver_megatron.chain_args())(argparse.ArgumentParser())
    return parser.parse_args(list(argv))


def test_defaults_leave_pipeweaver_off():
    args = parse()
    assert not args.pipeweaver and args.pipeweaver_schedule == "pipeweaver"
    assert args.pipeweaver_lookahead >= 1 and args.pipeweaver_inject_fault == []


def test_flags_parse_and_compose_with_another_provider():
    def megatron_like(parser):
        parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
        return parser

    args = parse("--pipeweaver", "--pipeweaver-model-config", "tiny-vlm",
                 "--pipeweaver-schedule", "megatron-1f1b", "--pipeweaver-lookahead", "3",
                 "--pipeweaver-inject-fault", "planner-hang@4",
                 "--pipeweaver-inject-fault", "bad-plan@7", "--pipeline-model-parallel-size", "2",
                 provider=pipeweaver_megatron.chain_args(megatron_like))
    assert args.pipeweaver and args.pipeweaver_model_config == "tiny-vlm"
    assert args.pipeline_model_parallel_size == 2 and args.pipeweaver_lookahead == 3
    assert args.pipeweaver_inject_fault == [("planner-hang", 4), ("bad-plan", 7)]


@pytest.mark.parametrize("bad", ["planner-crash", "crash@3", "bad-plan@x"])
def test_bad_fault_specs_are_rejected(bad, capsys):
    with pytest.raises(SystemExit):
        parse("--pipeweaver-inject-fault", bad)
    assert "expected one of planner-crash" in capsys.readouterr().err


def test_adding_the_flags_imports_no_torch():
    code = ("import sys, argparse, pipeweaver_megatron\n"
            "pipeweaver_megatron.add_arguments(argparse.ArgumentParser())\n"
            "sys.exit(any(m.split('.')[0] in ('torch', 'megatron') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_install_rebinds_megatron_core_and_uninstall_restores():
    from megatron.core import pipeline_parallel
    from megatron.core.pipeline_parallel import schedules

    original = pipeline_parallel.get_forward_backward_func
    marker = object()
    try:
        rebound = install(marker)
        assert "megatron.core.pipeline_parallel" in rebound
        assert pipeline_parallel.get_forward_backward_func() is marker
        assert schedules.get_forward_backward_func(pp_size=2, vp_size=None) is marker
    finally:
        uninstall()
    assert pipeline_parallel.get_forward_backward_func is original
    assert pipeline_parallel.get_forward_backward_func.__module__ == schedules.__name__


def test_install_also_rebinds_megatron_training():
    """On Megatron-LM's sources (tests/megatron_lm.py: MEGATRON_LM_DIR, or core_v0.16.1
    unpacked by make), whose megatron.training imports with the .[megatron-lm] extra."""
    import megatron

    from megatron_lm import source

    megatron.__path__.append(os.path.join(str(source()), "megatron"))
    import megatron.training.training as training

    try:
        assert "megatron.training.training" in install(marker := object())
        assert training.get_forward_backward_func() is marker
    finally:
        uninstall()


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "2"], "one packed sequence"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (["--use-distributed-optimizer", "--save", "ckpt"], "sharded state"),
])
def test_pretrain_rejects_flags_it_cannot_honour(flags, message, capsys):
    from pipeweaver_megatron.megatron.pretrain import parse as parse_pretrain

    with pytest.raises(SystemExit):
        parse_pretrain(["--pipeweaver", "--pipeweaver-model-config", "tiny-vlm", *flags])
    assert message in capsys.readouterr().err


def test_run_flags_override_the_spec_and_bad_ones_name_file_and_key():
    from pipeweaver_megatron.config import ConfigError, load_model

    model = load_model("tiny-vlm", {"pp": 2, "dp": 2, "global_batch_size": 6,
                                    "microbatch_tokens": 512})
    assert (model.parallel.num_microbatches, model.parallel.microbatch_tokens) == (3, 512)
    with pytest.raises(ConfigError, match=r"tiny-vlm.yaml: parallel.global_batch_size: 6 is "
                                          r"not divisible by dp=4"):
        load_model("tiny-vlm", {"dp": 4, "global_batch_size": 6})
    with pytest.raises(ConfigError, match=r"tiny-vlm.yaml: parallel: unknown settings \['ppp'\]"):
        load_model("tiny-vlm", {"ppp": 2})
