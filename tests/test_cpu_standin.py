"""The CPU stand-in (python -m pipeweaver_megatron.cpu_standin) on real processes.

Megatron-LM's own, unpatched pretrain_vlm.py and pretrain_gpt.py (a fresh checkout at
core_v0.16.1) run through Megatron's real pretrain() on gloo: LLaVA at PP 2 in bf16 on two
processes and at PP 1 in fp32 on one, GPT with the distributed optimizer at DP 2. The checks
read Megatron's own log lines (``iteration N/M | ... lm loss: X |`` and ``validation loss at
iteration N | lm loss value: X``).

Resuming is compared like with like: a run saves every 2 iterations; a second run loads its
iteration-2 checkpoint (--ckpt-step 2) and trains iterations 3 and 4. Megatron logs each
process's first iteration without resetting its running totals, so the resumed run's
iteration-4 value is the mean of its iterations 3 and 4, while the first run logs iterations
3 and 4 on their own; iteration 3 and the validation losses must match to the printed digit.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from megatron_lm import TORCHRUN, fresh_checkout, run, script_env

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ("-m", "pipeweaver_megatron.cpu_standin")
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|[^\n]*? lm loss: ([0-9.eE+-]+) \|")
VALIDATION = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.eE+-]+)")
# torchrun and one-process launches must not inherit a rendezvous from the test's shell.
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# The smallest runs that still exercise a stage boundary, a vision encoder and evaluation.
VLM = ("--encoder-num-layers", 2, "--decoder-num-layers", 4, "--hidden-size", 64,
       "--ffn-hidden-size", 128, "--num-attention-heads", 4, "--seq-length", 64,
       "--decoder-seq-length", 128, "--max-position-embeddings", 256, "--img-h", 64,
       "--img-w", 64, "--patch-dim", 16, "--micro-batch-size", 1, "--global-batch-size", 4,
       "--tokenizer-type", "NullTokenizer", "--vocab-size", 512, "--transformer-impl", "local",
       "--ckpt-format", "torch", "--log-interval", 1, "--mock-data", "--num-workers", 0,
       "--eval-iters", 1)
GPT = ("--num-layers", 2, "--hidden-size", 64, "--ffn-hidden-size", 128,
       "--num-attention-heads", 4, "--seq-length", 64, "--max-position-embeddings", 64,
       "--micro-batch-size", 2, "--global-batch-size", 8, "--lr", "1e-3",
       "--tokenizer-type", "NullTokenizer", "--vocab-size", 512, "--transformer-impl", "local",
       "--mock-data", "--num-workers", 0, "--log-interval", 1, "--eval-iters", 1,
       "--eval-interval", 2)


@pytest.fixture(scope="module")
def megatron(tmp_path_factory) -> Path:
    """One pristine checkout for the module (its dataset helpers get built on first use)."""
    return fresh_checkout(tmp_path_factory.mktemp("cpu-standin") / "megatron-lm")


def _env() -> dict[str, str]:
    env = script_env(PYTHONPATH=str(ROOT))
    for key in RENDEZVOUS:
        env.pop(key, None)
    return env


def standin(script: Path, *args, nproc: int = 1, cwd: Path, timeout: int = 240):
    """Run ``script args`` on the stand-in: on torchrun for nproc > 1, else one process."""
    if nproc > 1:
        cmd = (TORCHRUN, "--standalone", "--nproc-per-node", nproc, *STANDIN, script, *args)
    else:
        cmd = (sys.executable, *STANDIN, script, *args)
    return run(*cmd, cwd=cwd, env=_env(), timeout=timeout)


def _ok(done) -> str:
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- stdout (tail)\n{done.stdout[-3000:]}\n"
        f"--- stderr (tail)\n{done.stderr[-6000:]}")
    return done.stdout


def losses(stdout: str) -> dict[int, str]:
    """Logged training loss per iteration, as printed."""
    return {int(it): value for it, value in ITERATION.findall(stdout)}


def validation(stdout: str) -> dict[int, str]:
    """Validation loss per evaluation iteration, as printed (final evaluations excluded)."""
    found: dict[int, str] = {}
    for it, value in VALIDATION.findall(stdout):
        found.setdefault(int(it), value)
    return found


def assert_resumed_exactly(first: str, resumed: str) -> None:
    """The resumed run (iterations 3-4 from the first run's iteration-2 checkpoint)
    reproduces the first run's iterations 3-4 and its iteration-4 evaluation."""
    a, b = losses(first), losses(resumed)
    assert sorted(a) == [1, 2, 3, 4], f"first run logged iterations {sorted(a)}"
    assert sorted(b) == [3, 4], f"resumed run logged iterations {sorted(b)} (did it load?)"
    assert all(math.isfinite(float(v)) for v in (*a.values(), *b.values())), (a, b)
    assert b[3] == a[3], f"iteration 3: resumed {b[3]} != uninterrupted {a[3]}"
    mean = (float(a[3]) + float(a[4])) / 2
    assert abs(float(b[4]) - mean) <= 2e-6, f"iteration 4: resumed mean {b[4]} != {mean:.6E}"
    va, vb = validation(first), validation(resumed)
    assert 4 in va and 4 in vb, f"no iteration-4 evaluation: {va}, {vb}"
    assert vb[4] == va[4], f"validation at 4: resumed {vb[4]} != uninterrupted {va[4]}"


def test_llava_pp2_bf16_trains_evaluates_and_resumes_exactly(megatron: Path, tmp_path: Path):
    script, ckpt = megatron / "pretrain_vlm.py", tmp_path / "ckpt"
    args = (*VLM, "--pipeline-model-parallel-size", 2, "--bf16", "--train-iters", 4,
            "--lr", "3e-3", "--lr-decay-style", "constant", "--eval-interval", 2)
    first = _ok(standin(script, *args, "--save", ckpt, "--save-interval", 2, nproc=2,
                        cwd=tmp_path))
    assert "pipeline-model-parallel size: 2" in first
    assert "using torch.bfloat16 for parameters" in first
    for stage in ("mp_rank_00_000", "mp_rank_00_001"):  # one checkpoint file per stage
        assert (ckpt / "iter_0000002" / stage / "model_optim_rng.pt").is_file(), stage
    a = losses(first)
    assert float(a[4]) < float(a[1]), f"bf16 loss did not fall: {a}"
    assert sorted(validation(first)) == [2, 4]
    resumed = _ok(standin(script, *args, "--load", ckpt, "--ckpt-step", 2, nproc=2,
                          cwd=tmp_path))
    assert f"loading checkpoint from {ckpt} at iteration 2" in resumed
    assert_resumed_exactly(first, resumed)


def test_gpt_distributed_optimizer_torch_dist_resumes_exactly(megatron: Path, tmp_path: Path):
    script, ckpt = megatron / "pretrain_gpt.py", tmp_path / "ckpt"
    args = (*GPT, "--use-distributed-optimizer", "--bf16", "--train-iters", 4,
            "--ckpt-format", "torch_dist")
    first = _ok(standin(script, *args, "--save", ckpt, "--save-interval", 2, nproc=2,
                        cwd=tmp_path))
    assert "data-parallel size: 2" in first
    assert re.search(r"use_distributed_optimizer \.+ True", first)
    assert (ckpt / "iter_0000002" / ".metadata").is_file()  # a torch_dist checkpoint
    resumed = _ok(standin(script, *args, "--load", ckpt, "--ckpt-step", 2, nproc=2,
                          cwd=tmp_path))
    assert f"loading distributed checkpoint from {ckpt} at iteration 2" in resumed
    assert_resumed_exactly(first, resumed)


PROBE = """\
import json, os, sys
import sibling  # found in this script's folder, not in the working directory
import torch, torch.distributed as dist
dist.init_process_group("nccl")
group = dist.new_group([0], backend="cpu:gloo,cuda:nccl")
x = torch.ones(2, device="cuda").cuda()
dist.all_reduce(x, group=group)
print(json.dumps({
    "name": __name__, "argv": sys.argv, "path0": sys.path[0], "sibling": sibling.WHERE,
    "cuda": torch.cuda.is_available(), "device": str(x.device),
    "backend": dist.get_backend(), "group_backend": dist.get_backend(group),
    "type": x.type(), "rank": os.environ["RANK"], "world": os.environ["WORLD_SIZE"],
    "connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}))
sys.exit(3)
"""


def test_runs_the_script_as_main_with_its_folder_first_and_argv(tmp_path: Path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    (folder / "sibling.py").write_text("WHERE = 'script folder'\n")
    (tmp_path / "sibling.py").write_text("WHERE = 'working directory'\n")
    given = os.path.join("scripts", "probe.py")
    done = standin(Path(given), "--flag", "value", "two words", cwd=tmp_path, timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]  # the script's own exit status
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["name"] == "__main__"
    assert report["argv"] == [given, "--flag", "value", "two words"]
    assert report["path0"] == str(folder.resolve()) and report["sibling"] == "script folder"
    assert report["cuda"] is True and report["device"] == "cpu"
    assert report["backend"] == "gloo" and report["group_backend"] == "gloo"
    assert report["type"] == "torch.cuda.FloatTensor"
    assert (report["rank"], report["world"], report["connections"]) == ("0", "1", "1")


def test_missing_script_is_a_one_line_error(tmp_path: Path):
    missing = tmp_path / "no" / "pretrain_vlm.py"
    done = standin(missing, "--mock-data", cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], done.stderr
