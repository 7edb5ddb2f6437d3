"""Executing a memory strategy (planner/candidates.Strategy) inside one chunk forward.

    with layer_memory(recompute=2, offload=1, params=chunk.parameters()):
        chunk(inputs, data)

The chunk's transformer layers, counted in order over its parts (run_layers asks
``next_layer()`` before each), get:

- the first ``recompute``: activation recompute. torch.utils.checkpoint (non-reentrant)
  keeps nothing but the layer's inputs and reruns the layer in the backward. Torch's
  own generator states (CPU, and CUDA where the tensors live) are restored for the
  rerun by checkpoint itself; megatron-core's tensor-parallel RNG tracker states are
  snapshotted at the forward and put back around the rerun, so dropout draws the same
  masks (as megatron-core's CheckpointFunction does).
- the next ``offload``: their saved activations go to host memory through
  torch.autograd.graph.saved_tensors_hooks: on CUDA into pinned buffers copied on a side
  stream (the backward's unpack waits for that copy), off CUDA a plain copy. Parameters
  and the layer's input (its checkpoint, which planner/candidates.py keeps on the
  device) are never copied.
- the rest: kept as they are.

Outside a ``layer_memory`` block run_layers runs every layer plainly. An optional
SavedBytes counter sees every tensor autograd saves in the block (after the strategy:
recomputed layers save their inputs only, offloaded ones count as host bytes), for the
activation-memory benchmark.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_STATE = threading.local()


@dataclass
class SavedBytes:
    """Live and peak bytes of saved activations, on the device and offloaded to the host
    (a storage saved twice counts once)."""

    device: int = 0
    host: int = 0
    peak_device: int = 0
    peak_host: int = 0
    _live: dict = field(default_factory=dict)  # storage key -> [bytes, refs, where]

    def add(self, tensor: Tensor, where: str) -> "_Held":
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), where)
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0, where]
            self._grow(where, entry[0])
        entry[1] += 1
        return _Held(self, key)

    def _grow(self, where: str, nbytes: int) -> None:
        if where == "device":
            self.device += nbytes
            self.peak_device = max(self.peak_device, self.device)
        else:
            self.host += nbytes
            self.peak_host = max(self.peak_host, self.host)

    def release(self, key) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if not entry[1]:
            del self._live[key]
            self._grow(entry[2], -entry[0])


class _Held:
    """A counted saved tensor; the count drops when autograd frees it."""

    __slots__ = ("counter", "key")

    def __init__(self, counter: SavedBytes, key) -> None:
        self.counter, self.key = counter, key

    def __del__(self) -> None:
        self.counter.release(self.key)


@dataclass
class _Block:
    recompute: int
    offload: int
    params: set
    counter: SavedBytes | None
    seen: int = 0
    stream: object = None


@contextlib.contextmanager
def layer_memory(recompute: int = 0, offload: int = 0, params: Iterable[Tensor] = (),
                 counter: SavedBytes | None = None) -> Iterator[None]:
    """Apply a strategy to the transformer layers run inside (see the module docstring)."""
    if recompute < 0 or offload < 0:
        raise ValueError(f"negative layer counts: recompute {recompute}, offload {offload}")
    outer = getattr(_STATE, "block", None)
    block = _Block(recompute, offload, {p.untyped_storage().data_ptr() for p in params}, counter)
    _STATE.block = block
    try:
        with _hooks(block, offloading=False):
            yield
    finally:
        _STATE.block = outer
    if block.seen < recompute + offload:
        raise ValueError(f"the strategy names {recompute + offload} transformer layers, the "
                         f"chunk ran {block.seen}")


def run_layer(layer, hidden: Tensor, **kwargs):
    """One transformer layer under the active strategy (plainly outside a block)."""
    block = getattr(_STATE, "block", None)
    if block is None:
        return layer(hidden, **kwargs)
    index, block.seen = block.seen, block.seen + 1
    if index < block.recompute:
        if block.counter is not None:  # the input checkpoint keeps, counted while it lives
            hidden = _Keep.apply(hidden)
        return checkpoint(_Rerun(layer), hidden, use_reentrant=False, **kwargs)
    if index < block.recompute + block.offload:
        with _hooks(block, offloading=True, keep=hidden.untyped_storage().data_ptr()):
            return layer(hidden, **kwargs)
    return layer(hidden, **kwargs)


class _Keep(torch.autograd.Function):
    """Identity that saves its input, so a SavedBytes counter sees what a recomputed
    layer holds (the same storage checkpoint keeps; no copy)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.save_for_backward(tensor)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _Rerun:
    """The layer call, with megatron's RNG tracker states of the first call put back
    around the backward's rerun."""

    def __init__(self, layer) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        self.layer, self.tracker, self.calls = layer, get_cuda_rng_tracker(), 0
        self.states = _snapshot(self.tracker.get_states())

    def __call__(self, hidden: Tensor, **kwargs):
        self.calls += 1
        if self.calls == 1:
            return self.layer(hidden, **kwargs)
        current = _snapshot(self.tracker.get_states())
        self.tracker.set_states(_snapshot(self.states))
        try:
            return self.layer(hidden, **kwargs)
        finally:
            self.tracker.set_states(current)


def _snapshot(states: dict) -> dict:
    return {name: s.clone() if isinstance(s, Tensor) else s for name, s in states.items()}


def _hooks(block: _Block, offloading: bool, keep: int | None = None):
    """saved_tensors_hooks for the block: count, and offload when asked (all but the
    parameters and the layer's input `keep`, its checkpoint, which the planner's cost
    model keeps on the device). Nothing at all when neither is needed."""
    if not offloading and block.counter is None:
        return contextlib.nullcontext()

    def pack(tensor: Tensor):
        storage = tensor.untyped_storage().data_ptr()
        resident = storage in block.params
        if offloading and storage == keep:
            held = block.counter.add(tensor, "device") if block.counter is not None else None
            return ("device", None, tensor, held)
        if offloading and not resident:
            copy = _to_host(tensor, block)
            held = block.counter.add(copy, "host") if block.counter is not None else None
            return ("host", tensor.device, copy, held)
        held = None if block.counter is None or resident else block.counter.add(tensor, "device")
        return ("device", None, tensor, held)

    def unpack(packed) -> Tensor:
        where, device, tensor, _ = packed
        if where == "host":
            if device.type == "cuda":
                torch.cuda.current_stream().wait_stream(block.stream)
                return tensor.to(device, non_blocking=True)
            return tensor
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _to_host(tensor: Tensor, block: _Block) -> Tensor:
    if tensor.device.type != "cuda":
        return tensor.detach().clone()
    if block.stream is None:
        block.stream = torch.cuda.Stream()
    block.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(block.stream):
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(block.stream)
    return host
