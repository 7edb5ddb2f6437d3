"""SEMU calibrated online: the runtime terms refitted from the iterations just trained.

The planner worker remembers, for each plan it made, every compute action's predicted
time stripped of the runtime terms it was predicted with (the calibration's per chunk
kind overhead and scale, so predictions made under different fits are comparable). The
training side sends back each iteration's measured compute times (by action label) and
the time the iteration spent outside the pipeline (its time minus the longest rank's
first-to-last op span). Over a window of the last WINDOW measured iterations the terms
are refitted as runtime_fit.py fits them offline (per phase, measured = overhead + scale
* compute, least squares on relative error; per chunk kind where it has enough actions;
the iteration overhead the window's median), after dropping outliers: pairs whose
measured/predicted ratio lies more than OUTLIER_MADS median absolute deviations (in log)
from the window's median, per phase. Every refit returns a new Calibration; the planner
prices the next batches with it.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from statistics import median

from ..ir import Action, Layout, Op
from .calibration import Calibration
from .runtime_fit import MIN_ACTIONS, RuntimeSamples, fit_samples
from .simulate import SimResult

WINDOW = 4
"""Measured iterations each refit uses."""
OUTLIER_MADS = 4.0
KEPT_PLANS = 16
"""Plans remembered until their measurements come back."""


@dataclass(frozen=True)
class Measured:
    """One trained iteration, as the training side reports it."""

    actions: dict[str, float]
    """Action label ("3F12", "0B4.2") -> measured compute seconds."""
    outside_s: float
    """Iteration time minus the longest rank's first-to-last op span (>= 0)."""


class OnlineCalibration:
    """Refits the runtime terms of `base` from measured iterations (see the module note)."""

    def __init__(self, base: Calibration, window: int = WINDOW) -> None:
        self.current = base
        self.fits = 0
        self._neutral = replace(base, action_overhead_s=(0.0, 0.0), action_scale=(1.0, 1.0),
                                chunk_runtime={})
        self._plans: OrderedDict[int, dict[str, tuple[str, str, float]]] = OrderedDict()
        self._window: deque[tuple[list[tuple[str, str, float, float]], float]] = deque(
            maxlen=window)

    def planned(self, key: int, result: SimResult, layout: Layout) -> None:
        """Remember a plan's detailed prediction (simulate(..., detail=True)), made with
        the current calibration."""
        compute = {}
        for actions, starts, ends in zip(result.actions, result.starts, result.ends):
            for action, start, end in zip(actions, starts, ends):
                kind = _kind(layout, action)
                terms = self.current.runtime_terms(kind)
                phase = 0 if action.op == Op.F else 1
                stripped = (end - start - terms.overhead_s[phase]) / terms.scale[phase]
                compute[str(action)] = ("FB"[phase], kind, max(stripped, 1e-9))
        self._plans[key] = compute
        while len(self._plans) > KEPT_PLANS:
            self._plans.popitem(last=False)

    def measured(self, key: int, measured: Measured) -> Calibration | None:
        """Add one iteration's measurements; the refitted calibration, or None when the
        plan is unknown here (another worker made it) or nothing matched."""
        predicted = self._plans.pop(key, None)
        if predicted is None:
            return None
        pairs = [(phase, kind, seconds, measured.actions[label])
                 for label, (phase, kind, seconds) in predicted.items()
                 if measured.actions.get(label, 0.0) > 0]
        if not pairs:
            return None
        self._window.append((pairs, max(measured.outside_s, 0.0)))
        samples = _samples(self._window)
        if not samples.actions["F"] or not samples.actions["B"]:
            return None
        self.current = fit_samples(self._neutral, samples, "online calibration")
        self.fits += 1
        return self.current


def _kind(layout: Layout, action: Action) -> str:
    return "+".join(layout.stages[action.stage].modules)


def _samples(window) -> RuntimeSamples:
    """The window's pairs, outliers dropped per phase, as runtime_fit's samples."""
    actions: dict[str, list[tuple[str, float, float]]] = {"F": [], "B": []}
    for pairs, _ in window:
        for phase, kind, predicted, took in pairs:
            actions[phase].append((kind, predicted, took))
    for phase, pairs in actions.items():
        if len(pairs) >= MIN_ACTIONS:
            logs = [math.log(took / predicted) for _, predicted, took in pairs]
            centre = median(logs)
            spread = median(abs(x - centre) for x in logs) or 1e-12
            actions[phase] = [p for p, x in zip(pairs, logs)
                              if abs(x - centre) <= OUTLIER_MADS * spread]
    return RuntimeSamples(actions, [outside for _, outside in window])


__all__ = ["Measured", "OnlineCalibration", "WINDOW"]
