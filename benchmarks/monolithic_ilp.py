"""PipeWeaver's search against a monolithic ILP solved by HiGHS (PAPER.md: a monolithic
ILP (Z3, Gurobi) cannot finish beyond ~10 microbatches within 30 minutes).

For batches of the first k microbatches of a workload batch, on PipeWeaver's chunks and
sub-microbatches, the ILP schedules every forward and backward action at once: start
times s_i >= 0, makespan C >= s_i + d_i, s_j >= s_i + d_i + link delay for each
dependency, and for every pair of actions on one rank that no dependency orders, a
binary y_ij with big-M disjunctions (i before j, or j before i). Memory is left out (a
relaxation that only makes the ILP easier); so PipeWeaver plans here without a memory
cap too. Big-M is the makespan of PipeWeaver's default interleaving (an upper bound on
the optimum); HiGHS gets no starting solution. Reported: HiGHS's status, measured wall
time, incumbent and bound, and the incumbent's order re-simulated by SEMU beside
PipeWeaver's plan (made within --budget-ms).

Usage: python benchmarks/monolithic_ilp.py [--model vlm-s] [--microbatches 1,2,4,8,12,16]
       [--time-limit 120] [--budget-ms 1000] [--out docs/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Sequence

import highspy
import numpy as np

from common import figure, header, load_setup, parse, save_figure, table, write_report
from paper import ILP_LIMIT_MICROBATCHES, ILP_LIMIT_MINUTES
from pipeweaver_megatron.planner import (PipeWeaverPlanner, Problem, build_problem, interleave,
                                         partition, split_batch)
from pipeweaver_megatron.semu import price, simulate
from pipeweaver_megatron.workload import GlobalBatch

UNLIMITED_BYTES = 1e18


@dataclasses.dataclass(frozen=True, kw_only=True)
class IlpResult:
    status: str
    wall_s: float
    objective_s: float
    bound_s: float
    binaries: int
    rows: int
    starts: tuple[float, ...] | None


def ancestors(problem: Problem) -> list[int]:
    """Per action, a bitset of the actions it transitively depends on."""
    n = len(problem.actions)
    preds: list[list[int]] = [[] for _ in range(n)]
    for i, users in enumerate(problem.users):
        for j, _ in users:
            preds[j].append(i)
    done: list[int | None] = [None] * n

    def visit(i: int) -> int:
        stack = [i]
        while stack:
            k = stack[-1]
            waiting = [p for p in preds[k] if done[p] is None]
            if waiting:
                stack.extend(waiting)
                continue
            stack.pop()
            if done[k] is None:
                bits = 0
                for p in preds[k]:
                    bits |= done[p] | (1 << p)
                done[k] = bits
        return done[i]

    return [visit(i) for i in range(n)]


def solve(problem: Problem, horizon_s: float, time_limit_s: float) -> IlpResult:
    """The monolithic scheduling ILP (columns: s_0..s_n-1, C, then the y_ij)."""
    n, d = len(problem.actions), problem.duration
    before = ancestors(problem)
    rows: list[tuple[list[int], list[float], float, float]] = []
    inf = highspy.kHighsInf
    for i, users in enumerate(problem.users):
        for j, delay in users:
            rows.append(([j, i], [1.0, -1.0], d[i] + delay, inf))
        rows.append(([n, i], [1.0, -1.0], d[i], inf))
    by_rank: dict[int, list[int]] = {}
    for i, r in enumerate(problem.rank):
        by_rank.setdefault(r, []).append(i)
    for members in by_rank.values():
        rows.append(([n], [1.0], sum(d[i] for i in members), inf))
    big = horizon_s + max(d)
    binaries = 0
    for members in by_rank.values():
        for a, i in enumerate(members):
            for j in members[a + 1:]:
                if before[j] >> i & 1 or before[i] >> j & 1:
                    continue  # a dependency orders them already
                y = n + 1 + binaries
                binaries += 1
                rows.append(([j, i, y], [1.0, -1.0, -big], d[i] - big, inf))  # y=1: i first
                rows.append(([i, j, y], [1.0, -1.0, big], d[j], inf))  # y=0: j first
    cols = n + 1 + binaries
    solver = getattr(highspy, "_Highs", highspy.Highs)()  # see memopt's [Note: quiet HiGHS]
    for name, value in (("output_flag", False), ("time_limit", float(time_limit_s)),
                        ("threads", 1)):
        solver.setOptionValue(name, value)
    lower = np.zeros(cols)
    upper = np.concatenate((np.full(n + 1, horizon_s), np.ones(binaries)))
    cost = np.zeros(cols)
    cost[n] = 1.0
    solver.addVars(cols, lower, upper)
    solver.changeColsCost(cols, np.arange(cols, dtype=np.int32), cost)
    if binaries:
        solver.changeColsIntegrality(binaries, np.arange(n + 1, cols, dtype=np.int32),
                                     np.full(binaries, int(highspy.HighsVarType.kInteger),
                                             dtype=np.uint8))
    starts = np.cumsum([0] + [len(r[0]) for r in rows[:-1]]).astype(np.int32)
    solver.addRows(len(rows), np.array([r[2] for r in rows]), np.array([r[3] for r in rows]),
                   int(starts[-1]) + len(rows[-1][0]), starts,
                   np.array([c for r in rows for c in r[0]], dtype=np.int32),
                   np.array([v for r in rows for v in r[1]]))
    began = time.perf_counter()
    solver.run()
    wall = time.perf_counter() - began
    info, solution = solver.getInfo(), solver.getSolution()
    found = solution.value_valid
    return IlpResult(status=solver.modelStatusToString(solver.getModelStatus()), wall_s=wall,
                     objective_s=info.objective_function_value if found else math.nan,
                     bound_s=info.mip_dual_bound, binaries=binaries, rows=len(rows),
                     starts=tuple(solution.col_value[:n]) if found else None)


def instance(setup, planner: PipeWeaverPlanner, batch: GlobalBatch, limit_s: float,
             budget_ms: float, seed: int) -> dict:
    subs = split_batch(setup.model, batch, planner.rules, planner.chunks.sub_size)
    base = price(setup.costs, planner.layout, subs.shapes)
    problem = build_problem(setup.costs, planner.layout, subs.counts, base.costs,
                            batch.num_microbatches)
    default = interleave(problem, None, [UNLIMITED_BYTES] * problem.num_ranks)
    ilp = solve(problem, default.makespan_s, limit_s)
    semu_s = math.nan
    if ilp.starts is not None:
        order = sorted(range(len(problem.actions)), key=lambda i: (ilp.starts[i], i))
        ranks = [tuple(problem.actions[i] for i in order if problem.rank[i] == r)
                 for r in range(problem.num_ranks)]
        table_ = dataclasses.replace(default.table, ranks=tuple(ranks))
        semu_s = simulate(setup.costs, table_, subs.shapes, priced=base,
                          detail=False).pipeline_time_s
    began = time.perf_counter()
    ours = planner.plan(batch, budget_ms, seed)
    row = {"microbatches": batch.num_microbatches, "actions": len(problem.actions),
           "binaries": ilp.binaries, "rows": ilp.rows, "status": ilp.status,
           "ilp_wall_s": ilp.wall_s,
           "ilp_objective_s": ilp.objective_s, "ilp_bound_s": ilp.bound_s, "ilp_semu_s": semu_s,
           "ours_semu_s": ours.simulation.pipeline_time_s,
           "ours_wall_s": time.perf_counter() - began}
    print(f"  k={row['microbatches']}: ILP {ilp.status} in {ilp.wall_s:.1f} s, incumbent "
          f"{ilp.objective_s:.3f} s (bound {ilp.bound_s:.3f}); ours {row['ours_semu_s']:.3f} s "
          f"in {row['ours_wall_s']:.1f} s", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-s")
    parser.add_argument("--microbatches", default="1,2,4,8,12,16")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per ILP")
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    setup = load_setup(args.model, 1, args.seed)
    chunks = partition(setup.costs, reference=setup.batches[0])
    planner = PipeWeaverPlanner(setup.costs, chunks, capacity_bytes=UNLIMITED_BYTES)
    microbatches = setup.batches[0].microbatches
    rows = [instance(setup, planner, GlobalBatch(iteration=0, microbatches=microbatches[:int(k)]),
                     args.time_limit, args.budget_ms, args.seed)
            for k in args.microbatches.split(",")]
    lines = header(f"PipeWeaver's search against a monolithic ILP ({setup.model.name})",
                   "monolithic_ilp", shown,
                   "Times of schedules are SEMU-predicted pipeline makespans (H800 profile, no "
                   "memory limit, no recompute); solver and planner wall times are measured on "
                   f"one core of this machine. ILP time limit {args.time_limit:g} s per instance "
                   f"(the paper's: {ILP_LIMIT_MINUTES} minutes); PipeWeaver's budget "
                   f"{args.budget_ms:g} ms.")
    lines += table(["microbatches", "actions", "binaries", "HiGHS status", "ILP wall (s)",
                    "ILP incumbent (s)", "ILP bound (s)", "incumbent in SEMU (s)",
                    "PipeWeaver in SEMU (s)", "PipeWeaver wall (s)", "PipeWeaver vs incumbent"],
                   [[r["microbatches"], r["actions"], r["binaries"], r["status"],
                     f"{r['ilp_wall_s']:.1f}", f"{r['ilp_objective_s']:.3f}",
                     f"{r['ilp_bound_s']:.3f}", f"{r['ilp_semu_s']:.3f}",
                     f"{r['ours_semu_s']:.3f}", f"{r['ours_wall_s']:.1f}",
                     f"{r['ours_semu_s'] / r['ilp_semu_s'] - 1:+.1%}"
                     if not math.isnan(r["ilp_semu_s"]) else "no incumbent"] for r in rows])
    solved = [r["microbatches"] for r in rows if r["status"] == "Optimal"]
    lines += ["", f"HiGHS proved optimality up to {max(solved, default=0)} microbatches within "
              f"{args.time_limit:g} s (paper: ~{ILP_LIMIT_MICROBATCHES} microbatches within "
              f"{ILP_LIMIT_MINUTES} minutes for Z3 and Gurobi).", "", "![ilp](monolithic_ilp.png)"]
    write_report(args.out, "monolithic_ilp", lines, {"model": setup.model.name, "rows": rows})
    fig, ax = figure(7, 3.5)
    ks = [r["microbatches"] for r in rows]
    ax.plot(ks, [r["ilp_wall_s"] for r in rows], "o-", label="monolithic ILP (HiGHS)")
    ax.plot(ks, [r["ours_wall_s"] for r in rows], "s-", label="PipeWeaver search")
    ax.axhline(args.time_limit, color="grey", linestyle=":", label="ILP time limit")
    ax.set_yscale("log")
    ax.set_xlabel("microbatches")
    ax.set_ylabel("wall time (s, measured)")
    ax.set_title(f"{setup.model.name}: planning time")
    ax.legend(fontsize="small")
    save_figure(fig, args.out / "monolithic_ilp.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
