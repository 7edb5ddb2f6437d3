"""Megatron-LM patches (patches/*.patch, scripts/apply_patches.sh) and the providers
behind them (pipeweaver_megatron/megatron/providers.py).

- The patches parse and touch pretrain_gpt.py and pretrain_vlm.py only, a few lines each.
- On Megatron-LM's sources (tests/megatron_lm.py: MEGATRON_LM_DIR, or core_v0.16.1
  unpacked from ../shared/third_party; never skipped): the script applies them to a
  fresh copy at core_v0.16.1, says "already applied" the second time, refuses conflicts
  and other commits, and the patched scripts compile; megatron.training imports (the
  .[megatron-lm] extra), both scripts parse the --pipeweaver flags with Megatron's own
  parser and hand pretrain our providers, and the patched pretrain_vlm.py trains 2 ranks
  on CPU through them.
- The providers on real megatron-core chunks (CPU, gloo): virtual stages map onto the
  layout, model_provider builds each stage's chunk, the dataset provider yields the
  workload's microbatches, and 2 ranks trained through Megatron-core's
  get_forward_backward_func (install()) have the losses of scripts/pretrain_lmm.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lm import fresh_checkout
from pipeweaver_megatron.megatron import arguments, providers

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("*.patch"))
APPLY = ROOT / "scripts" / "apply_patches.sh"
SCRIPTS = {"pretrain_gpt.py", "pretrain_vlm.py"}
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.filterwarnings("ignore")


def run(*cmd, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def numstat(patch: Path, cwd: Path) -> list[tuple[int, int, str]]:
    done = run("git", "apply", "--numstat", patch, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return [(int(a), int(d), path) for a, d, path in
            (line.split("\t") for line in done.stdout.splitlines())]


# ---- the patch files -------------------------------------------------------------------

def test_patches_parse_and_touch_only_the_two_scripts(tmp_path):
    assert [p.name[:5] for p in PATCHES] == ["0001-", "0002-"]
    touched = set()
    for patch in PATCHES:
        stats = numstat(patch, tmp_path)
        assert all(deleted == 0 and 0 < added <= 8 for added, deleted, _ in stats), stats
        touched |= {path for _, _, path in stats}
    assert touched == SCRIPTS


def test_apply_refuses_what_is_not_a_checkout_at_the_tag(tmp_path):
    done = run("bash", APPLY, tmp_path)
    assert done.returncode == 2 and "not a git checkout" in done.stderr
    run("git", "init", "-q", tmp_path)
    (tmp_path / "pretrain_vlm.py").write_text("print()\n")
    run("git", "-C", tmp_path, "add", ".")
    run("git", "-C", tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    done = run("bash", APPLY, tmp_path)
    assert done.returncode == 2 and "not Megatron-LM core_v0.16.1" in done.stderr
    assert run("bash", APPLY).returncode == 2


# ---- a Megatron-LM checkout ------------------------------------------------------------

@pytest.fixture
def checkout(tmp_path) -> Path:
    """A fresh Megatron-LM working tree at core_v0.16.1 (tests/megatron_lm.py: the
    MEGATRON_LM_DIR checkout, or the one make unpacks from ../shared/third_party)."""
    return fresh_checkout(tmp_path / "Megatron-LM")


def test_apply_twice_then_compile(checkout):
    first = run("bash", APPLY, checkout)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(": applied") == len(PATCHES)
    changed = run("git", "-C", checkout, "diff", "--numstat").stdout.split()
    assert set(changed[2::3]) == SCRIPTS
    second = run("bash", APPLY, checkout)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already applied") == len(PATCHES) + 1
    for script in sorted(SCRIPTS):
        done = run(sys.executable, "-m", "py_compile", checkout / script)
        assert done.returncode == 0, done.stderr


def test_a_conflict_changes_nothing(checkout):
    vlm = checkout / "pretrain_vlm.py"
    line = "    train_valid_test_datasets_provider.is_distributed"
    vlm.write_text(vlm.read_text().replace(line, line + " "))
    done = run("bash", APPLY, checkout)
    assert done.returncode == 1
    assert "0002-pretrain_vlm-pipeweaver.patch does not apply" in done.stderr
    assert run("git", "-C", checkout, "diff", "--name-only").stdout.split() == ["pretrain_vlm.py"]


def megatron_env(checkout: Path) -> dict[str, str]:
    paths = [str(checkout), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def patched(checkout) -> Path:
    """The patched checkout, where megatron.training imports (make venv installs what
    Megatron-LM's training loop needs: the .[megatron-lm] extra)."""
    assert run("bash", APPLY, checkout).returncode == 0
    done = run(sys.executable, "-c", "import megatron.training.training", cwd=checkout,
               env=megatron_env(checkout), timeout=300)
    assert done.returncode == 0, ("megatron.training does not import (pip install -e "
                                  "'.[megatron-lm]'): " + done.stderr[-2000:])
    return checkout


HARNESS = Path(__file__)  # run as a script: the harness at the end of this file
FLAGS = ("--num-layers", "8", "--hidden-size", "128", "--num-attention-heads", "4",
         "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "1",
         "--global-batch-size", "8", "--train-iters", "2", "--lr", "3e-3",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "2048",
         "--transformer-impl", "local", "--calculate-per-token-loss", "--seed", "1234")
PIPEWEAVER = ("--pipeweaver", "--pipeweaver-model-config", "tiny-vlm",
              "--pipeweaver-search-budget-ms", "100", "--eval-iters", "0")


@pytest.mark.parametrize("script", ["pretrain_vlm.py"])  # pretrain_gpt.py: test_gpt_dropin runs it
def test_patched_scripts_parse_the_flags_with_megatrons_parser(patched, script):
    def parse(*flags: str) -> dict:
        done = run(sys.executable, HARNESS, "parse", script, *FLAGS, *flags, cwd=patched,
                   env={**megatron_env(patched), "WORLD_SIZE": "2"}, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT "):])

    # No --num-virtual-stages-per-pipeline-rank: the wrapped parser cuts the run's layout
    # and sets it before validate_args.
    ours = parse(*PIPEWEAVER, "--pipeline-model-parallel-size", "2")
    per_rank = int(stages_per_rank())
    assert ours == {"pipeweaver": True, "ours": True,
                    "vp": per_rank if per_rank > 1 else None,
                    "dataloader_type": "external", "forward_backward": "forward_backward"}
    assert parse(*PIPEWEAVER, "--pipeline-model-parallel-size", "2",
                 "--num-virtual-stages-per-pipeline-rank", str(per_rank)) == ours
    theirs = parse("--pipeline-model-parallel-size", "2")
    assert theirs == {"pipeweaver": False, "ours": False, "vp": None,
                      "dataloader_type": "single", "forward_backward": "get_forward_backward_func"}


def test_a_virtual_stage_count_against_the_layout_is_refused_before_anything_runs(patched):
    wrong = str(int(stages_per_rank()) + 1)
    done = run(sys.executable, HARNESS, "parse", "pretrain_vlm.py", *FLAGS, *PIPEWEAVER,
               "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank",
               wrong, cwd=patched, env={**megatron_env(patched), "WORLD_SIZE": "2"}, timeout=300)
    assert done.returncode != 0
    assert (f"--num-virtual-stages-per-pipeline-rank {wrong}: the run's layout gives every "
            f"pipeline rank {stages_per_rank()} stages") in done.stderr


def stages_per_rank() -> str:
    """Chunks per rank of the run the two-rank tests start (the planner service cuts the
    same layout from the same first batch): their --num-virtual-stages-per-pipeline-rank."""
    from pipeweaver_megatron.config import get_hardware, load_model
    from pipeweaver_megatron.planner import partition
    from pipeweaver_megatron.semu import CostModel
    from pipeweaver_megatron.workload import sample_workload

    model = load_model("tiny-vlm", {"tp": 1, "pp": 2, "dp": 1, "global_batch_size": 8,
                                    "microbatch_tokens": 256})
    costs = CostModel(model, get_hardware(model.hardware), tp=1)
    first = sample_workload(model, None, 1, 1234000)[0]
    layout = partition(costs, num_ranks=2, reference=first).layout
    return str(len(layout.stages_of_rank(0)))


def reference_losses(tmp_path: Path, port: int, iterations: int) -> list[float]:
    log = tmp_path / "reference.jsonl"
    done = run(TORCHRUN, "--nproc-per-node", "2", "--master-port", port,
               ROOT / "scripts" / "pretrain_lmm.py", "--pipeweaver", "--pipeweaver-model-config",
               "tiny-vlm", "--pipeline-model-parallel-size", "2", "--train-iters", iterations,
               "--lr", "3e-3", "--seed", "1234", "--global-batch-size", "8", "--seq-length", "256",
               "--transformer-impl", "local", "--pipeweaver-search-budget-ms", "100",
               "--pipeweaver-log", log, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_patched_vlm_runs_the_yaml_model_in_megatrons_own_pretrain(patched, tmp_path):
    """--pipeweaver-model-config under Megatron's real pretrain() (CPU stand-in): its
    first loss, before any optimizer step, is the loss scripts/pretrain_lmm.py computes
    for the same chunks (same seeds) on the same first batch; Megatron's own optimizer
    and schedule then train it."""
    done = run(TORCHRUN, "--nproc-per-node", "2", "--master-port", 29741, "-m",
               "pipeweaver_megatron.cpu_standin", patched / "pretrain_vlm.py", *FLAGS,
               *PIPEWEAVER, "--train-iters", "3", "--eval-interval", "3",
               "--pipeline-model-parallel-size", "2", "--log-interval", "1",
               cwd=tmp_path, env=megatron_env(patched), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = [float(v) for v in re.findall(r"\| loss: ([0-9.E+-]+)", done.stdout)]
    assert len(logged) == 3 and logged[2] < logged[0], logged
    assert logged[0] == pytest.approx(reference_losses(tmp_path, 29742, 1)[0], rel=1e-5)


# ---- the providers on megatron-core alone ------------------------------------------------

def test_requested_reads_the_command_line():
    assert providers.requested(["--lr", "1", "--pipeweaver"])
    assert not providers.requested(["--pipeweaver-model-config", "tiny-vlm"])


def test_with_pipeweaver_chains_the_flags_and_swaps_in_the_providers(monkeypatch):
    from megatron.core import pipeline_parallel

    original = pipeline_parallel.get_forward_backward_func
    seen = {}

    def pretrain(datasets, model, model_type, step, *rest, extra_args_provider=None,
                 args_defaults=None, get_embedding_ranks=None, **kwargs):
        parser = extra_args_provider(argparse.ArgumentParser())
        seen.update(datasets=datasets, model=model, step=step, defaults=args_defaults,
                    ranks=get_embedding_ranks,
                    flags=parser.parse_args(["--freeze", "--pipeweaver"]),
                    getter=pipeline_parallel.get_forward_backward_func)

    def theirs(parser):
        parser.add_argument("--freeze", action="store_true")
        return parser

    wrapped = providers.with_pipeweaver(pretrain)
    monkeypatch.setattr(sys, "argv", ["pretrain_vlm.py", "--freeze"])
    wrapped("data", "model", "type", "step", extra_args_provider=theirs, args_defaults={"a": 1})
    assert (seen["datasets"], seen["model"], seen["step"]) == ("data", "model", "step")
    assert seen["flags"].freeze and seen["flags"].pipeweaver and seen["getter"] is original
    monkeypatch.setattr(sys, "argv", ["pretrain_vlm.py", "--pipeweaver",
                                      "--pipeweaver-model-config", "tiny-vlm"])
    wrapped("data", "model", "type", "step", extra_args_provider=theirs, args_defaults={"a": 1})
    assert seen["model"] is providers.model_provider and seen["step"] is providers.forward_step
    assert seen["datasets"] is providers.train_valid_test_datasets_provider
    assert seen["defaults"] == {"a": 1, "dataloader_type": "external"}
    assert seen["getter"]() is providers.forward_backward and seen["ranks"]([4, 5, 6]) == [4]
    assert pipeline_parallel.get_forward_backward_func is original  # uninstalled after


def megatron_like(**overrides) -> argparse.Namespace:
    args = arguments.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--pipeweaver", "--pipeweaver-model-config", "tiny-vlm"])
    fields = dict(train_iters=2, eval_iters=0, dataloader_type="external", fp16=False,
                  bf16=False, context_parallel_size=1, sequence_parallel=False,
                  rampup_batch_size=None, micro_batch_size=1, global_batch_size=8,
                  seq_length=None, data_parallel_size=1, seed=1234, iteration=0,
                  pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3,
                  tensor_model_parallel_size=1, transformer_impl="local")
    fields.update(overrides)
    for key, value in fields.items():
        setattr(args, key, value)
    return args


def test_check_args_names_every_problem():
    providers.check_args(megatron_like())
    with pytest.raises(providers.ProviderError) as error:
        providers.check_args(megatron_like(eval_iters=10, dataloader_type="single", bf16=True,
                                           micro_batch_size=2))
    text = str(error.value)
    for flag in ("--eval-iters 0", "--dataloader-type external", "--bf16", "--micro-batch-size 1"):
        assert flag in text


@pytest.fixture(scope="module")
def layout():
    from pipeweaver_megatron.config import get_hardware, load_model
    from pipeweaver_megatron.planner import partition
    from pipeweaver_megatron.semu import CostModel

    model = load_model("tiny-vlm")
    return model, partition(CostModel(model, get_hardware(model.hardware)), num_ranks=2).layout


def test_virtual_stage_v_of_rank_r_is_stage_v_times_p_plus_r(layout):
    _, lay = layout
    per_rank = len(lay.stages_of_rank(0))
    assert per_rank > 1 and all(len(lay.stages_of_rank(r)) == per_rank for r in range(2))
    for rank in range(2):
        for v in range(per_rank):
            assert providers.stage_of(lay, rank, v, per_rank, 2).index == v * 2 + rank
    with pytest.raises(providers.VirtualStageError,
                       match=f"pass --num-virtual-stages-per-pipeline-rank {per_rank}"):
        providers.stage_of(lay, 0, 0, 1, 2)
    with pytest.raises(providers.VirtualStageError, match="PP >= 2"):
        providers.stage_of(lay, 0, None, 1, 1)
    args = megatron_like(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=3)
    assert providers.megatron_chunks(args) == 1
    assert providers.megatron_chunks(megatron_like()) == 3


def test_every_loss_head_of_a_partitioned_layout_is_on_the_last_rank(layout):
    model, lay = layout
    assert providers.loss_ranks(model, lay) == {1}


@pytest.fixture
def one_process(layout, monkeypatch):
    """Rank 0 of the PP-2 layout in one gloo process, and Megatron-like arguments."""
    torch = pytest.importorskip("torch")
    from pipeweaver_megatron.models import init_single_process, teardown
    from pipeweaver_megatron.workload import TokenRules, sample_workload

    model, lay = layout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_single_process(seed=1234)
    run_state = providers.Run(model=model, rules=TokenRules.from_model(model), layout=lay,
                              batches=sample_workload(model, None, 2, 1234000), pipeline_rank=0,
                              tp=1, seed=1234, device=torch.device("cpu"), use_te=False)
    monkeypatch.setattr(providers, "_RUN", run_state)
    args = megatron_like(virtual_pipeline_model_parallel_size=len(lay.stages_of_rank(0)))
    monkeypatch.setattr(providers, "megatron_args", lambda: args)
    yield run_state
    teardown()
    torch.set_num_threads(threads)


def test_model_provider_builds_each_virtual_stage_chunk(one_process):
    from pipeweaver_megatron.models import stage_chunk

    lay = one_process.layout
    config = object()
    for v, stage in enumerate(lay.stages_of_rank(0)):
        chunk = providers.model_provider(False, False, vp_stage=v, config=config)
        assert chunk.parts == stage.parts and chunk.config is config
        same = stage_chunk(one_process.model, lay, stage.index, seed=1234, use_te=False)
        assert all((a == b).all() for a, b in zip(chunk.parameters(), same.parameters()))


def test_dataset_provider_yields_the_workload_microbatches(one_process):
    from pipeweaver_megatron.models.data import microbatch_data

    assert providers.train_valid_test_datasets_provider([1, 0, 0], vp_stage=1) == (None, None, None)
    train_data, valid, test = providers.train_valid_test_datasets_provider([1, 0, 0], vp_stage=0)
    assert valid is None and test is None
    assert providers.train_valid_test_datasets_provider.is_distributed
    expected = [mb for batch in one_process.batches for mb in batch.microbatches]
    got = list(train_data)
    assert len(got) == len(expected) == 2 * one_process.model.parallel.num_microbatches
    first = microbatch_data(one_process.model, expected[0], one_process.rules, 1234)
    assert (got[0].text.tokens == first.text.tokens).all()


def test_forward_step_runs_the_chunk_under_wrappers(one_process):
    import torch

    from pipeweaver_megatron.models.data import microbatch_data
    from pipeweaver_megatron.runtime import lmm_loss

    chunk = providers.model_provider(vp_stage=0, config=object())  # vision[0:k]
    wrapper = torch.nn.Module()
    wrapper.module = chunk
    chunk.set_input_tensor({})
    data = microbatch_data(one_process.model, one_process.batches[0].microbatches[0],
                           one_process.rules, 1234)
    output, loss_func = providers.forward_step(iter([data]), wrapper)
    assert loss_func is lmm_loss and output.loss is None and set(output.outputs) == {"hidden"}


# ---- harness: python tests/test_patches.py parse SCRIPT FLAGS... runs a patched
# Megatron-LM script whose pretrain parses the flags with Megatron's parser and reports
# what with_pipeweaver handed it.

def _megatron(script: str, flags: list[str]) -> int:
    import runpy

    import megatron.training

    megatron.training.pretrain = _pretrain
    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")
    return 0


def _pretrain(datasets, model, model_type, step, *rest, extra_args_provider=None,
              args_defaults=None, **kwargs) -> None:
    """Megatron's pretrain up to its arguments; then report."""
    import megatron.training.training as training
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    args = parse_args(extra_args_provider)
    validate_args(args, args_defaults or {})
    set_args(args)
    ours = (datasets is providers.train_valid_test_datasets_provider
            and model is providers.model_provider and step is providers.forward_step)
    getter = training.get_forward_backward_func
    print("RESULT " + json.dumps({
        "pipeweaver": args.pipeweaver, "ours": ours,
        "vp": args.virtual_pipeline_model_parallel_size,
        "dataloader_type": args.dataloader_type,
        "forward_backward": getter().__name__ if args.pipeweaver else getter.__name__}))


if __name__ == "__main__":
    sys.exit(_megatron(sys.argv[2], sys.argv[3:]))
