"""`pipeweaver demo`: the main job on the embedded default.

tiny-vlm trained on 2 local CPU processes (PP 2, one thread each) for a few iterations,
first with PipeWeaver plans, then with Megatron's static placement and 1F1B order
through the same runtime, on the same batches; then the measured speedup, SEMU's
prediction error per schedule, and how often a plan was ready before it was needed.
With --data-path (make demo: the real interleaved dataset `make data` builds from
scikit-image's photographs and pydoc's text, and its BPE) the batches are real images and
text read through Energon, and the dataset's dynamicity is printed first; without it,
the model's synthetic OBELICS-like workload. Everything here is measured on this machine
except the "predicted" column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

CALIBRATION = Path(__file__).resolve().parents[2] / "docs" / "results" / "calibration_cpu_1thread.json"
"""SEMU fitted on this machine with one thread, as each torchrun rank runs: made by
`OMP_NUM_THREADS=1 pipeweaver profile --device cpu --out docs/results/calibration_cpu_1thread.json`."""


def run_training(schedule: str, args: argparse.Namespace, log: Path,
                 extra_args: Sequence[str] = ()) -> list[dict]:
    """Train args.model on 2 local processes with `schedule`; returns its JSON log records.
    extra_args: more pretrain_lmm flags (e.g. --pipeweaver-trace-dir)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(args.port),
               "-m", "pipeweaver_megatron.megatron.pretrain", "--pipeweaver",
               "--pipeweaver-model-config", args.model, "--pipeline-model-parallel-size", "2",
               "--train-iters", str(args.iterations), "--seed", str(args.seed),
               "--pipeweaver-schedule", schedule, "--pipeweaver-log", str(log),
               "--pipeweaver-search-budget-ms", str(args.budget_ms or "auto"), *extra_args]
    if getattr(args, "data_path", None):
        command += ["--data-path", str(args.data_path)]
        if args.tokenizer_model:
            command += ["--tokenizer-model", str(args.tokenizer_model)]
    if CALIBRATION.exists():
        command += ["--pipeweaver-calibration", str(CALIBRATION)]
    print(f"$ torchrun --nproc-per-node 2 scripts/pretrain_lmm.py ... --pipeweaver-schedule {schedule}",
          flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return run_logged(command, env, log, f"training with {schedule}")


def run_logged(command: Sequence[str], env: dict, log: Path, what: str,
               cwd: Path | None = None) -> list[dict]:
    """Run a training command, echo its iteration lines, and return its --pipeweaver-log
    records; on failure print its output's tail and exit naming `what`."""
    done = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("iteration") and "|" in line:
            print("  " + line, flush=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {done.returncode})")
    return [json.loads(line) for line in log.read_text().splitlines()]


def summary(records: list[dict], warmup: int) -> dict:
    steady = records[warmup:] or records
    measured = sum(r["iteration_time_s"] for r in steady) / len(steady)
    predicted = sum(r["predicted_time_s"] for r in steady) / len(steady)
    later = records[1:] or records  # the first plan is made while the service starts
    ready = sum(r["plan_wait_ms"] < 1.0 for r in later) / len(later)
    out = {"measured": measured, "predicted": predicted, "ready": ready,
           "fallbacks": records[-1]["fallbacks"], "loss": records[-1]["loss"]}
    if "data_read_s" in records[0]:  # --data-path: the loader's work per iteration
        out["read"] = statistics.median(r["data_read_s"] for r in records)
        out["prepare"] = statistics.median(r["data_prepare_s"] for r in records)
    return out


def print_data_stats(args: argparse.Namespace) -> None:
    """The real dataset's dynamicity (`pipeweaver data stats`), train split."""
    import warnings

    from ..data.stats import dataset_stats

    with warnings.catch_warnings():  # megatron-core's and Energon's import-time notes
        warnings.simplefilter("ignore", UserWarning)
        stats = dataset_stats(args.data_path, model=args.model, tokenizer=args.tokenizer_model,
                              split="train")
    print(stats.format(), flush=True)
    print()


def cmd_demo(args: argparse.Namespace) -> int:
    data = (f"the real dataset {args.data_path}" if args.data_path
            else "its synthetic OBELICS-like workload")
    print(f"PipeWeaver demo: {args.model} on 2 CPU processes (gloo, PP=2), "
          f"{args.iterations} iterations of {data}, seed {args.seed}")
    if args.data_path:
        print_data_stats(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("pipeweaver", "megatron-1f1b"):
            records = run_training(schedule, args, Path(tmp) / f"{schedule}.jsonl")
            results[schedule] = summary(records, min(2, args.iterations - 1))
    ours, theirs = results["pipeweaver"], results["megatron-1f1b"]
    print()
    print(f"{'schedule':16} {'measured (ms)':>14} {'predicted (ms)':>15} {'error':>8} "
          f"{'plans ready*':>12} {'fallbacks':>10}")
    for name, r in results.items():
        error = r["predicted"] / r["measured"] - 1
        print(f"{name:16} {r['measured'] * 1e3:14.1f} {r['predicted'] * 1e3:15.1f} {error:+8.1%} "
              f"{r['ready']:12.0%} {r['fallbacks']:10d}")
    print(f"measured speedup of PipeWeaver over Megatron 1F1B: "
          f"{theirs['measured'] / ours['measured']:.2f}x (SEMU predicted "
          f"{theirs['predicted'] / ours['predicted']:.2f}x); mean of iterations after "
          "the first two; *after the first iteration")
    if "read" in ours:
        print(f"loader (PipeWeaver run, median per iteration): {ours['read'] * 1e3:.1f} ms to "
              f"read, decode, tokenize and pack a batch --pipeweaver-lookahead iterations "
              f"ahead, {ours['prepare'] * 1e3:.1f} ms to make its tensors")
    return 0


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the main job: train tiny-vlm with PipeWeaver and with "
                                       "Megatron 1F1B on 2 CPU processes and compare")
    demo.add_argument("--model", default="tiny-vlm")
    demo.add_argument("--iterations", type=int, default=12)
    demo.add_argument("--seed", type=int, default=1234)
    demo.add_argument("--budget-ms", type=float, default=None,
                      help="search budget per plan (default: auto, as --pipeweaver's: it "
                           "follows the measured iterations and the idle cores)")
    demo.add_argument("--port", type=int, default=29650)
    demo.add_argument("--data-path", metavar="DIR", help="a prepared Energon dataset to train "
                      "on (make demo: build/data/interleaved); default: the synthetic workload")
    demo.add_argument("--tokenizer-model", metavar="DIR", help="its tokenizer folder "
                      "(tokenizer.json; default: byte-level)")
    demo.set_defaults(func=cmd_demo)
