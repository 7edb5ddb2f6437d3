"""Efficiency factors per op class, their JSON file, and the fit from measurements.

Without a calibration file SEMU uses DEFAULT_FACTORS, typical fractions of peak on
data-centre GPUs: large bf16 GEMMs reach ~70% of peak on Hopper (NVIDIA cuBLAS
benchmarks; Megatron-LM reports 52% end-to-end MFU for GPT-3 175B on A100,
Narayanan et al. SC'21), FlashAttention-2 reaches 50-73% of peak forward and less
backward (Dao 2023), memory-bound kernels ~80% of HBM bandwidth and NCCL collectives
~80% of link bandwidth. `pipeweaver profile` measures the machine and fits them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .ops import OpClass

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassFactors:
    """Latency = overhead_s + max(a_f*FLOPs/F, a_m*bytes/B_mem, a_n*net_bytes/B_net)."""

    a_f: float = 1.0
    """Slowdown against peak FLOP/s (1 = peak)."""
    a_m: float = 1.0
    """Slowdown against peak memory bandwidth."""
    a_n: float = 1.0
    """Slowdown against link bandwidth."""
    overhead_s: float = 0.0
    """Fixed cost per op (kernel launch, framework dispatch)."""

    def __post_init__(self) -> None:
        for key in ("a_f", "a_m", "a_n"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.overhead_s < 0:
            raise ValueError(f"overhead_s must be >= 0, got {self.overhead_s}")


DEFAULT_FACTORS: dict[OpClass, ClassFactors] = {
    OpClass.GEMM: ClassFactors(a_f=1 / 0.70, a_m=1 / 0.80, overhead_s=5e-6),
    OpClass.ATTENTION: ClassFactors(a_f=1 / 0.50, a_m=1 / 0.80, overhead_s=5e-6),
    OpClass.ELEMENTWISE: ClassFactors(a_f=1.0, a_m=1 / 0.80, overhead_s=4e-6),
    OpClass.COLLECTIVE: ClassFactors(a_m=1 / 0.80, a_n=1 / 0.80, overhead_s=10e-6),
    OpClass.P2P: ClassFactors(a_n=1 / 0.80),
}


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Efficiency factors for one machine, optionally with measured peaks."""

    hardware: str
    """Hardware profile the factors are relative to."""
    device: str = ""
    """Kind of device measured ('' for the built-in defaults)."""
    factors: dict[OpClass, ClassFactors] = field(default_factory=lambda: dict(DEFAULT_FACTORS))
    """Factors per op class; missing classes use DEFAULT_FACTORS."""
    source: str = "defaults"
    """Where the numbers come from (a file path or 'defaults')."""
    measurements: dict[str, Any] = field(default_factory=dict)
    """The raw microbenchmark points, kept for the record."""

    def factor(self, cls: OpClass) -> ClassFactors:
        """Factors of one class."""
        return self.factors.get(cls, DEFAULT_FACTORS[cls])

    @property
    def key(self) -> tuple:
        """Hashable identity for caches."""
        return (self.hardware, tuple(sorted((c.value, f.a_f, f.a_m, f.a_n, f.overhead_s)
                                            for c, f in self.factors.items())))

    def to_json(self) -> dict[str, Any]:
        """JSON form (enums by value)."""
        return {"schema_version": SCHEMA_VERSION, "hardware": self.hardware,
                "device": self.device,
                "factors": {c.value: {"a_f": f.a_f, "a_m": f.a_m, "a_n": f.a_n,
                                      "overhead_s": f.overhead_s}
                            for c, f in self.factors.items()},
                "measurements": self.measurements}

    def save(self, path: str | Path) -> None:
        """Write the JSON file."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2))


class CalibrationError(ValueError):
    """A calibration file is malformed; the message names the file and the key."""


def load_calibration(path: str | Path) -> Calibration:
    """Read a file written by `pipeweaver profile`."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise CalibrationError(f"{path}: schema_version: expected {SCHEMA_VERSION}")
    factors = {}
    for name, values in (data.get("factors") or {}).items():
        try:
            factors[OpClass(name)] = ClassFactors(**values)
        except (ValueError, TypeError) as exc:
            raise CalibrationError(f"{path}: factors.{name}: {exc}") from None
    if "hardware" not in data:
        raise CalibrationError(f"{path}: hardware: missing")
    return Calibration(hardware=str(data["hardware"]), device=str(data.get("device", "")),
                       factors={**DEFAULT_FACTORS, **factors}, source=str(path),
                       measurements=data.get("measurements") or {})


@dataclass(frozen=True, slots=True)
class Point:
    """One microbenchmark measurement."""

    flops: float
    mem_bytes: float
    net_bytes: float
    seconds: float


def fit_factors(points: Iterable[Point], peak_flops: float, memory_bandwidth: float,
                link_bandwidth: float) -> ClassFactors:
    """Fit overhead and one slowdown factor to measurements of one op class.

    Each point's ideal time is its largest roofline term (compute, memory or link); the
    model time = overhead + a * ideal, fitted by least squares on relative error, and the
    factor is assigned to the resource that bounds most points. Relative error matters
    because times span orders of magnitude.
    """
    pts = list(points)
    if len(pts) < 2:
        raise ValueError("need at least two measurements to fit")
    terms = np.array([[p.flops / peak_flops, p.mem_bytes / memory_bandwidth,
                       p.net_bytes / link_bandwidth] for p in pts])
    bound = terms.argmax(axis=1)
    ideal = terms.max(axis=1)
    seconds = np.array([p.seconds for p in pts])
    design = np.stack([np.ones_like(ideal), ideal], axis=1) / seconds[:, None]
    (overhead, slope), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
    if overhead < 0 or slope <= 0:
        overhead = 0.0
        slope = float(np.median(seconds / np.maximum(ideal, 1e-30)))
    which = int(np.bincount(bound, minlength=3).argmax())
    values = {"a_f": 1.0, "a_m": 1.0, "a_n": 1.0}
    values[("a_f", "a_m", "a_n")[which]] = float(slope)
    return ClassFactors(overhead_s=float(overhead), **values)
