"""Packed-sequence attention on CPU: one tiny-vlm iteration (every microbatch's forward
and backward of the whole model in one process), and the core-attention calls alone.

Packed microbatches hold many samples (the LM) and many images (the ViT); core attention
must keep them apart. The figure is the median over --repeats of the iteration time and
of the time spent in SDPAttention's forward calls (measured with a forward hook pair),
with --threads torch threads.

Usage: python benchmarks/packed_attention.py [--repeats 5] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
from common import RESULTS, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vlm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from pipeweaver_megatron.config import load_model
    from pipeweaver_megatron.models import build_reference, init_single_process, teardown
    from pipeweaver_megatron.models.attention import SDPAttention
    from pipeweaver_megatron.models.data import microbatch_data
    from pipeweaver_megatron.workload import TokenRules, sample_workload

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, args.seed)[0]
    init_single_process(args.seed)
    try:
        net = build_reference(model, seed=args.seed, use_te=False)
        data = [microbatch_data(model, mb, rules, args.seed) for mb in batch.microbatches]
        spent = [0.0]
        began: dict = {}
        for module in net.modules():
            if isinstance(module, SDPAttention):
                module.register_forward_pre_hook(lambda m, a: began.__setitem__(m, time.perf_counter()))
                module.register_forward_hook(
                    lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - began[m]))
        iterations, attention = [], []
        for repeat in range(args.repeats + 1):
            spent[0] = 0.0
            start = time.perf_counter()
            for d in data:
                net({}, d).loss.backward()
            elapsed = time.perf_counter() - start
            if repeat:  # the first is a warm-up
                iterations.append(elapsed)
                attention.append(spent[0])
    finally:
        teardown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"model": args.model, "microbatches": len(data), "threads": args.threads,
              "repeats": args.repeats, "commit": commit,
              "iteration_ms": 1000 * statistics.median(iterations),
              "attention_forward_ms": 1000 * statistics.median(attention)}
    lines = [f"# Packed-sequence attention on CPU ({args.model})", "",
             f"`python benchmarks/packed_attention.py --repeats {args.repeats} --threads "
             f"{args.threads}` at commit {commit}: one process, the whole model, forward and "
             f"backward of {len(data)} microbatches; medians of {args.repeats} runs.", "",
             "| figure | ms |", "|---|---:|",
             f"| iteration (forward + backward) | {result['iteration_ms']:.1f} |",
             f"| SDPAttention forward calls | {result['attention_forward_ms']:.1f} |"]
    write_report(args.out, "packed_attention", lines, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
