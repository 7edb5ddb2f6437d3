"""`pipeweaver checkpoint convert` between Megatron's stage layout and PipeWeaver's chunks:
a round trip is bitwise identical, a converted checkpoint of a real run resumes in the
other layout with the losses the original run went on to have, TP shards move like
whole tensors, and bad inputs fail with one clear line.

[Note: resume tolerances] The reference is the uninterrupted run that saved the
checkpoint. The first resumed iteration's loss comes from the same parameters and data
before any step in the new layout: only the forward's partitioning differs (encoder
sub-microbatches, other GEMM shapes), a few fp32 roundings (eps 6e-8) of a loss near 8,
so rel 1e-6. The second follows one step whose gradients were summed in the other
schedule's order (fp32 rounding, ~1e-7 of each gradient) through the moved Adam state:
rel 1e-5. For scale, resetting only Adam's step counters moves that loss by 1e-2.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeweaver_megatron.cli.main import main
from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.ir import Part
from pipeweaver_megatron.megatron.checkpoint import load_checkpoint
from pipeweaver_megatron.megatron.convert import ConvertError, ConvertRequest, convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
FLAGS = ("--pipeline-model-parallel-size", "2", "--train-iters", "4", "--lr", "3e-3")


def train(cwd: Path, name: str, *flags: str, port: int) -> list[dict]:
    log = cwd / f"{name}.jsonl"
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(port),
                           str(ROOT / "scripts" / "pretrain_lmm.py"), "--pipeweaver",
                           "--pipeweaver-model-config", "tiny-vlm", "--pipeweaver-log", str(log),
                           "--pipeweaver-search-budget-ms", "100", *FLAGS, *flags],
                          capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


@dataclass
class Run:
    records: list[dict]
    ckpt: Path
    """Checkpoints after iterations 2 and 4 (`latest` names 4)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """One uninterrupted 4-iteration run per layout, saving after iterations 2 and 4."""
    out = {}
    for port, schedule in ((29721, "megatron-1f1b"), (29722, "pipeweaver")):
        cwd = tmp_path_factory.mktemp(schedule)
        records = train(cwd, "whole", "--pipeweaver-schedule", schedule, "--save", "ckpt",
                        "--save-interval", "2", port=port)
        out[schedule] = Run(records, cwd / "ckpt")
    return out


def convert(load: Path, save: Path, source: str, target: str, **options):
    return convert_checkpoint(ConvertRequest(load=str(load), save=str(save), model="tiny-vlm",
                                             source=source, target=target, pp=2, **options))


def rank_files(root: Path, iteration: int = 2) -> list[Path]:
    return sorted((root / f"iter_{iteration:07d}").glob("rank_*.pt"))


