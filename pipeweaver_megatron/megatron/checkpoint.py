"""Checkpoints of the training loop: one file per rank with its chunks (parameters named
by (module, layer), so they map to any layout), the optimizer state, the iteration, and
the RNG states; a resumed run continues with the next batch."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def _path(root: str, iteration: int, rank: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}", f"rank_{rank:05d}.pt")


def save_checkpoint(root: str, rank: int, iteration: int, chunks, optimizer) -> str:
    """Write this rank's state after `iteration` iterations; returns the file."""
    path = _path(root, iteration, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"iteration": iteration,
                "chunks": [{k: v for k, v in c.state_dict().items() if isinstance(v, torch.Tensor)}
                           for c in chunks],
                "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()}}, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(str(iteration))
    return path


def load_checkpoint(root: str, rank: int, chunks, optimizer) -> int:
    """Restore this rank's state from the latest checkpoint; returns its iteration."""
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"{root}: no checkpoint (missing {latest})")
    with open(latest) as f:
        iteration = int(f.read().strip())
    state = torch.load(_path(root, iteration, rank), weights_only=False)
    for chunk, saved in zip(chunks, state["chunks"], strict=True):
        chunk.load_state_dict(saved, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return iteration
