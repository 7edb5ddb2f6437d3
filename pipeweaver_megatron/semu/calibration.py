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

    def latency(self, flops: float, mem_bytes: float, net_bytes: float, hw: Any) -> float:
        """The one roofline formula: overhead + max of the compute, memory and link terms
        against hw's peak_flops, memory_bandwidth and intra_node_bandwidth."""
        return self.overhead_s + max(self.a_f * flops / hw.peak_flops,
                                     self.a_m * mem_bytes / hw.memory_bandwidth,
                                     self.a_n * net_bytes / hw.intra_node_bandwidth)

    def __post_init__(self) -> None:
        for key in ("a_f", "a_m", "a_n"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.overhead_s < 0:
            raise ValueError(f"overhead_s must be >= 0, got {self.overhead_s}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PhaseFactors:
    """One phase of a transformer layer: time = sum over its ops of scale(op class) *
    latency + overhead_s. Identity (all scales 1, no overhead) when not measured."""

    gemm: float = 1.0
    attention: float = 1.0
    elementwise: float = 1.0
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for key in ("gemm", "attention", "elementwise"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.overhead_s < 0:
            raise ValueError(f"overhead_s must be >= 0, got {self.overhead_s}")

    def scale(self, cls: OpClass) -> float:
        """Multiplier of an op class's latencies inside a layer (1 for communication)."""
        return getattr(self, cls.value, 1.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerFactors:
    """Per transformer layer, on top of its ops' latencies, fitted by `pipeweaver
    profile` from real megatron-core layers: overhead_s is the framework's dispatch cost
    of one layer (Python, autograd, small unmodelled ops) and the scales the efficiency
    real layers lose or gain per op class (unfused norms and rotary, cache reuse)."""

    forward: PhaseFactors = PhaseFactors()
    backward: PhaseFactors = PhaseFactors()


IDENTITY_LAYER = LayerFactors()


DEFAULT_FACTORS: dict[OpClass, ClassFactors] = {
    OpClass.GEMM: ClassFactors(a_f=1 / 0.70, a_m=1 / 0.80, overhead_s=5e-6),
    OpClass.ATTENTION: ClassFactors(a_f=1 / 0.50, a_m=1 / 0.80, overhead_s=5e-6),
    OpClass.ELEMENTWISE: ClassFactors(a_f=1.0, a_m=1 / 0.80, overhead_s=4e-6),
    OpClass.COLLECTIVE: ClassFactors(a_m=1 / 0.80, a_n=1 / 0.80, overhead_s=10e-6),
    OpClass.P2P: ClassFactors(a_n=1 / 0.80),
}


@dataclass(frozen=True)
class RuntimeTerms:
    """What the runtime adds to SEMU's compute time of one stage action, per phase
    (forward, backward): time = overhead + scale * compute."""

    overhead_s: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)


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
    peak_flops: float = 0.0
    """Measured roofline peak (best GEMM FLOP/s); 0 keeps the hardware profile's."""
    memory_bandwidth: float = 0.0
    """Measured roofline bandwidth (best elementwise bytes/s); 0 keeps the profile's."""
    causal_fraction: float = 0.5
    """Cost of causal attention relative to full attention: 0.5 for kernels that skip
    masked blocks (flash attention), ~1 for kernels that compute then mask."""
    layer_factors: dict[str, LayerFactors] = field(default_factory=dict)
    """Per module kind (vision_encoder, language_model, generator)."""
    action_overhead_s: tuple[float, float] = (0.0, 0.0)
    """Fixed seconds the runtime adds to every stage forward and backward (executor,
    chunk entry, autograd engine), fitted from measured training runs by
    `pipeweaver calibrate` (semu/runtime_fit.py); 0 until then."""
    action_scale: tuple[float, float] = (1.0, 1.0)
    """How much slower a stage forward / backward computes inside a training run than
    its layers alone in the profiler (caches and memory bandwidth shared with the other
    ranks), fitted with action_overhead_s; 1 until then."""
    iteration_overhead_s: float = 0.0
    """Seconds a training iteration spends outside its pipeline ops (plan check, data
    iterator, loss reduction, optimizer launch), fitted by `pipeweaver calibrate`."""
    chunk_runtime: dict[str, "RuntimeTerms"] = field(default_factory=dict)
    """Per chunk kind (its modules joined by "+", e.g. "vision+projector+lm"): runtime
    terms fitted for that kind alone, used instead of action_overhead_s / action_scale
    (a chunk's parts each add their own entry and glue, which one global pair averages)."""

    def runtime_terms(self, modules: str) -> "RuntimeTerms":
        """The runtime terms of a chunk kind (the global ones when not fitted apart)."""
        found = self.chunk_runtime.get(modules)
        if found is not None:
            return found
        return RuntimeTerms(self.action_overhead_s, self.action_scale)

    def __post_init__(self) -> None:
        if min(self.action_overhead_s) < 0 or self.iteration_overhead_s < 0:
            raise ValueError(f"action_overhead_s and iteration_overhead_s must be >= 0, got "
                             f"{self.action_overhead_s} and {self.iteration_overhead_s}")
        if min(self.action_scale) <= 0:
            raise ValueError(f"action_scale must be > 0, got {self.action_scale}")
        for kind, terms in self.chunk_runtime.items():
            if min(terms.overhead_s) < 0 or min(terms.scale) <= 0:
                raise ValueError(f"chunk_runtime.{kind}: overheads must be >= 0 and scales "
                                 f"> 0, got {terms}")
        if not 0 < self.causal_fraction <= 1:
            raise ValueError(f"causal_fraction must be in (0, 1], got {self.causal_fraction}")
        if self.peak_flops < 0 or self.memory_bandwidth < 0:
            raise ValueError("measured peaks must be >= 0")

    def factor(self, cls: OpClass) -> ClassFactors:
        """Factors of one class."""
        return self.factors.get(cls, DEFAULT_FACTORS[cls])

    def layer(self, kind: str) -> LayerFactors:
        """Layer factors of a module kind; a generator without its own uses the vision
        encoder's (both bidirectional LayerNorm transformers)."""
        found = self.layer_factors.get(kind)
        if found is None and kind == "generator":
            found = self.layer_factors.get("vision_encoder")
        return found or IDENTITY_LAYER

    def to_json(self) -> dict[str, Any]:
        """JSON form (enums by value)."""
        return {"schema_version": SCHEMA_VERSION, "hardware": self.hardware,
                "device": self.device, "peak_flops": self.peak_flops,
                "memory_bandwidth": self.memory_bandwidth,
                "causal_fraction": self.causal_fraction,
                "factors": {c.value: {"a_f": f.a_f, "a_m": f.a_m, "a_n": f.a_n,
                                      "overhead_s": f.overhead_s}
                            for c, f in self.factors.items()},
                "layer_factors": {k: {"forward": _phase_json(f.forward),
                                      "backward": _phase_json(f.backward)}
                                  for k, f in self.layer_factors.items()},
                "action_overhead_s": list(self.action_overhead_s),
                "action_scale": list(self.action_scale),
                "iteration_overhead_s": self.iteration_overhead_s,
                "chunk_runtime": {k: {"overhead_s": list(t.overhead_s), "scale": list(t.scale)}
                                  for k, t in self.chunk_runtime.items()},
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
    layers = {}
    for kind, values in (data.get("layer_factors") or {}).items():
        try:
            layers[str(kind)] = LayerFactors(forward=PhaseFactors(**values["forward"]),
                                             backward=PhaseFactors(**values["backward"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise CalibrationError(f"{path}: layer_factors.{kind}: {exc}") from None
    if "hardware" not in data:
        raise CalibrationError(f"{path}: hardware: missing")
    try:
        return Calibration(hardware=str(data["hardware"]), device=str(data.get("device", "")),
                           factors={**DEFAULT_FACTORS, **factors}, source=str(path),
                           measurements=data.get("measurements") or {},
                           peak_flops=float(data.get("peak_flops", 0.0)),
                           memory_bandwidth=float(data.get("memory_bandwidth", 0.0)),
                           causal_fraction=float(data.get("causal_fraction", 0.5)),
                           layer_factors=layers,
                           action_overhead_s=_pair(data.get("action_overhead_s", (0.0, 0.0))),
                           action_scale=_pair(data.get("action_scale", (1.0, 1.0))),
                           iteration_overhead_s=float(data.get("iteration_overhead_s", 0.0)),
                           chunk_runtime={str(k): RuntimeTerms(_pair(v["overhead_s"]),
                                                               _pair(v["scale"]))
                                          for k, v in (data.get("chunk_runtime") or {}).items()})
    except (ValueError, TypeError) as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def _pair(value) -> tuple[float, float]:
    forward, backward = value  # a malformed value raises ValueError or TypeError
    return float(forward), float(backward)


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
    overhead, slope = fit_linear(ideal, seconds)
    which = int(np.bincount(bound, minlength=3).argmax())
    values = {"a_f": 1.0, "a_m": 1.0, "a_n": 1.0}
    values[("a_f", "a_m", "a_n")[which]] = float(slope)
    return ClassFactors(overhead_s=float(overhead), **values)


def fit_linear(x: "np.ndarray | list[float]", y: "np.ndarray | list[float]") -> tuple[float, float]:
    """y ~ overhead + slope * x with overhead >= 0 and slope > 0, least squares on the
    relative error (times span orders of magnitude)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    design = np.stack([np.ones_like(x), x], axis=1) / y[:, None]
    (overhead, slope), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    if overhead < 0 or slope <= 0:
        overhead = 0.0
        slope = float(np.sum(x / y) / np.sum((x / y) ** 2))
    return float(overhead), float(slope)


def _phase_json(f: PhaseFactors) -> dict[str, float]:
    return {"gemm": f.gemm, "attention": f.attention, "elementwise": f.elementwise,
            "overhead_s": f.overhead_s}


def fit_phase(parts: "np.ndarray", measured: "np.ndarray") -> PhaseFactors:
    """measured ~ overhead + scale * (sum of the layer's op latencies), least squares on
    relative error, one scale (at least 1) for every class. (Per-class scales overfit the few,
    noisy layer timings of a CPU; the fields stay so a calibration may set them apart.)
    parts holds per shape the op latencies by class (gemm, attention, elementwise,
    other)."""
    parts, measured = np.asarray(parts, dtype=float), np.asarray(measured, dtype=float)
    ops = parts.sum(axis=1)
    overhead, scale = fit_linear(ops, measured)
    if scale < 1.0:  # a layer runs its ops and more: timings taken under load say less
        weights = 1.0 / measured**2
        overhead = max(0.0, float(np.sum((measured - ops) * weights) / np.sum(weights)))
        scale = 1.0
    return PhaseFactors(gemm=scale, attention=scale, elementwise=scale, overhead_s=overhead)
