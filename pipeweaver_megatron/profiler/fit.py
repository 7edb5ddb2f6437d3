"""From measurements to a Calibration: one fit_factors per op class."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Iterable

from ..config import HardwareProfile
from ..semu.calibration import DEFAULT_FACTORS, Calibration, ClassFactors, fit_factors
from ..semu.ops import OpClass
from .measurement import Measurement


def measured_roofline(measurements: list[Measurement], hw: HardwareProfile) -> HardwareProfile:
    """The profile with the best FLOP/s of any GEMM and the best bytes/s of any
    elementwise op measured here: a roofline no measured op beats, so every fitted
    factor is >= 1 and SEMU never predicts an op faster than its roofline."""
    flops = [m.flops / m.seconds for m in measurements if m.cls == OpClass.GEMM and m.seconds]
    bandwidth = [m.mem_bytes / m.seconds for m in measurements
                 if m.cls == OpClass.ELEMENTWISE and m.seconds]
    return dataclasses.replace(hw, peak_flops=max(flops, default=hw.peak_flops),
                               memory_bandwidth=max(bandwidth, default=hw.memory_bandwidth))


def causal_fraction(measurements: list[Measurement]) -> float:
    """Median time of causal over bidirectional SDPA at equal shapes (0.5 when the kernel
    skips masked blocks, ~1 when it computes and masks)."""
    times: dict[tuple, dict[bool, float]] = {}
    for m in measurements:
        if m.cls == OpClass.ATTENTION and "causal" in m.shape:
            key = (m.op, *(v for k, v in sorted(m.shape.items()) if k != "causal"))
            times.setdefault(key, {})[bool(m.shape["causal"])] = m.seconds
    ratios = [t[True] / t[False] for t in times.values() if True in t and False in t]
    return min(1.0, max(0.05, statistics.median(ratios))) if ratios else 0.5


def _at_least_one(factors: ClassFactors) -> ClassFactors:
    return ClassFactors(a_f=max(1.0, factors.a_f), a_m=max(1.0, factors.a_m),
                        a_n=max(1.0, factors.a_n), overhead_s=factors.overhead_s)


def predict(factors: ClassFactors, m: Measurement, hw: HardwareProfile) -> float:
    """SEMU's latency of a measured op (the cost model's own formula)."""
    return factors.latency(m.flops, m.mem_bytes, m.net_bytes, hw)


def fit_calibration(measurements: Iterable[Measurement], hw: HardwareProfile, device_label: str,
                    info: dict[str, Any], skipped: dict[str, str]) -> Calibration:
    """Fit every class that has measurements; the others keep DEFAULT_FACTORS.

    Links are the hardware's intra-node bandwidth (the two benchmark processes share a
    node). The returned Calibration's measurements hold info, every point with the
    fitted model's prediction and error, a per-class error summary, and skipped classes.
    """
    measurements = list(measurements)
    nominal = hw
    hw = measured_roofline(measurements, hw)
    fraction = causal_fraction(measurements)
    by_class: dict[OpClass, list[Measurement]] = {}
    for m in measurements:
        if m.cls == OpClass.ATTENTION and m.shape.get("causal"):
            # Price causal points as SEMU will: full FLOPs times the measured fraction.
            m = dataclasses.replace(m, flops=m.flops * 2 * fraction)
        by_class.setdefault(m.cls, []).append(m)
    factors = dict(DEFAULT_FACTORS)
    points: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for cls, group in by_class.items():
        fitted = _at_least_one(fit_factors((m.point() for m in group), hw.peak_flops,
                                           hw.memory_bandwidth, hw.intra_node_bandwidth))
        factors[cls] = fitted
        rows = [m.to_json(predict(fitted, m, hw)) for m in group]
        errors = [abs(row["error_pct"]) for row in rows]
        points[cls.value] = rows
        summary[cls.value] = {"points": len(rows),
                              "median_abs_error_pct": statistics.median(errors),
                              "max_abs_error_pct": max(errors)}
    record = {"info": info, "fit": summary, "skipped": skipped, "points": points}
    fields: dict[str, Any] = {"hardware": nominal.name, "device": device_label,
                              "factors": factors, "source": "pipeweaver profile",
                              "measurements": record, "peak_flops": hw.peak_flops,
                              "memory_bandwidth": hw.memory_bandwidth,
                              "causal_fraction": fraction}
    return Calibration(**fields)
