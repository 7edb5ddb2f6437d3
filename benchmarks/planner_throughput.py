"""Simulated throughput and MFU of PipeWeaver against the paper's baselines (SEMU, no GPU).

For each setup (VLM-S, VLM-M, VLM-L, T2V-S, T2V-L on their H800 profile and default
workload) the same global batches run through every system: PipeWeaver plans each
iteration within --budget-ms; megatron-vpp, nnscaler and optimus are static (see
pipeweaver_megatron/planner/baselines.py) with the run-wide memory policy of
planner/systems.py (no recompute if the batch fits, else every layer recomputed).
Reported per setup: mean simulated iteration time and MFU of each system, PipeWeaver's
gain (time_baseline / time_pipeweaver - 1) against each beside the paper's range, how far
every PipeWeaver iteration is from SEMU's lower bound (busiest rank's compute without
recompute + gradient reduction + optimizer), and the highest simulated peak memory
against the device's; a bar plot of the gains.

Usage: python benchmarks/planner_throughput.py [--iterations 100] [--budget-ms 500]
       [--setups vlm-s,t2v-s] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common import (BASELINES, SIMULATED, SYSTEMS, figure, gain, grouped_bars, header, load_setup,
                    parse, run_system, save_figure, table, write_report)
from paper import THROUGHPUT_GAIN

SETUPS = ("vlm-s", "vlm-m", "vlm-l", "t2v-s", "t2v-l")


def run_setup(name: str, iterations: int, budget_ms: float, seed: int,
              systems: Sequence[str] = SYSTEMS) -> dict:
    setup = load_setup(name, iterations, seed)
    return {"model": setup.model.name, "dataset": setup.model.dataset,
            "hardware": setup.costs.hardware.name, "capacity_gib": setup.capacity_gib,
            "systems": {s: run_system(setup, s, budget_ms, seed).summary() for s in systems}}


def paper_range(model: str) -> str:
    low, high = THROUGHPUT_GAIN[model[:3]]
    return f"{low:+.1%} to {high:+.1%}"


def gains(result: dict) -> list[float]:
    s = result["systems"]
    return [gain(s[b]["mean_iteration_time_s"], s["pipeweaver"]["mean_iteration_time_s"])
            for b in BASELINES]


def report(results: list[dict], argv: list[str], iterations: int) -> list[str]:
    lines = header("PipeWeaver against the paper's baselines", "planner_throughput", argv,
                   SIMULATED + f" Mean over the same {iterations} global batches of each setup's "
                   "default workload; gain = baseline time / PipeWeaver time - 1; MFU = model "
                   "FLOPs (forward + backward, no recompute) / (iteration time x GPUs x peak "
                   "dense bf16 FLOP/s). The paper's column is its measured range over all "
                   "setups and baselines of a family (it gives no per-setup figure).")
    rows = []
    for r in results:
        s = r["systems"]
        rows.append([f"{r['model']} ({r['dataset']})",
                     *(f"{s[n]['mean_iteration_time_s']:.2f}" for n in SYSTEMS),
                     *(f"{g:+.1%}" for g in gains(r)), paper_range(r["model"])])
    lines += table(["setup", "PipeWeaver (s)", "megatron-vpp (s)", "nnscaler (s)", "optimus (s)",
                    "gain vs megatron-vpp", "vs nnscaler", "vs optimus", "paper's range"], rows)
    lines += ["", "MFU (SEMU-predicted; the paper reports none per setup):", ""]
    lines += table(["setup", *SYSTEMS],
                   [[r["model"], *(f"{r['systems'][n]['mfu']:.3f}" for n in SYSTEMS)]
                    for r in results])
    lines += ["", "PipeWeaver against SEMU's lower bound and memory:", ""]
    rows = []
    for r in results:
        s, pw = r["systems"], r["systems"]["pipeweaver"]
        rows.append([r["model"], f"{pw['within_5_percent']}/{len(pw['iteration_time_s'])}",
                     f"{pw['lower_bound_gap_mean']:.1%}", f"{pw['lower_bound_gap_max']:.1%}",
                     f"{pw['balance_gap_mean']:.1%}",
                     f"{pw['plan_ms_mean']:.0f}", f"{pw['evaluations_mean']:.0f}",
                     f"{pw['peak_memory_gib']:.1f} ({r['capacity_gib']:.1f})",
                     " / ".join(f"{s[b]['peak_memory_gib']:.1f}" for b in BASELINES),
                     " / ".join(str(s[b]["batches_recomputed"]) for b in BASELINES)])
    lines += table(["setup", "iterations within 5% of bound", "mean gap", "max gap",
                    "mean gap to perfect balance",
                    "plan time (ms)", "candidates per plan", "peak GiB (cap)",
                    "baselines' peak GiB (vpp / nnscaler / optimus)",
                    "baseline batches needing full recompute"], rows)
    lines += ["", "Bound: the busiest rank's compute (without recompute) + its gradient "
              "reduction and optimizer step. Perfect balance: every rank's compute / PP + "
              "the slowest reduction and step, what no partition of the model can beat; "
              "the difference between the two gaps is the partition's imbalance.", "",
              "A baseline peak above the capacity means even full recompute does not fit "
              "that static schedule on the device; its time is then optimistic.", "",
              "![gains](planner_throughput.png)"]
    return lines


def plot(results: list[dict], path) -> None:
    fig, ax = figure(8, 3.8)
    names = [r["model"] for r in results]
    grouped_bars(ax, names, {f"vs {b}": [100 * g[i] for g in map(gains, results)]
                             for i, b in enumerate(BASELINES)}, "PipeWeaver gain (%)")
    for i, r in enumerate(results):
        low, high = THROUGHPUT_GAIN[r["model"][:3]]
        ax.plot([i - 0.4, i + 0.4], [100 * low] * 2, "k--", linewidth=0.8)
        ax.plot([i - 0.4, i + 0.4], [100 * high] * 2, "k--", linewidth=0.8)
    ax.set_title("SEMU-predicted throughput gain (dashed: paper's measured range)")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    results = [run_setup(name, args.iterations, args.budget_ms, args.seed)
               for name in args.setups.split(",")]
    write_report(args.out, "planner_throughput", report(results, shown, args.iterations), results)
    plot(results, args.out / "planner_throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
