"""The PipeWeaver executor against megatron-core's own 1F1B on the same model and batches.

Two local processes (gloo, one thread each), PP 2, tiny-vlm on Megatron's placement,
text-only microbatches of exactly --tokens LM tokens (megatron-core's schedule needs one
fixed tensor shape). Per iteration, alternately:
- ours: forward_backward_pipeweaver running the megatron-1f1b table compiled to an
  execution plan;
- megatron: megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without
  _interleaving, made to run on CPU by shims that exist only in this script
  (torch.cuda.current_device -> the host, torch.cuda.synchronize -> no-op, tensors
  created with device="cuda" -> the host).
Both call the same LMMChunk forward; losses are compared too. Reported: mean iteration
time of each (after warm-up) and the ratio ours / megatron (target <= 1.02).

Usage: python benchmarks/runtime_overhead.py [--iterations 20] [--microbatches 8] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.multiprocessing as mp


def cpu_shims() -> None:
    """Let megatron-core's CUDA-only schedule run on the host (this script only)."""
    host = torch.device("cpu")
    torch.cuda.current_device = lambda: host
    torch.cuda.synchronize = lambda *a, **k: None
    zeros = torch.zeros

    def host_zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = host
        return zeros(*args, **kwargs)

    torch.zeros = host_zeros


class MegatronChunk(torch.nn.Module):
    """An LMMChunk behind megatron-core's model protocol (one input tensor)."""

    def __init__(self, chunk, config) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.chunk, self.config, self.input_tensor = chunk, config, None
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor


def megatron_step(data_iterator, model):
    data = next(data_iterator)
    inputs = {"hidden": model.input_tensor} if model.input_tensor is not None else {}
    result = model.chunk(inputs, data)
    if result.loss is not None:
        return result.loss, partial(megatron_loss, result.num_tokens)
    return result.outputs["hidden"], None


def megatron_loss(tokens, loss):
    count = torch.tensor(tokens, dtype=torch.int)
    return loss, count, {"loss": torch.stack([loss.detach(), count.float()])}


def worker(rank: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import \
        forward_backward_pipelining_without_interleaving

    from pipeweaver_megatron.config import load_model
    from pipeweaver_megatron.models import init_parallel, stage_chunk
    from pipeweaver_megatron.models.data import microbatch_data
    from pipeweaver_megatron.models.transformer_config import transformer_config
    from pipeweaver_megatron.planner.iteration import plan_iteration
    from pipeweaver_megatron.runtime import PipeWeaverSchedule, lmm_forward_step
    from pipeweaver_megatron.schedules import build_baseline
    from pipeweaver_megatron.workload import GlobalBatch, SampleMeta, TokenRules, pack

    torch.set_num_threads(1)
    cpu_shims()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    init_parallel(1, 2, 0)
    model = load_model("tiny-vlm")
    rules = TokenRules.from_model(model)
    samples = [SampleMeta(sample_id=i, text_tokens=args.tokens) for i in range(args.microbatches)]
    batch = GlobalBatch(iteration=0, microbatches=tuple(pack(samples, rules)))
    table = build_baseline(model, "megatron-1f1b", args.microbatches, pp=2, vp=1)
    plan = plan_iteration(model, table, batch, rules)
    chunk = stage_chunk(model, table.layout, rank, seed=0, use_te=False)
    config = transformer_config(model.module("lm"), tp=1, num_layers=1, params_dtype=torch.float32,
                                dropout=0.0)
    config.pipeline_dtype, config.calculate_per_token_loss = torch.float32, True
    config.variable_seq_lengths, config.batch_p2p_comm = False, True
    chunk.config = config
    wrapped = MegatronChunk(chunk, config)
    group = parallel_state.get_pipeline_model_parallel_group()
    ours = PipeWeaverSchedule(lambda: plan, model, rules, rank,
                              dist.get_process_group_ranks(group), group)
    data = [microbatch_data(model, mb, rules, 0) for mb in batch.microbatches]
    times = {"ours": [], "megatron": []}
    losses = {"ours": [], "megatron": []}
    for it in range(args.iterations + args.warmup):
        for name in ("ours", "megatron"):
            chunk.zero_grad(set_to_none=True)
            dist.barrier(group)
            began = time.perf_counter()
            if name == "ours":
                reports = ours(forward_step_func=lmm_forward_step, data_iterator=iter(data),
                               model=[chunk], num_microbatches=args.microbatches)
            else:
                reports = forward_backward_pipelining_without_interleaving(
                    forward_step_func=megatron_step, data_iterator=iter(data), model=wrapped,
                    num_microbatches=args.microbatches, seq_length=args.tokens,
                    micro_batch_size=1)
            dist.barrier(group)
            if it >= args.warmup:
                times[name].append(time.perf_counter() - began)
                losses[name].append(sum(float(r["loss"][0]) for r in reports))
    torch.save({"rank": rank, "times": times, "losses": losses}, f"{out}.{rank}")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default="docs/results/runtime_overhead.md")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(port, args, os.path.join(tmp, "r")), nprocs=2,
                           start_method="spawn")
        results = [torch.load(os.path.join(tmp, f"r.{r}"), weights_only=False) for r in range(2)]
    times = {k: [max(a, b) for a, b in zip(results[0]["times"][k], results[1]["times"][k])]
             for k in ("ours", "megatron")}
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    ratio = mean["ours"] / mean["megatron"]
    last = results[1]["losses"]
    same = all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(last["ours"], last["megatron"]))
    text = "\n".join([
        "# Runtime overhead: PipeWeaver executor vs megatron-core 1F1B (measured, CPU)", "",
        f"Command: `python benchmarks/runtime_overhead.py --iterations {args.iterations} "
        f"--microbatches {args.microbatches} --tokens {args.tokens}`", "",
        "Two gloo processes on this machine (one thread each), tiny-vlm on Megatron's PP=2 "
        "placement, text-only microbatches; the same LMMChunk forward in both; iterations "
        "alternate between the two functions (after warm-up).", "",
        "| function | mean iteration (ms) | min (ms) |", "|---|---|---|",
        f"| forward_backward_pipeweaver (megatron-1f1b plan) | {mean['ours'] * 1e3:.1f} | "
        f"{min(times['ours']) * 1e3:.1f} |",
        f"| megatron-core forward_backward_pipelining_without_interleaving | "
        f"{mean['megatron'] * 1e3:.1f} | {min(times['megatron']) * 1e3:.1f} |", "",
        f"Ratio ours / megatron: {ratio:.3f} (target <= 1.02). Losses identical: "
        f"{'yes' if same else 'no'}.", ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"times": times, "ratio": ratio}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
