"""Hardware profiles: what SEMU needs to know about a device and its links.

Bandwidths are per GPU and per direction. Peak FLOPs are dense (no sparsity) bf16
tensor-core numbers; the cpu profile is fp32 on this project's 2-core CI machine, a
starting point that `pipeweaver profile` (the SEMU issue) replaces with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, SpecError

GB = 1e9
GIB = 2**30
TFLOPS = 1e12


@dataclass(frozen=True, kw_only=True, slots=True)
class HardwareProfile:
    """One accelerator type in its usual server."""

    name: str
    """Profile name (H800, H100, ...)."""
    peak_flops: float
    """Dense bf16 FLOP/s of one device (fp32 for cpu)."""
    memory_bandwidth: float
    """Device memory bandwidth in bytes/s."""
    memory_capacity: float
    """Device memory in bytes."""
    intra_node_bandwidth: float
    """Device-to-device bandwidth inside a node, bytes/s per direction."""
    intra_node_latency: float
    """Latency of one intra-node P2P message in seconds."""
    inter_node_bandwidth: float
    """Network bandwidth per device across nodes, bytes/s per direction."""
    inter_node_latency: float
    """Latency of one inter-node P2P message in seconds."""
    gpus_per_node: int
    """Devices per node."""
    host_bandwidth: float = 0.0
    """Device<->host copy bandwidth for activation offloading, bytes/s (0: no offload)."""
    dtype_bytes: int = 2
    """Bytes per activation/weight element in training (2 for bf16; 4 for fp32 on cpu)."""
    layer_spec: str = "transformer_engine"
    """The layer implementation that runs here, for what a layer saves for its backward
    (semu/graph.py [Note: saved activations]): transformer_engine (fused kernels) or
    local (megatron-core's local spec on torch ops, what runs without CUDA)."""

    def __post_init__(self) -> None:
        for key in ("peak_flops", "memory_bandwidth", "memory_capacity", "intra_node_bandwidth",
                    "inter_node_bandwidth"):
            if getattr(self, key) <= 0:
                raise SpecError(key, f"must be > 0, got {getattr(self, key)}")
        if self.gpus_per_node < 1:
            raise SpecError("gpus_per_node", "must be >= 1")
        if self.layer_spec not in ("transformer_engine", "local"):
            raise SpecError("layer_spec", f"transformer_engine or local, got {self.layer_spec!r}")

    @property
    def can_offload(self) -> bool:
        """Activations can be offloaded to host memory."""
        return self.host_bandwidth > 0


PROFILES: dict[str, HardwareProfile] = {
    # H100 SXM5 80GB datasheet: 989 TFLOPS dense BF16, HBM3 3.35 TB/s, NVLink 4 900 GB/s
    # total (450 GB/s per direction); DGX H100: 8x ConnectX-7 400 Gb/s (50 GB/s) per GPU.
    # PCIe Gen5 x16: 64 GB/s per direction.
    "H100": HardwareProfile(
        name="H100", peak_flops=989 * TFLOPS, memory_bandwidth=3.35e12, memory_capacity=80 * GB,
        intra_node_bandwidth=450 * GB, intra_node_latency=3e-6,
        inter_node_bandwidth=50 * GB, inter_node_latency=8e-6, gpus_per_node=8,
        host_bandwidth=55 * GB),
    # H800 SXM5: the H100 compute and HBM with NVLink cut to 400 GB/s total (200 GB/s per
    # direction, as the PipeWeaver paper's cluster reports) and 8x 200 Gb/s RoCE per node.
    "H800": HardwareProfile(
        name="H800", peak_flops=989 * TFLOPS, memory_bandwidth=3.35e12, memory_capacity=80 * GB,
        intra_node_bandwidth=200 * GB, intra_node_latency=3e-6,
        inter_node_bandwidth=25 * GB, inter_node_latency=10e-6, gpus_per_node=8,
        host_bandwidth=55 * GB),
    # H200 SXM 141GB datasheet: 989 TFLOPS dense BF16, HBM3e 4.8 TB/s, NVLink 900 GB/s
    # total; 400 Gb/s NDR InfiniBand per GPU.
    "H200": HardwareProfile(
        name="H200", peak_flops=989 * TFLOPS, memory_bandwidth=4.8e12, memory_capacity=141 * GB,
        intra_node_bandwidth=450 * GB, intra_node_latency=3e-6,
        inter_node_bandwidth=50 * GB, inter_node_latency=8e-6, gpus_per_node=8,
        host_bandwidth=55 * GB),
    # A100 SXM4 80GB datasheet: 312 TFLOPS dense BF16, HBM2e 2.039 TB/s, NVLink 3 600 GB/s
    # total (300 GB/s per direction); DGX A100: 200 Gb/s HDR InfiniBand per GPU; PCIe Gen4.
    "A100": HardwareProfile(
        name="A100", peak_flops=312 * TFLOPS, memory_bandwidth=2.039e12, memory_capacity=80 * GB,
        intra_node_bandwidth=300 * GB, intra_node_latency=4e-6,
        inter_node_bandwidth=25 * GB, inter_node_latency=10e-6, gpus_per_node=8,
        host_bandwidth=25 * GB),
    # H20 96GB (NVIDIA HGX H20 product brief): 148 TFLOPS dense BF16, HBM3 4.0 TB/s,
    # NVLink 900 GB/s total; 400 Gb/s network per GPU assumed as on HGX H100.
    "H20": HardwareProfile(
        name="H20", peak_flops=148 * TFLOPS, memory_bandwidth=4.0e12, memory_capacity=96 * GB,
        intra_node_bandwidth=450 * GB, intra_node_latency=3e-6,
        inter_node_bandwidth=50 * GB, inter_node_latency=8e-6, gpus_per_node=8,
        host_bandwidth=55 * GB),
    # This project's CI machine: 2 x86-64 cores with AVX2 FMA (2 x 32 fp32 FLOP/cycle at
    # ~3 GHz = ~190 GFLOP/s peak), ~20 GB/s DRAM, 24 GiB, gloo over loopback between
    # processes (~5 GB/s, ~30 us). Measured values come from `pipeweaver profile`.
    "cpu": HardwareProfile(
        name="cpu", peak_flops=190e9, memory_bandwidth=20 * GB, memory_capacity=24 * GIB,
        intra_node_bandwidth=5 * GB, intra_node_latency=30e-6,
        inter_node_bandwidth=1.25 * GB, inter_node_latency=100e-6, gpus_per_node=2,
        host_bandwidth=0.0, dtype_bytes=4, layer_spec="local"),
}


def get_hardware(name: str) -> HardwareProfile:
    """Look a profile up by name, case-insensitively."""
    for key, profile in PROFILES.items():
        if key.lower() == name.lower():
            return profile
    raise ConfigError(name, "", f"unknown hardware profile; known: {', '.join(PROFILES)}")
