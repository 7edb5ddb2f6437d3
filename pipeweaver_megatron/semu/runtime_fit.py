"""Fit SEMU's runtime terms from measured training runs.

`scripts/pretrain_lmm.py --pipeweaver-trace-dir DIR` writes, per iteration, SEMU's
predicted trace (predicted_<iteration>.json), every rank's measured ops
(measured_<iteration>_rank<r>.json, seconds from the iteration's start) and the
iteration's measured time (iteration_<iteration>.json). From them:

- per phase (forward, backward), every compute action present in both gives a pair
  (SEMU's compute time without the runtime terms, measured time); a least-squares fit on
  relative error of measured = overhead + scale * compute gives action_overhead_s and
  action_scale (overhead >= 0, scale > 0) over all actions, and chunk_runtime per chunk
  kind (its modules, e.g. "vision+projector+lm") with at least MIN_ACTIONS actions of
  each phase;
- per iteration, the measured time minus the longest rank's span from its first to its
  last op is what the iteration spends outside the pipeline; its median is
  iteration_overhead_s.

Iterations before `skip` (warm-up) are ignored. Several directories (runs of several
schedules or seeds) may be fitted together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Iterable

from .calibration import Calibration, CalibrationError, RuntimeTerms, fit_linear

MIN_ACTIONS = 20
"""Actions per phase a chunk kind needs for terms of its own."""
_ACTION = re.compile(r"^(\d+)([FB])(\d+)(?:\.(\d+))?$")
_MEASURED = re.compile(r"^measured_(\d+)_rank(\d+)\.json$")


@dataclass(frozen=True)
class RuntimeSamples:
    """What the traces say about the runtime."""

    actions: dict[str, list[tuple[str, float, float]]]
    """Per phase ("F", "B"): (chunk kind, predicted, measured seconds) of every matched
    action."""
    outside: list[float]
    """Per iteration: measured time outside the longest rank's first-to-last op span."""


def runtime_samples(directories: Iterable[str | Path], skip: int = 1) -> RuntimeSamples:
    """Every matched action and every iteration of the trace directories."""
    actions: dict[str, list[tuple[str, float, float]]] = {"F": [], "B": []}
    outside: list[float] = []
    for directory in map(Path, directories):
        spans: dict[str, list[float]] = {}
        for path in sorted(directory.iterdir()):
            found = _MEASURED.match(path.name)
            if found is None or int(found.group(1)) < skip:
                continue
            ops = json.loads(path.read_text())
            if ops:
                spans.setdefault(found.group(1), []).append(ops[-1]["end_s"] - ops[0]["start_s"])
            predicted_path = directory / f"predicted_{found.group(1)}.json"
            if not predicted_path.exists():
                continue  # only the group's first rank writes predictions
            predicted = _predicted(predicted_path)
            for op in ops:
                name = compute_action(op["op"])
                if name in predicted:
                    phase = _ACTION.match(name).group(2)
                    kind, seconds = predicted[name]
                    actions[phase].append((kind, seconds, op["end_s"] - op["start_s"]))
        for iteration, found in spans.items():
            path = directory / f"iteration_{iteration}.json"
            if path.exists():
                took = json.loads(path.read_text())["iteration_time_s"]
                outside.append(max(0.0, took - max(found)))
    return RuntimeSamples(actions, outside)


def compute_action(op: str) -> str | None:
    """The action label of a measured compute op ("Compute(3F12)" -> "3F12"), else None."""
    return op[len("Compute("):-1] if op.startswith("Compute(") else None


def _predicted(path: Path) -> dict[str, tuple[str, float]]:
    """Action -> (chunk kind, predicted seconds)."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    out = {}
    for event in events:
        name = str(event.get("name", "")).split(" ")[0]
        if event.get("ph") == "X" and _ACTION.match(name):
            out[name] = (str(event.get("args", {}).get("module", "")), event["dur"] / 1e6)
    return out


def fit_runtime(calibration: Calibration, directories: Iterable[str | Path],
                skip: int = 1) -> Calibration:
    """The calibration with its runtime terms fitted to the traces (the traces must have
    been predicted with `calibration`: its own runtime terms are taken out first)."""
    directories = list(directories)
    return fit_samples(calibration, runtime_samples(directories, skip),
                       ", ".join(map(str, directories)))


def fit_samples(calibration: Calibration, samples: RuntimeSamples, source: str) -> Calibration:
    """fit_runtime on samples already read (source names them in errors)."""
    if not samples.actions["F"] or not samples.actions["B"]:
        raise CalibrationError(f"{source}: no measured forward and backward actions to match "
                               "with predictions (run pretrain_lmm with --pipeweaver-trace-dir)")
    overall = _fit(calibration, samples.actions, None)
    kinds = {kind for pairs in samples.actions.values() for kind, _, _ in pairs}
    chunks = {}
    for kind in sorted(kinds):
        if all(sum(k == kind for k, _, _ in samples.actions[p]) >= MIN_ACTIONS for p in "FB"):
            chunks[kind] = _fit(calibration, samples.actions, kind)
    iteration = median(samples.outside) if samples.outside else calibration.iteration_overhead_s
    return replace(calibration, action_overhead_s=overall.overhead_s, action_scale=overall.scale,
                   iteration_overhead_s=iteration, chunk_runtime=chunks)


def _fit(calibration: Calibration, actions: dict, kind: str | None) -> RuntimeTerms:
    """Runtime terms of one chunk kind (None: every action), each prediction first
    stripped of the terms it was made with."""
    overheads, scales = [], []
    for index, phase in enumerate("FB"):
        compute, measured = [], []
        for chunk, predicted, took in actions[phase]:
            if kind is not None and chunk != kind:
                continue
            prior = calibration.runtime_terms(chunk)
            compute.append(max((predicted - prior.overhead_s[index]) / prior.scale[index], 1e-9))
            measured.append(took)
        overhead, scale = fit_linear(compute, measured)
        overheads.append(overhead)
        scales.append(scale)
    return RuntimeTerms(tuple(overheads), tuple(scales))