def same(a, b, where: str = "") -> None:
    """Bitwise equality of saved states: tensors by dtype, shape and bytes; dicts in order."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8),
                           b.contiguous().view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


def test_round_trips_are_bitwise_identical(runs, tmp_path):
    for first, second in (("megatron-1f1b", "pipeweaver"), ("pipeweaver", "megatron-1f1b")):
        original = runs[first].ckpt
        there = convert(original, tmp_path / f"{first}-there", first, second, iteration=2)
        assert there.moved > 0 and there.source != there.target
        convert(tmp_path / f"{first}-there", tmp_path / f"{first}-back", second, first)
        back = rank_files(tmp_path / f"{first}-back")
        assert [p.name for p in back] == [p.name for p in rank_files(original)]
        for want, got in zip(rank_files(original), back):
            same(torch.load(want, weights_only=False), torch.load(got, weights_only=False),
                 str(got))
        # the converted checkpoint holds what a run in the other layout saves
        for made, real in zip(rank_files(tmp_path / f"{first}-there"),
                              rank_files(runs[second].ckpt)):
            made, real = torch.load(made, weights_only=False), torch.load(real, weights_only=False)
            assert made["meta"] == real["meta"]
            assert [list(c) for c in made["chunks"]] == [list(c) for c in real["chunks"]]


def test_a_megatron_checkpoint_resumes_in_the_pipeweaver_layout(runs, tmp_path):
    """Through the command line; see [Note: resume tolerances]."""
    done = subprocess.run([sys.executable, "-m", "pipeweaver_megatron.cli", "checkpoint",
                           "convert", "--from", "megatron", "--to", "pipeweaver", "--model",
                           "tiny-vlm", "--pp", "2", "--iteration", "2", "--load",
                           str(runs["megatron-1f1b"].ckpt), "--save", str(tmp_path / "pw")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "megatron (2 stages) -> pipeweaver" in done.stdout
    resumed = train(tmp_path, "resumed", "--pipeweaver-schedule", "pipeweaver", "--load", "pw",
                    port=29723)
    whole = runs["megatron-1f1b"].records
    assert [r["iteration"] for r in resumed] == [2, 3]
    assert resumed[0]["loss"] == pytest.approx(whole[2]["loss"], rel=1e-6)
    assert resumed[1]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-5)


def test_a_pipeweaver_checkpoint_resumes_in_the_megatron_layout(runs, tmp_path):
    convert(runs["pipeweaver"].ckpt, tmp_path / "mg", "pipeweaver", "megatron", iteration=2)
    resumed = train(tmp_path, "resumed", "--pipeweaver-schedule", "megatron-1f1b", "--load", "mg",
                    port=29724)
    whole = runs["pipeweaver"].records
    assert [r["iteration"] for r in resumed] == [2, 3]
    assert resumed[0]["loss"] == pytest.approx(whole[2]["loss"], rel=1e-6)
    assert resumed[1]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-5)


def test_a_run_refuses_a_checkpoint_of_another_layout(runs, tmp_path):
    from pipeweaver_megatron.models import LMMChunk, init_single_process, teardown

    convert(runs["megatron-1f1b"].ckpt, tmp_path / "pw", "megatron", "pipeweaver", iteration=2)
    saved = torch.load(rank_files(tmp_path / "pw")[0], weights_only=False)
    model, states = load_model("tiny-vlm"), (torch.get_rng_state(), np.random.get_state(),
                                             random.getstate())
    init_single_process(0)
    try:
        chunks = [LMMChunk(model, tuple(Part(*p) for p in parts)) for parts in saved["meta"]["parts"]]
        optimizer = torch.optim.Adam([p for c in chunks for p in c.parameters()])
        with pytest.raises(ValueError, match=r"rank_00000\.pt: saved with chunks vision\[0:8\]"
                                             r"\+projector.*another layout"):
            load_checkpoint(str(runs["megatron-1f1b"].ckpt), 0, chunks, optimizer)
        assert load_checkpoint(str(tmp_path / "pw"), 0, chunks, optimizer) == 2
        for chunk, tensors in zip(chunks, saved["chunks"]):
            assert all(torch.equal(chunk.state_dict()[k], v) for k, v in tensors.items())
    finally:
        teardown()
        torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])


def test_tensor_parallel_shards_move_like_whole_tensors(runs, tmp_path):
    """TP 2 files made by sharding the TP 1 checkpoint convert to the shards of what the
    TP 1 checkpoint holds, each on the rank of the target layout."""
    from pipeweaver_megatron.models import init_single_process, stage_chunk, teardown
    from pipeweaver_megatron.models.lmm import shard
    from pipeweaver_megatron.service import baseline_layout

    model, source = load_model("tiny-vlm"), runs["megatron-1f1b"].ckpt
    init_single_process(0)
    try:
        with torch.device("meta"):
            layout = baseline_layout(model, "megatron-1f1b", 2)
            params = {n: p for s in layout.stages
                      for n, p in stage_chunk(model, layout, s.index).named_parameters()}
    finally:
        teardown()

    def piece(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        gated = model.module(name.split(".")[0]).gated_mlp and ".mlp.linear_fc1." in name
        return tensor if tensor.dim() == 0 else shard(tensor, params[name], gated, rank, 2).clone()

    full, adam = {}, {}
    for pp_rank, path in enumerate(rank_files(source)):
        state = torch.load(path, weights_only=False)
        names = [n for chunk in state["meta"]["params"] for n in chunk]
        full.update({k: v for chunk in state["chunks"] for k, v in chunk.items()})
        adam.update({names[i]: s for i, s in state["optimizer"]["state"].items()})
        for tp_rank in range(2):
            split = {**state, "chunks": [{k: piece(k, v, tp_rank) for k, v in chunk.items()}
                                         for chunk in state["chunks"]],
                     "optimizer": {**state["optimizer"], "state": {
                         i: {k: piece(names[i], v, tp_rank) for k, v in s.items()}
                         for i, s in state["optimizer"]["state"].items()}},
                     "meta": {**state["meta"], "tp": 2, "tp_rank": tp_rank, "world": 4}}
            target = tmp_path / "tp2" / "iter_0000002" / f"rank_{pp_rank * 2 + tp_rank:05d}.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(split, target)
    (tmp_path / "tp2" / "latest").write_text("2")
    result = convert(tmp_path / "tp2", tmp_path / "out", "megatron", "pipeweaver", tp=2)
    assert len(result.files) == 4 and result.moved > 0
    for path in result.files:
        state = torch.load(path, weights_only=False)
        meta = state["meta"]
        stages = result.target.stages_of_rank(meta["pp_rank"])
        assert meta["parts"] == [[[p.module, p.first_layer, p.last_layer] for p in s.parts]
                                 for s in stages]
        names = [n for chunk in meta["params"] for n in chunk]
        for chunk in state["chunks"]:
            for name, tensor in chunk.items():
                assert torch.equal(tensor, piece(name, full[name], meta["tp_rank"])), name
        for i, s in state["optimizer"]["state"].items():
            for key, value in s.items():
                assert torch.equal(value, piece(names[i], adam[names[i]][key], meta["tp_rank"]))


def tampered(runs, tmp_path: Path, edit) -> Path:
    """A copy of the megatron checkpoint's iteration 2 with edit(state, rank) applied."""
    root = tmp_path / "bad"
    shutil.copytree(runs["megatron-1f1b"].ckpt / "iter_0000002", root / "iter_0000002")
    (root / "latest").write_text("2")
    for rank, path in enumerate(rank_files(root)):
        state = torch.load(path, weights_only=False)
        if edit(state, rank) is not False:
            torch.save(state, path)
    return root


