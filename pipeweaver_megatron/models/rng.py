"""megatron-core's model-parallel RNG tracker, on the CPU generator where CUDA is absent.

megatron-core keeps named generator states (data-parallel, tensor-parallel, expert) in a
tracker whose ``fork()`` swaps them in around dropout in tensor-parallel regions and
around weight initialisation. Its CudaRNGStatesTracker reads and writes CUDA generator
states only. CpuRNGStatesTracker keeps the same names and semantics on torch's CPU
generator, so the same megatron code runs on CPU with TP ranks drawing different
dropout masks in tensor-parallel regions and equal ones elsewhere.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mrandom


class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """CudaRNGStatesTracker on torch's default (CPU) generator."""

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with seed (the current state is kept)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the body with the named state, then restore the one before."""
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        original = torch.get_rng_state()
        outer = self._current_state_name
        if outer != "default-rng":
            self.states_[outer] = original
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(self.states_[outer] if outer != "default-rng" else original)
            self._current_state_name = outer


def seed_cpu(seed: int) -> None:
    """model_parallel_cuda_manual_seed's CPU counterpart (parallel_state must be set up).

    Seeds torch's generator with seed and installs a CpuRNGStatesTracker holding the
    data-parallel (seed), tensor-parallel (seed + 2718 + tp_rank) and expert states,
    exactly the seeds megatron-core derives on CUDA.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker = CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def seed_model_parallel(seed: int, dev: torch.device) -> None:
    """Seed torch and megatron's RNG tracker for layers that run on dev.

    On the CUDA device this is megatron-core's model_parallel_cuda_manual_seed; on any
    other device the CPU tracker above.
    """
    torch.manual_seed(seed)
    accel = torch.accelerator.current_accelerator()
    if torch.cuda.is_available() and accel is not None and dev.type == accel.type:
        mrandom.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        seed_cpu(seed)
