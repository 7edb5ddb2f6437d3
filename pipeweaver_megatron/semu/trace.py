"""Exports of a simulated iteration: Chrome/Perfetto trace JSON and a timeline PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..ir import Layout, Op
from .simulate import GIB, SimResult

_US = 1e6


def _module_of(layout: Layout, stage: int) -> str:
    return "+".join(layout.stages[stage].modules)


def trace_events(result: SimResult, layout: Layout, name: str = "semu") -> dict:
    """Trace Event Format: a process per rank with a compute and a p2p track, plus a
    memory counter. Load it in ui.perfetto.dev or chrome://tracing."""
    if not result.actions:
        raise ValueError("simulate with detail=True to export a trace")
    events: list[dict] = []
    for rank, actions in enumerate(result.actions):
        events.append({"ph": "M", "name": "process_name", "pid": rank,
                       "args": {"name": f"rank {rank}"}})
        for tid, label in ((0, "compute"), (1, "p2p send")):
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid,
                           "args": {"name": label}})
        for action, start, end in zip(actions, result.starts[rank], result.ends[rank]):
            events.append({"ph": "X", "name": str(action), "pid": rank, "tid": 0,
                           "ts": start * _US, "dur": (end - start) * _US,
                           "cat": "forward" if action.op == Op.F else "backward",
                           "args": {"module": _module_of(layout, action.stage),
                                    "microbatch": action.microbatch, "sub": action.sub}})
        for time, level in result.memory_timeline[rank]:
            events.append({"ph": "C", "name": "memory", "pid": rank, "ts": time * _US,
                           "args": {"GiB": level / GIB}})
    for t in result.transfers:
        events.append({"ph": "X", "name": t.label, "pid": t.src, "tid": 1, "ts": t.start * _US,
                       "dur": (t.end - t.start) * _US, "cat": "p2p", "args": {"to": t.dst}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"name": name, "iteration_time_s": result.iteration_time_s}}


def write_trace(result: SimResult, layout: Layout, path: str | Path, name: str = "semu") -> None:
    """Write the trace JSON."""
    Path(path).write_text(json.dumps(trace_events(result, layout, name)))


def write_plot(result: SimResult, layout: Layout, path: str | Path, title: str = "") -> None:
    """A timeline PNG: a row per rank (forward light, backward dark, colour per module)
    and the memory of every rank below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result.actions:
        raise ValueError("simulate with detail=True to plot")
    modules = sorted({_module_of(layout, s.index) for s in layout.stages})
    palette = plt.get_cmap("tab10")
    colour = {m: palette(i % 10) for i, m in enumerate(modules)}
    ranks = len(result.actions)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 2 + 0.6 * ranks + 2.5),
                                      gridspec_kw={"height_ratios": [ranks, 3]}, sharex=True)
    for rank, actions in enumerate(result.actions):
        for action, start, end in zip(actions, result.starts[rank], result.ends[rank]):
            base = colour[_module_of(layout, action.stage)]
            alpha = 0.55 if action.op == Op.F else 1.0
            top.barh(rank, end - start, left=start, color=base, alpha=alpha,
                     edgecolor="black", linewidth=0.2)
    top.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    top.invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[m]) for m in modules]
    top.legend(handles, modules, loc="upper right", fontsize="small")
    top.set_title(title or f"iteration {result.iteration_time_s:.3f} s, bubble "
                           f"{result.bubble_ratio:.1%}, MFU {result.mfu:.1%}")
    for rank, line in enumerate(result.memory_timeline):
        times = [t for t, _ in line] + [result.pipeline_time_s]
        levels = [b / GIB for _, b in line] + [line[-1][1] / GIB]
        bottom.step(times, levels, where="post", label=f"rank {rank}")
    bottom.set_ylabel("memory (GiB)")
    bottom.set_xlabel("time (s)")
    bottom.legend(fontsize="x-small", ncol=min(ranks, 8))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
