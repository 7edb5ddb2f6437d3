"""scripts/pretrain_lmm.py against one process training the same global batches: PP 3
and PP 4 with PipeWeaver plans, PP 2 x DP 2 (gradients after the data-parallel
reduction, with gradient clipping against torch.nn.utils.clip_grad_norm_), and TP 2 x
PP 2 with sequence parallelism (the TP ranks' gradient shards joined).

The reference here is the whole model in this process (build_reference: every layer
seeded as the chunks are), fed the batches each replica samples, with per-token loss,
torch.optim.Adam and torch's own clipping: nothing of the trainer under test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.semu import CostModel
from pipeweaver_megatron.workload import TokenRules, sample_workload

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
SEED, LR = 1234, 3e-3

pytestmark = pytest.mark.filterwarnings("ignore")


def train(tmp_path: Path, name: str, model: str, procs: int, *flags: str, port: int):
    log, grads = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-grads"
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", str(procs), "--master-port", str(port),
                           str(ROOT / "scripts" / "pretrain_lmm.py"), "--pipeweaver",
                           "--pipeweaver-model-config", model, "--pipeweaver-log", str(log),
                           "--pipeweaver-search-budget-ms", "100", "--seed", str(SEED),
                           "--lr", str(LR), "--pipeweaver-save-grads", str(grads), *flags],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return records, grads


def reference(model_name: str, parallel: dict, iterations: int, clip: float = 0.0):
    """Per iteration: replica 0's loss (sum / tokens, as rank 0 logs it), every
    gradient after the reduction (and clipping), and the norm before clipping."""
    from pipeweaver_megatron.models import build_reference, init_single_process, teardown
    from pipeweaver_megatron.models.data import microbatch_data

    model = load_model(model_name, parallel)
    rules = TokenRules.from_model(model)
    replicas = [sample_workload(model, model.dataset, iterations, SEED * 1000 + d)
                for d in range(parallel.get("dp", 1))]
    init_single_process(SEED)
    try:
        net = build_reference(model, seed=SEED, use_te=False)
        params = dict(net.named_parameters())
        optimizer = torch.optim.Adam(params.values(), lr=LR)
        out = []
        for it in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            tokens, first = 0, None
            for d, batches in enumerate(replicas):
                loss_sum, replica_tokens = 0.0, 0
                for mb in batches[it].microbatches:
                    result = net({}, microbatch_data(model, mb, rules, SEED))
                    result.loss.backward()
                    loss_sum += result.loss.item()
                    replica_tokens += result.num_tokens
                tokens += replica_tokens
                if d == 0:
                    first = loss_sum / replica_tokens
            for p in params.values():
                if p.grad is not None:
                    p.grad.div_(tokens)
            norm = float(torch.nn.utils.clip_grad_norm_(params.values(), clip)) if clip else None
            grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                     for n, p in params.items()}
            out.append((first, grads, norm))
            optimizer.step()
        return out
    finally:
        teardown()


def joined_gradients(grads_dir: Path, it: int, ranks: int) -> list[dict]:
    """Per (pipeline rank, data-parallel rank): its gradients with the tensor-parallel
    shards joined back into whole tensors along the dimension each rank's shards file
    names (a gated fc1: gate halves, then up halves). A parameter that is not split
    (norms, sequence-parallel ones included) must hold the same gradient on every TP
    rank, which is what the tensor-parallel reduction of the norms' partial sums
    guarantees; the first TP rank's is taken."""
    groups: dict = {}
    for rank in range(ranks):
        info = json.loads((grads_dir / f"rank_{rank:04d}_shards.json").read_text())
        got = torch.load(grads_dir / f"iter_{it:07d}_rank_{rank:04d}.pt")
        groups.setdefault((info["pp_rank"], info["dp_rank"]), []).append((info, got))
    out = []
    for members in groups.values():
        members.sort(key=lambda m: m[0]["tp_rank"])
        info = members[0][0]
        whole = {}
        for name in members[0][1]:
            shards = [g[name] for _, g in members]
            if any(x is None for x in shards):
                assert all(x is None for x in shards), name
                whole[name] = None
            elif name not in info["partition_dim"]:
                for other in shards[1:]:
                    assert torch.equal(other, shards[0]), f"{name} differs over TP ranks"
                whole[name] = shards[0]
            else:
                dim = info["partition_dim"][name]
                if name in info["gated"]:
                    halves = [x.chunk(2, dim=dim) for x in shards]
                    whole[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
                else:
                    whole[name] = torch.cat(shards, dim=dim)
        out.append(whole)
    return out


def compare_gradients(grads_dir: Path, ranks: int, want: list) -> None:
    """Largest |run - reference| per element, relative to each parameter's largest
    reference gradient, over every rank (tensor-parallel shards joined); every parameter
    is covered. The first iteration's gradients agree to rounding (1e-5). Later ones get
    1e-3: Adam's first update is lr * sign(g) per element, so an element whose gradient
    is rounding noise moves by +-lr in either run, and the next gradients differ by
    about 1e-4."""
    seen = set()
    for it, (_, grads, _) in enumerate(want):
        worst = 0.0
        for got in joined_gradients(grads_dir, it, ranks):
            for name, grad in got.items():
                full = grads[name]
                grad = torch.zeros_like(full) if grad is None else grad
                assert grad.shape == full.shape, (name, grad.shape, full.shape)
                scale = max(full.abs().max().item(), 1e-12)
                worst = max(worst, (grad - full).abs().max().item() / scale)
                seen.add(name)
        assert worst < (1e-5 if it == 0 else 1e-3), (it, worst)
    assert seen == set(want[0][1]), set(want[0][1]) ^ seen


@pytest.mark.parametrize("model,pp,transport,cut,port", [
    ("tiny-vlm", 3, "tags", "balanced", 29921), ("tiny-vlm", 4, "nccl-order", "searched", 29922),
    ("tiny-t2v", 4, "tags", "balanced", 29923)])
def test_pipeweaver_training_at_pp3_and_pp4_equals_one_process(tmp_path, model, pp, transport,
                                                                cut, port):
    """Also on a searched cut (tiny-vlm PP 4: modules rotated across ranks and chunks of
    unequal length, planner/cut_search.py)."""
    iterations = 3
    records, grads = train(tmp_path, f"pp{pp}", model, pp, "--pipeline-model-parallel-size",
                           str(pp), "--train-iters", str(iterations), "--pipeweaver-transport",
                           transport, "--pipeweaver-partition", cut, port=port)
    assert not any(r["fallback"] for r in records), records  # PipeWeaver's own plans ran
    if cut == "searched":  # the run's cut is not the balanced one
        from pipeweaver_megatron.megatron.virtual_stages import layout_reference
        from pipeweaver_megatron.planner import partition

        spec = load_model(model, {"tp": 1, "pp": pp, "dp": 1})
        costs, sample = CostModel(spec, get_hardware(spec.hardware)), \
            layout_reference(spec, None, SEED)
        assert partition(costs, pp, reference=sample, search=True).layout != \
            partition(costs, pp, reference=sample).layout
    want = reference(model, {"tp": 1, "pp": pp, "dp": 1}, iterations)
    assert [r["loss"] for r in records] == pytest.approx([w[0] for w in want], rel=1e-5)
    compare_gradients(grads, pp, want)


def test_data_parallel_gradients_after_the_reduction_and_clipping_equal_one_process(tmp_path):
    """PP 2 x DP 2, a global batch of 4 microbatches: every rank's gradients after the
    all-reduce and the division by the global batch's loss tokens, then clipped, equal
    one process's on both replicas' microbatches with torch's clip_grad_norm_."""
    iterations, clip = 2, 0.05
    records, grads = train(tmp_path, "dp2", "tiny-vlm", 4, "--pipeline-model-parallel-size", "2",
                           "--global-batch-size", "4", "--train-iters", str(iterations),
                           "--clip-grad", str(clip), port=29924)
    want = reference("tiny-vlm", {"tp": 1, "pp": 2, "dp": 2, "global_batch_size": 4}, iterations,
                     clip)
    assert all(norm > clip for _, _, norm in want)  # clipping acts in every iteration
    assert [r["loss"] for r in records] == pytest.approx([w[0] for w in want], rel=1e-5)
    compare_gradients(grads, 4, want)


@pytest.mark.parametrize("model,port", [("tiny-t2v", 29926)])  # tiny-vlm: test_sequence_parallel
def test_sequence_parallel_training_at_tp2_pp2_equals_one_process(tmp_path, model, port):
    """TP 2 x PP 2 with --sequence-parallel: every module runs on its TP rank's rows of
    the sequence, messages are those rows; losses and the joined gradients (the norms'
    equal on both TP ranks after their reduction) equal one process's."""
    iterations = 2
    records, grads = train(tmp_path, "sp", model, 4, "--pipeline-model-parallel-size", "2",
                           "--tensor-model-parallel-size", "2", "--sequence-parallel",
                           "--train-iters", str(iterations), port=port)
    assert not any(r["fallback"] for r in records), records
    parallel = {"tp": 2, "pp": 2, "dp": 1, "sequence_parallel": True}
    want = reference(model, parallel, iterations)
    assert [r["loss"] for r in records] == pytest.approx([w[0] for w in want], rel=1e-5)
    compare_gradients(grads, 4, want)
