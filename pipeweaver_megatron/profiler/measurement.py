"""One microbenchmark result and its roofline quantities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..semu.calibration import Point
from ..semu.ops import OpClass


@dataclass(frozen=True, slots=True)
class Measurement:
    """The median time of one op at one shape, with what SEMU's cost model counts."""

    cls: OpClass
    """Op class whose factors this point calibrates."""
    op: str
    """What ran (matmul, sdpa_forward, rms_norm, all_reduce, ...)."""
    shape: dict[str, Any] = field(default_factory=dict)
    """The case's sizes (m, n, k; batch, seq, heads, head_dim, causal; numel; bytes)."""
    flops: float = 0.0
    """Floating-point operations counted as SEMU counts them."""
    mem_bytes: float = 0.0
    """Bytes read and written in device memory."""
    net_bytes: float = 0.0
    """Bytes sent over the link per rank."""
    seconds: float = 0.0
    """Median measured time of one call."""

    def point(self) -> Point:
        """The input of calibration.fit_factors."""
        return Point(self.flops, self.mem_bytes, self.net_bytes, self.seconds)

    def to_json(self, predicted_s: float | None = None) -> dict[str, Any]:
        """JSON form, optionally with the fitted model's prediction."""
        data: dict[str, Any] = {"op": self.op, **self.shape, "flops": self.flops,
                                "mem_bytes": self.mem_bytes, "net_bytes": self.net_bytes,
                                "seconds": self.seconds}
        if predicted_s is not None:
            data["predicted_s"] = predicted_s
            data["error_pct"] = 100.0 * (predicted_s - self.seconds) / self.seconds
        return data
