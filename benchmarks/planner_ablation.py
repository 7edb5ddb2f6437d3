"""The ablation ladder on VLM-S (PAPER.md: Megatron-LM 26.13 s; + partitioner 22.27;
+ interleaving 18.81; + reordering 17.61; + per-layer memory optimisation 16.05).

Steps, each adding one piece to the previous (all simulated by SEMU on the same batches):
0. megatron-vpp: Megatron-LM interleaved 1F1B on parameter-balanced chunks, run-wide
   memory policy (no recompute if it fits, else full recompute);
1. + partitioner: modality-aware chunks and sub-microbatches, microbatch-order
   priorities, strict F/B alternation (no bubble filling), the same run-wide memory policy;
2. + interleaving: the greedy dual-queue fills bubbles with whichever queue starts first;
3. + reordering: MCTS over group priorities within --budget-ms;
4. + memory optimisation: per-layer recompute/offload chosen per stage by the ILP.

Usage: python benchmarks/planner_ablation.py [--model vlm-s] [--iterations 20]
       [--budget-ms 500] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common import (SIMULATED, figure, grouped_bars, header, load_setup, parse, run_system,
                    save_figure, table, write_report)
from paper import ABLATION_S
from pipeweaver_megatron.planner import SearchSettings

STEPS = [
    ("Megatron-LM (megatron-vpp)", None),
    ("+ partitioner", SearchSettings(reorder=False, fill_bubbles=False, memory_optimization=False)),
    ("+ interleaving", SearchSettings(reorder=False, memory_optimization=False)),
    ("+ reordering", SearchSettings(memory_optimization=False)),
    ("+ memory optimisation", SearchSettings()),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-s")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    setup = load_setup(args.model, args.iterations, args.seed)
    times, peaks = [], []
    for label, settings in STEPS:
        name = "megatron-vpp" if settings is None else "pipeweaver"
        done = run_system(setup, name, args.budget_ms, args.seed, settings or SearchSettings())
        times.append(done.mean_s)
        peaks.append(done.peak_gib)
    paper = setup.model.name == "VLM-S"
    lines = header(f"Ablation ladder on {setup.model.name}", "planner_ablation", shown,
                   SIMULATED + f" Mean over {args.iterations} {setup.model.dataset} batches on "
                   f"{setup.costs.hardware.name}." + (" The paper's column is its measured VLM-S "
                                                      "ladder." if paper else ""))
    rows = []
    for i, ((label, _), t) in enumerate(zip(STEPS, times)):
        row = [label, f"{t:.2f}", f"{times[i - 1] / t - 1:+.1%}" if i else "",
               f"{times[0] / t - 1:+.1%}", f"{peaks[i]:.1f}"]
        if paper:
            row += [f"{ABLATION_S[i]:.2f}", f"{ABLATION_S[0] / ABLATION_S[i] - 1:+.1%}"]
        rows.append(row)
    lines += table(["step", "ours (s)", "step gain", "vs Megatron", "peak GiB"]
                   + (["paper (s)", "paper vs Megatron"] if paper else []), rows)
    improving = all(b < a for a, b in zip(times, times[1:]))
    stem = "planner_ablation" if args.model == "vlm-s" else f"planner_ablation_{args.model}"
    lines += ["", f"Every step improves on the one before: {'yes' if improving else 'no'}.", "",
              f"![ladder]({stem}.png)"]
    write_report(args.out, stem, lines, {"model": setup.model.name,
                                         "steps": [s[0] for s in STEPS],
                                         "mean_iteration_time_s": times, "peak_memory_gib": peaks})
    fig, ax = figure(8, 3.5)
    series = {"ours (SEMU-predicted)": [times[0] / t - 1 for t in times]}
    if paper:
        series["paper (measured)"] = [ABLATION_S[0] / t - 1 for t in ABLATION_S]
    grouped_bars(ax, [s[0].replace(" (megatron-vpp)", "") for s in STEPS],
                 {k: [100 * v for v in vs] for k, vs in series.items()}, "faster than Megatron (%)")
    ax.tick_params(axis="x", labelsize="small")
    ax.set_title(f"Ablation ladder on {setup.model.name}")
    save_figure(fig, args.out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
