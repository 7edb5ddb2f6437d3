"""SEMU speed: one full simulation of VLM-L, and scoring candidate schedules with and
without spatial-temporal subgraph reuse.

Candidates are random valid schedules of one VLM-L batch on Megatron's interleaved
layout: each is a random topological order of all actions projected onto the ranks
(so it runs without deadlock), as a search would produce them. With reuse, stage costs
come from the cache after the first candidate; without, every candidate rebuilds and
re-prices every stage graph. Timings are wall-clock on this machine.

Usage: python benchmarks/semu_speed.py [--candidates 1000] [--no-reuse-candidates 50]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import ScheduleTable, random_order
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import CostModel, batch_shapes, price, simulate
from pipeweaver_megatron.workload import TokenRules, sample_workload


def random_candidates(table: ScheduleTable, count: int, seed: int) -> list[ScheduleTable]:
    """Random valid orders of the table's actions (ir.random_order)."""
    rng = random.Random(seed)
    return [random_order(table, rng) for _ in range(count)]


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vlm-l")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--no-reuse-candidates", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/semu_speed.md")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    batch = sample_workload(model, None, 1, args.seed)[0]
    shapes = batch_shapes(model, batch, TokenRules.from_model(model))
    hw = get_hardware(model.hardware)
    rows = []
    for name in ("megatron-1f1b", "megatron-interleaved"):
        table = build_baseline(model, name)
        costs = CostModel(model, hw)
        simulate(costs, table, shapes)
        priced = price(costs, table.layout, shapes)
        n = sum(len(r) for r in table.ranks)
        for label, kwargs in (("full detail", {}), ("summary only", {"detail": False}),
                              ("summary, priced batch", {"detail": False, "priced": priced})):
            seconds = timed(lambda: simulate(costs, table, shapes, **kwargs), 30)
            rows.append(f"| {name} ({n} actions, {table.num_microbatches} microbatches) | "
                        f"{label} | {seconds * 1e3:.2f} ms |")
    table = build_baseline(model, "megatron-interleaved")
    candidates = random_candidates(table, args.candidates, args.seed)
    warm = CostModel(model, hw)
    start = time.perf_counter()
    scores = [simulate(warm, c, shapes, detail=False).iteration_time_s for c in candidates]
    with_reuse = (time.perf_counter() - start) / len(candidates)
    cold = CostModel(model, hw, reuse=False)
    subset = candidates[: args.no_reuse_candidates]
    start = time.perf_counter()
    plain = [simulate(cold, c, shapes, detail=False).iteration_time_s for c in subset]
    without = (time.perf_counter() - start) / len(subset)
    assert plain == scores[: len(subset)], "reuse changed a result"
    lines = [f"# SEMU speed ({model.name})", "",
             f"Produced by: `python benchmarks/semu_speed.py --candidates {args.candidates} "
             f"--no-reuse-candidates {args.no_reuse_candidates} --seed {args.seed}` "
             "(wall-clock, this machine).", "",
             "| schedule | mode | one simulation |", "|---|---|---|", *rows, "",
             f"Scoring random candidate schedules (interleaved layout, "
             f"{sum(len(r) for r in table.ranks)} actions each):", "",
             "| reuse | candidates timed | per candidate | total for 1000 |", "|---|---|---|---|",
             f"| on (cache hit rate {warm.stats.hit_rate:.1%}) | {len(candidates)} | "
             f"{with_reuse * 1e3:.2f} ms | {with_reuse * 1000:.1f} s |",
             f"| off | {len(subset)} | {without * 1e3:.2f} ms | {without * 1000:.1f} s |", "",
             f"Speed-up from reuse: {without / with_reuse:.1f}x; identical scores on the "
             f"{len(subset)} candidates compared. Best random candidate "
             f"{min(scores):.2f} s, worst {max(scores):.2f} s, Megatron's interleaved "
             f"{simulate(warm, table, shapes, detail=False).iteration_time_s:.2f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
