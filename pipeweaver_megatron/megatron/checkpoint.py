"""Checkpoints of the training loop: one file per rank with its chunks (parameters named
by (module, layer), so they map to any layout), the optimizer state, the iteration, and
the RNG states (Python, numpy, torch CPU, and CUDA with Megatron's tensor-parallel RNG
tracker where present); a resumed run continues with the next batch.

[Note: complete checkpoints] Each rank writes its file through a temporary name; then
every rank meets in a barrier, and only then does rank 0 replace ``latest`` (again
through a temporary file and an atomic rename). So ``latest`` never names an iteration
whose files are not all on disk: a run killed between two ranks' writes resumes from
the previous complete checkpoint.

[Note: checkpoint metadata] Format 2 adds ``meta`` to each rank's file, so a file says
what it holds without the run's arguments: ``format``, ``model`` (the spec's name),
``pp``/``tp``/``dp`` sizes and this file's ``pp_rank``/``tp_rank``/``dp_rank``, ``world``,
``parts`` (per chunk, its ``[module, first_layer, last_layer]`` parts: this rank's stages
of the run's layout) and ``params`` (per chunk, its parameter names in the order handed
to the optimizer, whose state is keyed by that position). Loading checks ``parts``
against the run's chunks, so a checkpoint of another layout fails with a clear error
instead of loading partly; megatron/convert.py moves a checkpoint between layouts.
Files without ``meta`` (format 1) load as before, unchecked. Tensor and parameter names
are the local layer spec's in every file, whichever spec saved it, so a run with
Transformer Engine resumes a CPU run's checkpoint and back.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from ..models.layer_specs import local_name

FORMAT = 2
"""Version of the saved dict (see [Note: checkpoint metadata])."""


def rank_path(root: str, iteration: int, rank: int) -> str:
    """The file of one global rank's state after `iteration` iterations."""
    return os.path.join(root, f"iter_{iteration:07d}", f"rank_{rank:05d}.pt")


def chunk_parts(chunks) -> list[list[list]]:
    """The parts of each chunk, as saved in meta["parts"]."""
    return [[[p.module, p.first_layer, p.last_layer] for p in c.parts] for c in chunks]


def describe_parts(parts: list[list[list]]) -> str:
    """Saved parts as text, e.g. ``vision[0:8]+projector[0:1]+lm[0:3], lm[3:8]``."""
    return ", ".join("+".join(f"{m}[{lo}:{hi}]" for m, lo, hi in chunk) for chunk in parts)


def _meta(chunks) -> dict:
    from megatron.core import parallel_state as ps

    return {"format": FORMAT, "model": chunks[0].model.name,
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "tp": ps.get_tensor_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(),
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "parts": chunk_parts(chunks),
            "params": [[local_name(name) for name, _ in c.named_parameters()] for c in chunks]}


def write_rank_file(path: str, state: dict) -> None:
    """torch.save through a temporary file, so a crash never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_latest(root: str, iteration: int) -> None:
    """root/latest = iteration, atomically (a reader sees the old or the new value)."""
    path = os.path.join(root, "latest")
    with open(path + ".tmp", "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def rng_state() -> dict:
    """Every generator a training step draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        from megatron.core import tensor_parallel

        state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def read_latest(root: str) -> int:
    """The iteration named by root/latest."""
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"{root}: no checkpoint (missing {latest})")
    with open(latest) as f:
        return int(f.read().strip())


def save_checkpoint(root: str, rank: int, iteration: int, chunks, optimizer,
                    extras: dict | None = None, before_write=None) -> str:
    """Write this rank's state after `iteration` iterations, then (all ranks) mark the
    checkpoint complete ([Note: complete checkpoints]); returns the file. extras: more
    picklable state of this rank (e.g. its data loader's, under "data"); before_write:
    called first (fault injection in tests)."""
    path = rank_path(root, iteration, rank)
    if before_write is not None:
        before_write()
    write_rank_file(path, {
        "extras": dict(extras or {}),
        "iteration": iteration,
        "chunks": [{local_name(k): v for k, v in c.state_dict().items()
                    if isinstance(v, torch.Tensor)} for c in chunks],
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "meta": _meta(chunks)})
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_latest(root, iteration)
    if dist.is_initialized():
        dist.barrier()  # nobody goes on (or exits) before latest is there
    return path


def load_checkpoint(root: str, rank: int, chunks, optimizer, extras: dict | None = None) -> int:
    """Restore this rank's state from the latest checkpoint; returns its iteration.
    extras: filled with the file's extras (see save_checkpoint)."""
    iteration = read_latest(root)
    path = rank_path(root, iteration, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing, though {root}/latest names iteration "
                                f"{iteration} (a checkpoint of another world size, or files "
                                "removed)")
    state = torch.load(path, weights_only=False)
    meta = state.get("meta")
    if meta is not None and meta["parts"] != chunk_parts(chunks):
        raise ValueError(f"{path}: saved with chunks {describe_parts(meta['parts'])} on this "
                         f"rank, the run has {describe_parts(chunk_parts(chunks))}: the "
                         "checkpoint follows another layout (`pipeweaver checkpoint convert` "
                         "moves it)")
    for chunk, saved in zip(chunks, state["chunks"], strict=True):
        _load_chunk(path, chunk, saved)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if extras is not None:
        extras.update(state.get("extras", {}))
    return iteration


def _load_chunk(path: str, chunk, saved: dict) -> None:
    """Load one chunk's tensors saved under either layer spec's names (files keep the
    local spec's, [Note: TE parameter names]); every parameter must be there."""
    own = {local_name(k): k for k in chunk.state_dict()}
    renamed = {own.get(local_name(k), k): v for k, v in saved.items()}
    missing, unexpected = chunk.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path}: chunk {chunk.describe()} does not match the saved tensors "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
