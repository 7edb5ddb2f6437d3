"""Sub-microbatch size sweep (PAPER.md: sizes of 4 to 32 images; 4-12 shrink the gap
between the best and the worst schedule from 15.4% to 5.1%; below 8 costs 12.1% more;
the best is 12).

For every size B of the vision encoder's sub-microbatches the chunk partitioner runs
with B forced (so K_i and the chunks follow B as the paper's partitioner would), then
every batch is planned twice: by PipeWeaver's search within --budget-ms (the mean
predicted time per size), and by --random independent random priority orders (the
spread worst / best - 1 among the schedules that fit: how much the order matters).

Usage: python benchmarks/submicro_sweep.py [--model vlm-s] [--sizes 4,8,...,32]
       [--iterations 10] [--budget-ms 500] [--random 24] [--out docs/results]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
from typing import Iterator, Sequence

from common import SIMULATED, figure, header, load_setup, parse, save_figure, table, write_report
from paper import SUBMICRO_BELOW_8_COST, SUBMICRO_BEST, SUBMICRO_GAP
from strategies import explorer, spread
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings, partition

ENCODER = "vision"
partition_module = importlib.import_module("pipeweaver_megatron.planner.partition")


@contextlib.contextmanager
def forced_size(size: int) -> Iterator[None]:
    """The chunk partitioner picks `size` for the encoder (the offline choice, forced)."""
    original = partition_module.choose_sub_size

    def choose(costs, name, reference=None):
        return size if name == ENCODER else original(costs, name, reference)

    partition_module.choose_sub_size = choose
    try:
        yield
    finally:
        partition_module.choose_sub_size = original


def sweep_size(setup, size: int, budget_ms: float, randoms: int, seed: int) -> dict:
    with forced_size(size):
        chunks = partition(setup.costs, reference=setup.batches[0])
    searched = PipeWeaverPlanner(setup.costs, chunks)
    drawn = PipeWeaverPlanner(setup.costs, chunks, SearchSettings(max_evaluations=randoms))
    times, spreads = [], []
    for i, batch in enumerate(setup.batches):
        times.append(searched.plan(batch, budget_ms, seed + i).predicted_iteration_time_s)
        with explorer("random") as trees:
            drawn.plan(batch, 60_000.0, seed + i)
        spreads.append(spread([t for tree in trees for t in tree.times]))
    valid = [s for s in spreads if not math.isnan(s)]
    out = {"size": size, "segments": chunks.segments, "mean_s": sum(times) / len(times),
           "spread_mean": sum(valid) / len(valid) if valid else math.nan,
           "spread_max": max(valid, default=math.nan)}
    print(f"  B={size:3}: {out['mean_s']:.3f} s, spread {out['spread_mean']:.1%} "
          f"(max {out['spread_max']:.1%}), segments {chunks.segments}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-s")
    parser.add_argument("--sizes", default="4,8,12,16,20,24,28,32")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--random", type=int, default=24, help="random orders per batch")
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    setup = load_setup(args.model, args.iterations, args.seed)
    rows = [sweep_size(setup, int(s), args.budget_ms, args.random, args.seed)
            for s in args.sizes.split(",")]
    best = min(rows, key=lambda r: r["mean_s"])
    small = [r for r in rows if r["size"] < 8]
    below8 = (min(r["mean_s"] for r in small) / best["mean_s"] - 1) if small else math.nan
    lines = header(f"Sub-microbatch size sweep on {setup.model.name}", "submicro_sweep", shown,
                   SIMULATED + f" {args.iterations} {setup.model.dataset} batches per size; "
                   f"search budget {args.budget_ms:g} ms; spread over the better starting order "
                   f"and up to {args.random} random priority orders per batch, drawn from the "
                   "space MCTS explores (each position one of the next 4 groups); orders over "
                   "the memory capacity are left out.")
    lines += table(["images per sub-microbatch", "segments (K)", "mean iteration (s)",
                    "vs best size", "best/worst spread (mean)", "spread (max)"],
                   [[r["size"], ", ".join(f"{k} {v}" for k, v in r["segments"].items()),
                     f"{r['mean_s']:.3f}", f"{r['mean_s'] / best['mean_s'] - 1:+.1%}",
                     f"{r['spread_mean']:.1%}", f"{r['spread_max']:.1%}"] for r in rows])
    lines += ["", "Against the paper (measured on H800):", ""]
    lines += table(["figure", "ours (SEMU-predicted)", "paper"],
                   [["best size (images)", best["size"], SUBMICRO_BEST],
                    ["cost of sizes below 8 against the best", f"{below8:+.1%}",
                     f"+{SUBMICRO_BELOW_8_COST:.1%}"],
                    ["best/worst gap, sizes 4-12 vs larger",
                     f"{mean_spread(rows, 4, 12):.1%} vs {mean_spread(rows, 13, 99):.1%}",
                     f"{SUBMICRO_GAP[1]:.1%} vs {SUBMICRO_GAP[0]:.1%}"]])
    lines += ["", "![sweep](submicro_sweep.png)"]
    write_report(args.out, "submicro_sweep", lines, {"model": setup.model.name, "sizes": rows})
    fig, ax = figure(7, 3.5)
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["mean_s"] for r in rows], "o-", label="mean iteration (s)")
    ax.set_xlabel("images per sub-microbatch")
    ax.set_ylabel("iteration time (s)")
    twin = ax.twinx()
    twin.plot(sizes, [100 * r["spread_mean"] for r in rows], "s--", color="tab:red",
              label="best/worst spread (%)")
    twin.set_ylabel("best/worst spread (%)")
    ax.set_title(f"{setup.model.name} sub-microbatch sweep (SEMU-predicted)")
    fig.legend(fontsize="small", loc="upper center")
    save_figure(fig, args.out / "submicro_sweep.png")
    return 0


def mean_spread(rows: list[dict], low: int, high: int) -> float:
    values = [r["spread_mean"] for r in rows if low <= r["size"] <= high
              and not math.isnan(r["spread_mean"])]
    return sum(values) / len(values) if values else math.nan


if __name__ == "__main__":
    sys.exit(main())
