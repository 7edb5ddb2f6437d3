"""The user's own command with default flags: measured speedup of --pipeweaver over
Megatron's static 1F1B, the PipeWeaver run's bubble, SEMU's error, and what the live
planner costs training (issue 16's targets).

Each round runs, on this machine, exactly

    torchrun --nproc-per-node 2 scripts/pretrain_lmm.py --pipeweaver \\
        --pipeweaver-model-config tiny-vlm --pipeline-model-parallel-size 2 \\
        --train-iters 8 --seed 1234

(plus --pipeweaver-log to read the figures, and --pipeweaver-record-plans), the same with
--pipeweaver-schedule megatron-1f1b, the PipeWeaver run again on its recorded plans with
no planner running (--pipeweaver-replay-plans), then the user's command once more: the
mean of the two live runs (one before and one after the replay, so that neither side
gains from its place in the round) over the replayed one is the planner's interference.
Rounds alternate which schedule goes first. Figures are
medians of iterations 3-8 (1-based) of each run; the speedup is the median over rounds
of 1F1B's median over PipeWeaver's. Bubble: 1 - busiest rank's measured compute /
iteration time. SEMU error: |predicted - measured| / measured, mean over iterations 3-8,
with the default calibration (no calibration flag).

Usage: python benchmarks/default_flags.py [--rounds 3] [--iterations 8] [--out docs/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from common import figure, header, parse, save_figure, table, write_report
from pipeweaver_megatron.cli import demo

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
USER_FLAGS = ("--pipeweaver", "--pipeweaver-model-config", "tiny-vlm",
              "--pipeline-model-parallel-size", "2")
RUNS = ("pipeweaver", "megatron-1f1b", "replay", "pipeweaver-again")


def train(kind: str, args: argparse.Namespace, work: Path) -> list[dict]:
    """One run of the user's command (`kind`: pipeweaver or pipeweaver-again, each
    recording its plans, megatron-1f1b, or replay of the pipeweaver run's plans in
    `work`); its log records."""
    log = work / f"{kind}.jsonl"
    extra = {"pipeweaver": ["--pipeweaver-record-plans", str(work / "plans")],
             "pipeweaver-again": ["--pipeweaver-record-plans", str(work / "plans-again")],
             "megatron-1f1b": ["--pipeweaver-schedule", "megatron-1f1b"],
             "replay": ["--pipeweaver-replay-plans", str(work / "plans")]}[kind]
    if kind != "megatron-1f1b":
        extra += args.pipeweaver_flags.split()
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(args.port),
               str(ROOT / "scripts" / "pretrain_lmm.py"), *USER_FLAGS, "--train-iters",
               str(args.iterations), "--seed", str(args.seed), "--pipeweaver-log", str(log),
               *extra]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun's default
    env["PYTHONWARNINGS"] = "ignore"
    print(f"$ {kind}", flush=True)
    return demo.run_logged(command, env, log, kind, cwd=work)


def figures(records: list[dict], first: int) -> dict:
    """One run's figures over iterations first+1 .. end (1-based)."""
    kept = records[first:] or records
    times = [r["iteration_time_s"] for r in kept]
    errors = [abs(r["predicted_time_s"] - r["iteration_time_s"]) / r["iteration_time_s"]
              for r in kept]
    out = {"median_s": statistics.median(times), "times_s": times,
           "bubble": statistics.median(r["measured_bubble"] for r in kept),
           "semu_error": statistics.fmean(errors),
           "predicted_s": statistics.median(r["predicted_time_s"] for r in kept),
           "plan_wait_ms": statistics.median(r["plan_wait_ms"] for r in kept),
           "plan_wait_max_ms": max(r["plan_wait_ms"] for r in kept),
           "plan_latency_ms": statistics.median(r["plan_latency_ms"] for r in kept),
           "fallbacks": records[-1]["fallbacks"], "loss": records[-1]["loss"],
           "error_by_iteration": [r["predicted_time_s"] / r["iteration_time_s"] - 1
                                  for r in records],
           "fits_by_iteration": [r.get("plan_search", {}).get("calibration_fits", 0)
                                 for r in records]}
    # iterations planned after a fit (a plan predicted again counts as planned before)
    calibrated = [abs(r["predicted_time_s"] / r["iteration_time_s"] - 1) for r in kept
                  if r.get("plan_search", {}).get("calibration_fits", 0) >= 1]
    out["semu_error_calibrated"] = statistics.fmean(calibrated) if calibrated else None
    budgets = [r["plan_budget_ms"] for r in kept if r.get("plan_budget_ms")]
    cpu = [r["plan_cpu_budget_ms"] for r in kept if r.get("plan_cpu_budget_ms")]
    used = [r["plan_search"]["cpu_ms"] for r in kept if r.get("plan_search", {}).get("cpu_ms")]
    if budgets:
        out["budget_ms"] = statistics.median(budgets)
    if cpu:
        out["cpu_budget_ms"] = statistics.median(cpu)
    if used:
        out["search_cpu_ms"] = statistics.median(used)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--port", type=int, default=29664)
    parser.add_argument("--pipeweaver-flags", default="", metavar="FLAGS",
                        help="more flags for the PipeWeaver runs (e.g. '--pipeweaver-partition "
                             "searched'); the report then is not the default flags'")
    parser.add_argument("--name", default="default_flags", help="report name")
    args, shown = parse(parser, argv)
    first = min(2, args.iterations - 1)  # iterations 3.. (1-based)
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="pw-default-flags-") as tmp:
            work = Path(tmp)
            order = ("pipeweaver", "megatron-1f1b") if r % 2 == 0 else ("megatron-1f1b",
                                                                        "pipeweaver")
            runs = {kind: figures(train(kind, args, work), first)
                    for kind in (*order, "replay", "pipeweaver-again")}
        runs["speedup"] = runs["megatron-1f1b"]["median_s"] / runs["pipeweaver"]["median_s"]
        live = (runs["pipeweaver"]["median_s"] + runs["pipeweaver-again"]["median_s"]) / 2
        runs["interference"] = live / runs["replay"]["median_s"]
        print(f"round {r + 1}: speedup {runs['speedup']:.3f}x, interference "
              f"{runs['interference']:.3f}x", flush=True)
        rounds.append(runs)
    speedup = statistics.median(r["speedup"] for r in rounds)
    interference = statistics.median(r["interference"] for r in rounds)
    pw = [r["pipeweaver"] for r in rounds]
    result = {"speedup": speedup, "interference": interference,
              "bubble": statistics.median(p["bubble"] for p in pw),
              "semu_error": statistics.median(p["semu_error"] for p in pw),
              "semu_error_calibrated": statistics.median(
                  [p["semu_error_calibrated"] for p in pw if p["semu_error_calibrated"] is not None]
                  or [float("nan")]),
              "rounds": rounds, "iterations": args.iterations, "seed": args.seed}
    rows = []
    for i, runs in enumerate(rounds):
        for kind in RUNS:
            f = runs[kind]
            rows.append([i + 1, kind, f"{f['median_s'] * 1e3:.0f}", f"{f['bubble']:.1%}",
                         f"{f['predicted_s'] * 1e3:.0f}", f"{f['semu_error']:.0%}",
                         f"{f['plan_latency_ms']:.0f}", f"{f['plan_wait_max_ms']:.0f}",
                         f.get("budget_ms") and f"{f['budget_ms']:.0f}" or "-",
                         f.get("cpu_budget_ms") and f"{f['cpu_budget_ms']:.0f}" or "-",
                         f["fallbacks"]])
    title = "The user's command with default flags" + (
        f" plus {args.pipeweaver_flags}" if args.pipeweaver_flags else "")
    lines = header(f"{title} (measured on this CPU)",
                   "default_flags", shown,
                   "Measured: every time here is this machine's wall clock; only the "
                   "'predicted' column is SEMU's. The machine is whatever else is running "
                   "on it: compare rounds, not single iterations.")
    lines += ["", f"- speedup over megatron-1f1b (median over {args.rounds} rounds of the "
              f"median of iterations 3-{args.iterations}): **{speedup:.2f}x** (target >= 1.3x)",
              f"- PipeWeaver's measured bubble: **{result['bubble']:.1%}** (target <= 5%)",
              f"- SEMU's iteration-time error, default calibration: "
              f"**{result['semu_error']:.0%}** (target <= 5%); over the iterations whose "
              f"plan was priced with an online fit: **{result['semu_error_calibrated']:.1%}** "
              f"(target <= 3%)",
              f"- planner interference, live over replayed plans: **{interference:.3f}x** "
              f"(target <= 1.02x)", ""]
    lines += table(["round", "run", "median ms", "bubble", "predicted ms", "SEMU error",
                    "plan latency ms", "max plan wait ms", "wall budget ms",
                    "CPU budget ms", "fallbacks"], rows)
    lines += ["", "SEMU's error per iteration of the PipeWeaver runs, each started from the "
              "uncalibrated default and calibrated online (each fit also predicts again the "
              "plans made before it; those served before the first fit keep the default's "
              "prediction):", "",
              f"![SEMU error]({args.name}.png)"]
    write_report(args.out, args.name, lines, result)
    plot_errors(rounds, args.out / f"{args.name}.png")
    return 0


def plot_errors(rounds: list[dict], path: Path) -> None:
    fig, ax = figure(7, 3.2)
    for i, runs in enumerate(rounds):
        errors = runs["pipeweaver"]["error_by_iteration"]
        ax.plot(range(1, len(errors) + 1), [100 * abs(e) for e in errors], marker="o",
                label=f"round {i + 1}")
    ax.axhline(5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("|SEMU error| (%)")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