@pytest.mark.parametrize("edit, error", [
    (lambda s, r: s["chunks"][0].update({"lm.layers.99.extra": torch.zeros(1)}) if r else False,
     r"rank_00001\.pt: lm\.layers\.99\.extra is in no chunk of the pipeweaver layout"),
    (lambda s, r: s["chunks"][0].pop("lm.final_norm.weight") if r else False,
     r"bad/iter_0000002: no rank file holds lm\.final_norm\.weight"),
    (lambda s, r: s.pop("meta") if r else False, r"rank_00001\.pt: saved before checkpoint format 2"),
    (lambda s, r: s["meta"].update(pp=4, world=8), r"rank_00000\.pt: saved with pp=4, not 2"),
    (lambda s, r: s["chunks"][0].update({"lm.final_norm.weight": torch.zeros(3)}) if r else False,
     r"rank_00001\.pt: lm\.final_norm\.weight has shape \(3,\), the model's is \(\d+,\)"),
    (lambda s, r: s.update(optimizer={"optimizer": s["optimizer"], "grad_scaler": None}),
     r"rank_00000\.pt: the optimizer state is not torch\.optim's"),
])
def test_broken_checkpoints_fail_naming_the_file(runs, tmp_path, edit, error):
    with pytest.raises(ConvertError, match=error):
        convert(tampered(runs, tmp_path, edit), tmp_path / "out", "megatron", "pipeweaver")


def test_a_transformer_engine_extra_state_moves_with_its_module(runs, tmp_path):
    extra = "lm.layers.1.mlp.linear_fc1._extra_state"
    ckpt = tampered(runs, tmp_path, lambda s, r: s["chunks"][-1].update(
        {extra: torch.arange(5, dtype=torch.uint8)}) if r == 0 else False)
    result = convert(ckpt, tmp_path / "out", "megatron", "pipeweaver")
    chunks = [c for path in result.files for c in torch.load(path, weights_only=False)["chunks"]]
    owner, = [c for c in chunks if extra in c]
    assert "lm.layers.1.mlp.linear_fc1.weight" in owner
    assert torch.equal(owner[extra], torch.arange(5, dtype=torch.uint8))


def test_wrong_requests_fail_naming_the_file(runs, tmp_path):
    ckpt = runs["megatron-1f1b"].ckpt
    with pytest.raises(ConvertError, match=r"iter_0000004: its chunks \(rank 0: vision\[0:\d+\]"
                                           r"\+projector\[0:1\]\+lm\[0:\d+\]; .*not pipeweaver's"):
        convert(ckpt, tmp_path / "out", "pipeweaver", "megatron")
    with pytest.raises(ConvertError, match="not megatron-interleaved's layout"):
        convert(ckpt, tmp_path / "out", "megatron-interleaved", "pipeweaver")
    with pytest.raises(ConvertError, match="no checkpoint of iteration 3"):
        convert(ckpt, tmp_path / "out", "megatron", "pipeweaver", iteration=3)
    with pytest.raises(ConvertError, match="another directory"):
        convert(ckpt, ckpt, "megatron", "pipeweaver")
    missing = tampered(runs, tmp_path, lambda s, r: False)
    (missing / "iter_0000002" / "rank_00001.pt").unlink()
    with pytest.raises(ConvertError, match=r"rank_00001\.pt: missing \(the checkpoint has 2 ranks\)"):
        convert(missing, tmp_path / "out", "megatron", "pipeweaver")


def test_the_command_prints_one_line_and_exits_2(runs, tmp_path, capsys):
    args = ["checkpoint", "convert", "--from", "megatron", "--to", "pipeweaver", "--pp", "2",
            "--load", str(runs["megatron-1f1b"].ckpt), "--save", str(tmp_path / "out")]
    assert main([*args, "--model", "tiny-t2v"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeweaver: error: ")
    assert err[0].endswith("iter_0000004/rank_00000.pt: saved for model 'tiny-vlm', not 'tiny-t2v'")
    assert main([*args, "--model", "no-such-model"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
