"""The checks scripts/gpu_check.sh runs on one CUDA GPU; one PASS/FAIL/SKIP line each.

    python scripts/gpu_check.py CHECK      (te, bf16-ddp, events, memory)

Never run on CI (no GPU there); see the README's "On a GPU" section.
"""

from __future__ import annotations

import sys
import time

import torch


def te() -> str:
    """The Transformer Engine chunk against the local reference (tests/test_te_spec.py)."""
    from pipeweaver_megatron.models import te_usable

    if not te_usable():
        return "SKIP transformer-engine is not installed here"
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_te_spec.py"],
                          capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
    return ("PASS " if done.returncode == 0 and "skipped" not in tail else "FAIL ") + tail


def bf16_ddp() -> str:
    """pretrain_lmm --bf16 in one process on CUDA: megatron-core DDP (fp32 grad buffers)
    and its bf16 optimizer; the loss must be finite and fall."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "1",
             "--master-port", "29799", "scripts/pretrain_lmm.py", "--pipeweaver",
             "--pipeweaver-model-config", "tiny-vlm", "--train-iters", "6", "--lr", "3e-3",
             "--bf16", "--pipeweaver-search-budget-ms", "100", "--pipeweaver-log", log],
            capture_output=True, text=True, timeout=300)
        if done.returncode:
            return "FAIL " + (done.stderr.strip().splitlines() or ["no output"])[-1]
        losses = [json.loads(line)["loss"] for line in open(log)]
    ok = all(x == x and abs(x) < 1e4 for x in losses) and losses[-1] < losses[0]
    return ("PASS" if ok else "FAIL") + f" losses {[round(x, 3) for x in losses]}"


def events() -> str:
    """Op timings from CUDA events read once per iteration (runtime/executor.OpClock)."""
    from pipeweaver_megatron.runtime.executor import OpClock

    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    clock = OpClock(device)
    marks = []
    for index in range(3):
        start = clock.mark()
        for _ in range(10):
            a = a @ a
            a = a / a.norm()
        marks.append((index, "matmul x10", start, clock.mark()))
    host = time.perf_counter()
    timeline = clock.resolve(marks)
    spans = [end - start for _, _, start, end in timeline]
    ordered = all(timeline[i][3] <= timeline[i + 1][2] + 1e-6 for i in range(len(timeline) - 1))
    ok = all(s > 1e-4 for s in spans) and ordered and timeline[-1][3] <= host + 10
    return ("PASS" if ok else "FAIL") + " spans " + ", ".join(f"{s * 1e3:.2f} ms" for s in spans)


def memory() -> str:
    """Recompute and offload (pinned buffers, side stream) bitwise equal on CUDA, and
    fewer bytes held on the device."""
    from pipeweaver_megatron.config import load_model
    from pipeweaver_megatron.models import (build_reference, init_single_process, microbatch_data,
                                            teardown)
    from pipeweaver_megatron.models.memory import layer_memory
    from pipeweaver_megatron.workload import TokenRules, sample_workload

    model = load_model("tiny-vlm")
    rules = TokenRules.from_model(model)
    batch = sample_workload(model, model.dataset, 1, 0)[0]
    layers = sum(m.num_layers for m in model.modules if m.is_transformer)
    init_single_process(0)
    try:
        net = build_reference(model, seed=0).cuda()
        data = microbatch_data(model, batch.microbatches[0], rules, 0).to(torch.device("cuda"))
        runs = {}
        for name, (recompute, offload) in {"none": (0, 0), "recompute": (layers, 0),
                                           "offload": (0, layers)}.items():
            net.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with layer_memory(recompute, offload, net.parameters()):
                result = net({}, data)
            held = torch.cuda.memory_allocated() - before
            result.loss.backward()
            torch.cuda.synchronize()
            runs[name] = (result.loss.item(), [p.grad.clone() for p in net.parameters()
                                               if p.grad is not None], held)
    finally:
        teardown()
    loss, grads, held = runs["none"]
    same = all(r[0] == loss and all(torch.equal(a, b) for a, b in zip(r[1], grads))
               for r in runs.values())
    smaller = all(runs[n][2] < held for n in ("recompute", "offload"))
    return ("PASS" if same and smaller else "FAIL") + " held after forward: " + ", ".join(
        f"{n} {r[2] / 2**20:.1f} MiB" for n, r in runs.items()) + ("" if same else "; NOT identical")


CHECKS = {"te": te, "bf16-ddp": bf16_ddp, "events": events, "memory": memory}

if __name__ == "__main__":
    name = sys.argv[1]
    try:
        line = CHECKS[name]()
    except Exception as exc:  # a check that crashes is a failure, named
        line = f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"{line.split()[0]} {name}: {' '.join(line.split()[1:])}", flush=True)
    sys.exit(0 if line.startswith(("PASS", "SKIP")) else 1)
