"""Memory per rank: peak and fluctuation of PipeWeaver against Megatron-LM and Optimus
(PAPER.md, VLM-M, first rank: Optimus peaks 25.3% above Megatron-LM; PipeWeaver has
52.9% less memory fluctuation than Megatron-LM and is 12.2% faster than Optimus at equal
peak).

Every system plans and simulates the same batches with SEMU's memory timeline (weights,
gradients, optimizer state, live activations, P2P buffers). Per rank: the highest peak;
fluctuation within an iteration = the time-weighted standard deviation of the memory in
use (also the swing, peak - lowest level), averaged over iterations; and fluctuation
across iterations = the standard deviation of the per-iteration peaks. PAPER.md does
not say which fluctuation the paper measured, so both are shown.
"PipeWeaver at Optimus's peak" plans with the memory capacity set to the highest peak
Optimus reached on any rank.

Usage: python benchmarks/memory_profile.py [--model vlm-m] [--iterations 10]
       [--budget-ms 500] [--out docs/results]
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

from common import (GIB, SIMULATED, figure, gain, header, load_setup, parse, save_figure, table,
                    write_report)
from paper import (MEMORY_FASTER_THAN_OPTIMUS_AT_EQUAL_PEAK, MEMORY_FLUCTUATION_BELOW_MEGATRON,
                   MEMORY_OPTIMUS_PEAK_ABOVE_MEGATRON)
from pipeweaver_megatron.planner import PipeWeaverPlanner, make_system, partition
from pipeweaver_megatron.planner.systems import PipeWeaverSystem
from pipeweaver_megatron.semu import SimResult, simulate_workload

CAPPED = "pipeweaver at optimus's peak"


def stats(result: SimResult, rank: int) -> tuple[float, float, float]:
    """(peak, time-weighted std, swing) of one rank's memory, in GiB."""
    line = list(result.memory_timeline[rank]) + [(result.pipeline_time_s,
                                                  result.memory_timeline[rank][-1][1])]
    total = sq = span = 0.0
    for (t0, level), (t1, _) in zip(line, line[1:]):
        dt = max(0.0, t1 - t0)
        total, sq, span = total + level * dt, sq + level * level * dt, span + dt
    mean = total / span if span else 0.0
    std = math.sqrt(max(0.0, sq / span - mean * mean)) if span else 0.0
    levels = [b for _, b in line]
    return result.peak_memory_bytes[rank] / GIB, std / GIB, (max(levels) - min(levels)) / GIB


def std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def run(setup, system) -> list[SimResult]:
    """Every batch simulated with its memory timeline."""
    return [simulate_workload(setup.costs, [b], system).results[0] for b in setup.batches]


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs - 1:+.1%}" if theirs else "n/a (Megatron-LM: 0)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-m")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    setup = load_setup(args.model, args.iterations, args.seed)
    first = setup.batches[0]
    results = {name: run(setup, make_system(name, setup.costs, first, args.budget_ms, args.seed))
               for name in ("megatron-vpp", "optimus", "pipeweaver")}
    cap = max(max(r.peak_memory_bytes) for r in results["optimus"])
    chunks = partition(setup.costs, capacity_bytes=cap, reference=first)
    capped = PipeWeaverSystem(PipeWeaverPlanner(setup.costs, chunks, capacity_bytes=cap),
                              args.budget_ms, args.seed)
    results[CAPPED] = run(setup, capped)
    ranks = len(results["pipeweaver"][0].peak_memory_bytes)
    summary: dict[str, dict] = {}
    for name, runs in results.items():
        per = [[stats(r, k) for r in runs] for k in range(ranks)]
        summary[name] = {
            "mean_iteration_time_s": sum(r.iteration_time_s for r in runs) / len(runs),
            "peak_gib": [max(p for p, _, _ in rank) for rank in per],
            "fluctuation_gib": [sum(s for _, s, _ in rank) / len(rank) for rank in per],
            "swing_gib": [sum(w for _, _, w in rank) / len(rank) for rank in per],
            "peak_std_gib": [std([p for p, _, _ in rank]) for rank in per]}
        print(f"  {name:30} peak rank 0 {summary[name]['peak_gib'][0]:.1f} GiB", flush=True)
    mega, opt, pw = summary["megatron-vpp"], summary["optimus"], summary["pipeweaver"]
    lines = header(f"Memory per rank on {setup.model.name}", "memory_profile", shown,
                   SIMULATED + f" {args.iterations} {setup.model.dataset} batches; capacity "
                   f"{setup.capacity_gib:.1f} GiB; Optimus's highest peak {cap / GIB:.1f} GiB.")
    lines += table(["figure (first rank)", "ours (SEMU-predicted)", "paper (measured)"], [
        ["Optimus peak above Megatron-LM", f"{opt['peak_gib'][0] / mega['peak_gib'][0] - 1:+.1%}",
         f"+{MEMORY_OPTIMUS_PEAK_ABOVE_MEGATRON:.1%}"],
        ["PipeWeaver fluctuation within an iteration against Megatron-LM",
         ratio(pw["fluctuation_gib"][0], mega["fluctuation_gib"][0]),
         f"-{MEMORY_FLUCTUATION_BELOW_MEGATRON:.1%} (definition not given)"],
        ["PipeWeaver fluctuation of the peak across iterations against Megatron-LM",
         ratio(pw["peak_std_gib"][0], mega["peak_std_gib"][0]),
         f"-{MEMORY_FLUCTUATION_BELOW_MEGATRON:.1%} (definition not given)"],
        ["PipeWeaver at Optimus's peak faster than Optimus",
         f"{gain(opt['mean_iteration_time_s'], summary[CAPPED]['mean_iteration_time_s']):+.1%}",
         f"+{MEMORY_FASTER_THAN_OPTIMUS_AT_EQUAL_PEAK:.1%}"]])
    lines += ["", "Per rank (GiB): peak / fluctuation within an iteration (time-weighted std) / "
              "swing (peak - lowest) / std of the peak across iterations:", ""]
    lines += table(["system", "mean iteration (s)",
                    *(f"rank {k}" for k in range(ranks))],
                   [[name, f"{s['mean_iteration_time_s']:.2f}",
                     *(f"{s['peak_gib'][k]:.1f} / {s['fluctuation_gib'][k]:.1f} / "
                       f"{s['swing_gib'][k]:.1f} / {s['peak_std_gib'][k]:.2f}"
                       for k in range(ranks))]
                    for name, s in summary.items()])
    lines += ["", "![memory](memory_profile.png)"]
    write_report(args.out, "memory_profile", lines, {"model": setup.model.name,
                                                     "optimus_peak_gib": cap / GIB,
                                                     "systems": summary})
    fig, ax = figure(8, 3.6)
    for name, runs in results.items():
        line = runs[0].memory_timeline[0]
        ax.step([t for t, _ in line], [b / GIB for _, b in line], where="post", label=name)
    ax.set_xlabel("time in iteration 0 (s)")
    ax.set_ylabel("rank 0 memory (GiB)")
    ax.set_title(f"{setup.model.name}, first rank (SEMU-predicted)")
    ax.legend(fontsize="small")
    save_figure(fig, args.out / "memory_profile.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
