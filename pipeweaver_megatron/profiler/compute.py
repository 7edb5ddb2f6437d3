"""Compute microbenchmarks: GEMM, SDPA forward/backward and memory-bound elementwise ops.

Each case is timed on the user's device in the training dtype of the hardware profile
and reported with the FLOPs and bytes SEMU's cost model counts for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..semu.ops import OpClass
from .measurement import Measurement
from .timing import TimingPlan, median_seconds

# (k, n) weight shapes of tiny and real models: QKV, projections, MLP up and down.
GEMM_WEIGHTS_FULL = ((64, 192), (64, 256), (256, 64), (128, 256), (128, 1024), (512, 128),
                     (1024, 3072), (1024, 4096), (4096, 1024), (2048, 2048))
GEMM_TOKENS_FULL = (64, 256, 1024, 4096)
GEMM_WEIGHTS_QUICK = ((64, 256), (128, 1024), (1024, 1024))
GEMM_TOKENS_QUICK = (64, 512, 2048)

# (batch of sequences, seq len, heads, head_dim)
ATTENTION_FULL = ((1, 64, 4, 16), (16, 64, 4, 16), (1, 256, 4, 32), (4, 256, 4, 32),
                  (1, 1024, 4, 32), (1, 2048, 4, 32), (2, 512, 16, 64), (1, 2048, 16, 64),
                  (1, 1024, 16, 128))
ATTENTION_QUICK = ((4, 64, 4, 16), (1, 512, 4, 32), (1, 1024, 8, 64))

# (tokens, hidden). On the host, tensors of 32 MiB and more come from fresh mmap pages
# (glibc's largest mmap threshold) and run ~10-40x slower per byte; one such case stays
# in the full set to record it, the tiny models' activations stay below.
ELEMENTWISE_FULL = ((64, 64), (256, 128), (1024, 256), (1024, 512), (2048, 1024),
                    (4096, 1024), (2048, 4096), (4096, 4096))
ELEMENTWISE_QUICK = ((256, 128), (1024, 512), (4096, 1024))


@dataclass(frozen=True, slots=True)
class ComputeSetup:
    """Where and how to measure."""

    dev: torch.device
    dtype: torch.dtype
    plan: TimingPlan
    quick: bool

    @property
    def element_bytes(self) -> int:
        """Bytes per element of dtype."""
        return torch.tensor([], dtype=self.dtype).element_size()

    def randn(self, *shape: int, grad: bool = False) -> torch.Tensor:
        """A random tensor on the device (allocated there)."""
        with self.dev:
            return torch.randn(*shape, dtype=self.dtype, requires_grad=grad)


def measure_gemm(setup: ComputeSetup) -> Iterator[Measurement]:
    """torch.matmul [m, k] x [k, n]: FLOPs 2mnk, bytes e*(mk + kn + mn)."""
    weights = GEMM_WEIGHTS_QUICK if setup.quick else GEMM_WEIGHTS_FULL
    tokens = GEMM_TOKENS_QUICK if setup.quick else GEMM_TOKENS_FULL
    e = setup.element_bytes
    for m in tokens:
        for k, n in weights:
            a, b = setup.randn(m, k), setup.randn(k, n)
            seconds = median_seconds(lambda: torch.matmul(a, b), setup.dev, setup.plan)
            yield Measurement(OpClass.GEMM, "matmul", {"m": m, "n": n, "k": k},
                              flops=2.0 * m * n * k, mem_bytes=e * (m * k + k * n + m * n),
                              seconds=seconds)


def measure_attention(setup: ComputeSetup) -> Iterator[Measurement]:
    """SDPA forward and backward (input and weight-free), causal and bidirectional.

    Forward FLOPs 4*b*h*s*s*d (halved when causal), backward 2.5x forward; bytes
    forward e*b*s*h*d*4 (q, k, v, o), backward e*b*s*h*d*8 (q, k, v, o, dO in;
    dq, dk, dv out).
    """
    cases = ATTENTION_QUICK if setup.quick else ATTENTION_FULL
    e = setup.element_bytes
    for batch, seq, heads, dim in cases:
        for causal in (True, False):
            q, k, v = (setup.randn(batch, heads, seq, dim, grad=True) for _ in range(3))
            shape = {"batch": batch, "seq": seq, "heads": heads, "head_dim": dim,
                     "causal": causal}
            flops = 4.0 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
            tensor = e * batch * seq * heads * dim

            def forward(q=q, k=k, v=v, causal=causal) -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            fwd = median_seconds(forward, setup.dev, setup.plan)
            out = forward()
            grad = torch.randn_like(out)

            def backward(out=out, grad=grad, inputs=(q, k, v)) -> object:
                return torch.autograd.grad(out, inputs, grad, retain_graph=True)

            bwd = median_seconds(backward, setup.dev, setup.plan)
            yield Measurement(OpClass.ATTENTION, "sdpa_forward", shape, flops=flops,
                              mem_bytes=4 * tensor, seconds=fwd)
            yield Measurement(OpClass.ATTENTION, "sdpa_backward", shape, flops=2.5 * flops,
                              mem_bytes=8 * tensor, seconds=bwd)


def elementwise_ops(hidden: int) -> dict[str, tuple[Callable[..., torch.Tensor], int, float]]:
    """op -> (function of (x, y, w), [tokens, hidden] tensors read + written, FLOPs/element)."""
    shape = (hidden,)
    return {
        "layer_norm": (lambda x, y, w: F.layer_norm(x, shape, w, w), 2, 8.0),
        "rms_norm": (lambda x, y, w: F.rms_norm(x, shape, w), 2, 4.0),
        "gelu": (lambda x, y, w: F.gelu(x), 2, 8.0),
        "silu_mul": (lambda x, y, w: F.silu(x) * y, 3, 5.0),
        "add": (lambda x, y, w: x + y, 3, 1.0),
    }


def measure_elementwise(setup: ComputeSetup) -> Iterator[Measurement]:
    """Norms, activations and residual adds: bytes = tensors read + written."""
    cases = ELEMENTWISE_QUICK if setup.quick else ELEMENTWISE_FULL
    e = setup.element_bytes
    for tokens, hidden in cases:
        x, y, w = setup.randn(tokens, hidden), setup.randn(tokens, hidden), setup.randn(hidden)
        numel = tokens * hidden
        for name, (fn, tensors, flops) in elementwise_ops(hidden).items():
            seconds = median_seconds(lambda fn=fn: fn(x, y, w), setup.dev, setup.plan)
            yield Measurement(OpClass.ELEMENTWISE, name, {"tokens": tokens, "hidden": hidden},
                              flops=flops * numel, mem_bytes=float(tensors * numel * e),
                              seconds=seconds)
