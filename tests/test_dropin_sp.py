"""The drop-in with --sequence-parallel: Megatron-LM's own pretrain_vlm.py with
--pipeweaver at TP 2 and PP 2 on 4 processes (CPU stand-in), the LM's sequence sharded
over TP as LLaVAModel shards it (models/llava.py, [Note: LLaVA sequence parallelism]).

The reference is the same script without --pipeweaver at TP 2 and PP 1 on 2 processes:
Megatron's own LLaVAModel and schedule. Megatron-LM cannot run its own LLaVA with
--sequence-parallel off Transformer Engine, so the reference runs without it:
LLaVAModel.__init__ asserts that the LM's core attention is TEDotProductAttention
under sequence (or context) parallelism (without Transformer Engine installed the
check itself raises NameError: name 'TEDotProductAttention' is not defined), and
pretrain_vlm.py's get_batch then hands the model packed_seq_params, which megatron-core's
local DotProductAttention asserts are None. In fp32, sequence parallelism changes
nothing but the order of a few sums (the norms' gradients are summed per shard, then
all-reduced), so the reference's losses are the ones to reproduce; the chunk-level
test (tests/test_llava_chunks.py) compares the sharded LM with megatron-core's own
LLaVAModel under sequence parallelism, gradient shard by shard.

--seq-length is 63 so that both runs build the same model: the LM sequence is the
mock sample's 63 text tokens and its image's 17 embeddings, 80 (model_provider's
decoder_seq_length, --seq-length + 17), which divides by TP, so neither
model_provider nor get_batch pads (at 64, --sequence-parallel would give the position
embeddings 82 rows, and the reference's checkpoint would not load).
The padded case runs in tests/test_llava_chunks.py. Every run starts from the
reference's checkpoint saved at learning rate 0, with --finetune (see
test_megatron_dropin.py). Both runs evaluate (--eval-iters 1 at iterations 2 and 4,
and on the test set after training): at TP 2 the script's get_batch reads on one TP
rank and broadcasts, so the evaluation may read nothing beyond its own steps.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from megatron_lm import LOSS, VALID, logged, patched_script, run, script_env, standin
from pipeweaver_megatron.megatron.examples import TINY_LLAVA

LLAVA = [*TINY_LLAVA, "--seq-length", "63", "--eval-interval", "2",
         "--tensor-model-parallel-size", "2"]
PIPEWEAVER = ["--pipeweaver", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
              "--pipeweaver-hardware", "cpu", "--pipeweaver-search-budget-ms", "100"]
TEST = re.compile(r"validation loss at iteration (\d+) on test set \| lm loss value: "
                  r"([0-9.E+-]+)")
SP_ON = "> Disabling Sequence parallelism in Vision Transformer"
"""pretrain_vlm.py's model_provider prints this when the LM config it copies is
sequence-parallel."""
_PORT = iter(range(29770, 29790))


def megatron(script: Path, flags: list[str], procs: int) -> str:
    """Run a Megatron-LM script through the CPU stand-in; its output."""
    return standin(script, flags, procs, next(_PORT), timeout=300)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    """pretrain_vlm.py of a fresh, patched Megatron-LM checkout at core_v0.16.1."""
    return patched_script(tmp_path_factory.mktemp("megatron"), "pretrain_vlm.py")


@pytest.fixture(scope="module")
def start(vlm, tmp_path_factory) -> Path:
    """The reference's TP-2 checkpoint every run starts from (one iteration at lr 0)."""
    out = tmp_path_factory.mktemp("start")
    megatron(vlm, [*LLAVA, "--pipeline-model-parallel-size", "1", "--train-iters", "1",
                   "--lr", "0", "--min-lr", "0", "--eval-iters", "0", "--save", str(out),
                   "--save-interval", "1"], procs=2)
    return out


def test_sequence_parallel_tp2_pp2_reproduces_megatron_tp2(vlm, start):
    """--pipeweaver --sequence-parallel at TP 2 PP 2 (the script built its LM config
    sequence-parallel, the layout has virtual stages) gives Megatron's TP-2 losses of
    all 4 iterations, its validation losses and its test-set loss."""
    common = [*LLAVA, "--load", str(start), "--finetune", "--train-iters", "4",
              "--eval-iters", "1"]
    theirs = megatron(vlm, [*common, "--pipeline-model-parallel-size", "1"], procs=2)
    ours = megatron(vlm, [*common, *PIPEWEAVER], procs=4)
    assert SP_ON in ours and SP_ON not in theirs
    assert "--num-virtual-stages-per-pipeline-rank" in ours
    want, got = logged(LOSS, theirs), logged(LOSS, ours)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for i in want:
        assert got[i] == pytest.approx(want[i], rel=1e-5), (i, got, want)
    assert got[4] < got[1]
    for pattern, steps in ((VALID, [2, 4]), (TEST, [4])):
        want, got = logged(pattern, theirs), logged(pattern, ours)
        assert sorted(want) == sorted(got) == steps, (pattern.pattern, want, got)
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-5), (i, got, want)


PROBE = r'''
import json, sys
sys.argv = ["pretrain_vlm.py", *json.loads(sys.argv[1])]
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
from megatron.training.arguments import parse_args, validate_args
from megatron.training.global_vars import set_global_variables
import pretrain_vlm
from pipeweaver_megatron.megatron.arguments import chain_args
from pipeweaver_megatron.megatron.model_args import planning_spec
args = parse_args(chain_args(pretrain_vlm.add_vlm_extra_args))
planned = planning_spec(args)
validate_args(args, {})
set_global_variables(args, build_tokenizer=False)
try:  # sets args.decoder_seq_length, then fails building LLaVAModel without parallel_state
    pretrain_vlm.model_provider()
except AssertionError:
    pass
print("RESULT " + json.dumps([planned.parallel.microbatch_tokens, args.decoder_seq_length,
                              planned.parallel.sequence_parallel]))
'''


@pytest.mark.parametrize("extra", [["--sequence-parallel"], ["--sequence-parallel",
                                                             "--seq-length", "63"], []])
def test_the_planned_lm_sequence_is_the_one_pretrain_vlm_pads_for_sp(vlm, tmp_path, extra):
    """The spec the layout is cut with (model_args.planning_spec, from the flags alone)
    holds the LM sequence pretrain_vlm.py's own model_provider sets --decoder-seq-length
    to (under --sequence-parallel at TP 2: padded to a multiple of 2), and its
    sequence_parallel follows the flag."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    flags = [*TINY_LLAVA, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
             "2", "--train-iters", "2", "--pipeweaver", *extra]
    done = run(sys.executable, "-m", "pipeweaver_megatron.cpu_standin", probe, json.dumps(flags),
               cwd=vlm.parent, env=script_env(PYTHONPATH=str(vlm.parent), WORLD_SIZE="4",
                                              RANK="0"), timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    planned, built, sequence_parallel = json.loads(lines[-1][len("RESULT "):])
    assert planned == built
    assert sequence_parallel == bool(extra)
