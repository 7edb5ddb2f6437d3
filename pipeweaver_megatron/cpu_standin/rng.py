"""The CUDA random number generator, served by the host's default generator.

On a GPU, the ops of the model (weight init under Megatron's CudaRNGStatesTracker.fork,
dropout) draw from the CUDA generator and Megatron seeds, saves, restores and forks it through
torch.cuda.{manual_seed, get_rng_state, set_rng_state, default_generators}. On the stand-in
those ops run on the host and draw from torch.default_generator, so the CUDA generator *is*
the host default generator: seeding or forking the CUDA state moves the generator those ops
really use (tensor-parallel ranks initialise different shards, dropout masks follow the
tracker's model-parallel state, and a checkpoint restores them).

One consequence needs a fix. On a GPU the host-side draws (a DataLoader iterator takes its
base seed from the CPU generator whenever it is created, e.g. when Megatron builds its data
iterators after loading a checkpoint, or when a cyclic validation iterator starts over) never
move the CUDA generator; here they would, and a resumed run's dropout masks would differ
from an uninterrupted one's. :func:`install` therefore gives DataLoader iterators that have
no generator of their own a separate host generator for that draw and leaves the default
generator where it was.
"""

from __future__ import annotations

from typing import Any

import torch

# The CPU generator that, on a GPU machine, DataLoader base seeds come from (lazily seeded
# from the default generator's initial seed, i.e. Megatron's --seed).
_LOADER_GENERATOR: torch.Generator | None = None


def get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(i) for i in range(torch.cuda.device_count())]


def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.default_generator.set_state(new_state)


def set_rng_state_all(new_states: Any) -> None:
    for state in new_states:
        set_rng_state(state)


def manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def seed() -> None:
    torch.default_generator.seed()


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


_RNG = dict(get_rng_state=get_rng_state, get_rng_state_all=get_rng_state_all,
            set_rng_state=set_rng_state, set_rng_state_all=set_rng_state_all,
            manual_seed=manual_seed, manual_seed_all=manual_seed, seed=seed, seed_all=seed,
            initial_seed=initial_seed)


def _loader_generator() -> torch.Generator:
    global _LOADER_GENERATOR
    if _LOADER_GENERATOR is None:
        _LOADER_GENERATOR = torch.Generator().manual_seed(torch.initial_seed())
    return _LOADER_GENERATOR


def _patch_dataloader() -> None:
    """DataLoader iterators without a generator draw their base seed from the loader
    generator instead of the default (= CUDA) generator (see the module docstring)."""
    from torch.utils.data import dataloader

    base = dataloader._BaseDataLoaderIter
    original = base.__init__
    if getattr(original, "__cpu_standin__", False):
        return

    def __init__(self: Any, loader: Any, *args: Any, **kwargs: Any) -> None:
        if loader.generator is not None:
            original(self, loader, *args, **kwargs)
            return
        state = torch.default_generator.get_state()
        original(self, loader, *args, **kwargs)
        torch.default_generator.set_state(state)
        # The subclasses start their workers after this returns, with this seed.
        self._base_seed = int(torch.empty((), dtype=torch.int64)
                              .random_(generator=_loader_generator()).item())

    __init__.__cpu_standin__ = True  # type: ignore[attr-defined]
    base.__init__ = __init__  # type: ignore[method-assign]


def install() -> None:
    """Point torch.cuda's RNG functions (and torch.cuda.random's) at the host generator."""
    for name, value in _RNG.items():
        setattr(torch.cuda, name, value)
        setattr(torch.cuda.random, name, value)
    # Indexed by device ordinal (tensor_parallel.random reads default_generators[idx]).
    torch.cuda.default_generators = tuple(torch.default_generator for _ in range(64))
    _patch_dataloader()
