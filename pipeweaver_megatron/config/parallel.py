"""Parallel settings of a training setup."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelSpec:
    """How a setup is parallelised and batched.

    A microbatch is one packed sequence of at most microbatch_tokens LM tokens (text plus
    image tokens). global_batch_size counts packed microbatches over all data-parallel
    replicas, so each pipeline runs global_batch_size / dp microbatches per iteration.
    """

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (ranks per pipeline)."""
    dp: int = 1
    """Data-parallel size."""
    vp: int = 1
    """Model chunks per rank of Megatron's interleaved baseline (virtual pipeline size)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism with TP (norms and dropout sharded over TP)."""
    microbatch_tokens: int = 8192
    """Packing budget: LM tokens per microbatch."""
    max_images_per_microbatch: int = 48
    """At most this many images in one microbatch."""
    global_batch_size: int = 64
    """Packed microbatches per iteration, over all data-parallel replicas."""
    microbatch_group_size: int = 0
    """Megatron's microbatch_group_size_per_vp_stage; 0 means pp (Megatron's default)."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "vp", "microbatch_tokens", "max_images_per_microbatch",
                    "global_batch_size"):
            if getattr(self, key) < 1:
                raise SpecError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size % self.dp:
            raise SpecError("global_batch_size",
                            f"{self.global_batch_size} is not divisible by dp={self.dp}")
        if self.microbatch_group_size < 0:
            raise SpecError("microbatch_group_size", "must be >= 0")

    @property
    def num_microbatches(self) -> int:
        """Microbatches each pipeline runs per iteration."""
        return self.global_batch_size // self.dp

    @property
    def world_size(self) -> int:
        """GPUs of the whole job."""
        return self.tp * self.pp * self.dp

    @property
    def group_size(self) -> int:
        """Effective microbatch_group_size_per_vp_stage."""
        return self.microbatch_group_size or self.pp
