"""`pipeweaver verify`: a plan's losses and gradients against a single-process run."""

from __future__ import annotations

import argparse
import json
import sys

from ..planner.iteration import MEMORY_STRATEGIES
from ..ir.execplan import TRANSPORTS
from ..planner.systems import RUNNABLE


def cmd_verify(args: argparse.Namespace) -> int:
    from ..runtime.verify import verify  # torch and megatron load only for this command

    try:
        result = verify(args.model, args.schedule, args.pp, args.tp, args.batches, args.seed,
                        args.workload, args.tolerance, args.timeout,
                        transport=args.transport, memory_strategy=args.memory_strategy,
                        dtype=args.dtype, sequence_parallel=args.sequence_parallel)
    except (RuntimeError, TimeoutError) as exc:  # a rank failed: its error names rank and op
        print(f"pipeweaver verify: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": result.ok, "max_loss_diff": result.max_loss_diff,
                          "max_grad_diff": result.max_grad_diff, "parameters": result.parameters,
                          "reference_parameters": result.reference_parameters,
                          "losses": result.losses, "reference_losses": result.reference_losses,
                          "plans": result.plans, "elapsed_s": result.elapsed_s,
                          "grad_digests": result.grad_digests, "dtype": result.dtype,
                          "tolerance": result.tolerance,
                          "loss_tolerance": result.loss_tolerance,
                          "forwards_with_memory_strategy": result.memory}))
    else:
        sp = " SP" if args.sequence_parallel and args.tp > 1 else ""
        print(f"{args.model}, {args.schedule}, PP={args.pp} TP={args.tp}{sp}, {len(result.losses)} "
              f"batches on {args.pp * args.tp} local processes (gloo, transport "
              f"{args.transport}) against one process")
        for i, (got, want) in enumerate(zip(result.losses, result.reference_losses)):
            print(f"  batch {i} (plan {result.plans[i]}): loss sum {got:.6f}, reference {want:.6f}")
        print(f"  largest loss difference      {result.max_loss_diff:.2e} (relative)")
        print(f"  largest gradient difference  {result.max_grad_diff:.2e} (relative to each "
              f"parameter's largest gradient), {result.parameters}/{result.reference_parameters} "
              "parameters compared")
        loss_tolerance = result.loss_tolerance or result.tolerance
        print(f"  {'MATCH' if result.ok else 'MISMATCH'} at tolerance {result.tolerance:.3g} "
              f"(gradients), {loss_tolerance:.3g} (loss), {result.dtype} "
              f"({result.elapsed_s:.1f} s)")
    return 0 if result.ok else 1


def add_parser(sub) -> None:
    verify = sub.add_parser("verify", help="check a schedule's losses and gradients against "
                                           "one process, on local CPU processes")
    verify.add_argument("--model", required=True)
    verify.add_argument("--pp", type=int, required=True)
    verify.add_argument("--tp", type=int, default=1)
    verify.add_argument("--schedule", choices=RUNNABLE, default="pipeweaver")
    verify.add_argument("--batches", type=int, default=2)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--workload", help="dataset generator or JSONL trace (default: the model's)")
    verify.add_argument("--tolerance", type=float, default=1e-4)
    verify.add_argument("--timeout", type=float, default=120.0, help="seconds a rank may wait")
    verify.add_argument("--transport", choices=TRANSPORTS, default="tags",
                        help="tags: one gloo group, a tag per kind; nccl-order: what runs on "
                             "NCCL (a communicator per channel, one tag, no batching)")
    verify.add_argument("--memory-strategy", choices=MEMORY_STRATEGIES, default="planned",
                        help="planned: the planner's recompute/offload choices; none, "
                             "recompute, offload: that on every forward of every stage; "
                             "mixed: all four in turn")
    verify.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: the chunks compute and the messages travel in bf16; "
                             "the run passes within 3x the difference the same model shows "
                             "in bf16 against fp32 in one process")
    verify.add_argument("--sequence-parallel", action="store_true",
                        help="with --tp > 1: megatron sequence parallelism in every module "
                             "(each TP rank holds its rows of the hidden states and sends them)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)
