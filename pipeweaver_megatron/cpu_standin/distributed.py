"""NCCL requests served by gloo.

Megatron-LM asks torch.distributed for NCCL (``--distributed-backend nccl`` is its default,
and parallel_state builds most groups with ``backend="nccl"`` and NCCL-only ``pg_options``).
A CPU-only torch has no NCCL, and gloo runs every collective Megatron uses on host tensors.
:func:`install` wraps ``init_process_group`` and the group constructor behind ``new_group``
(``distributed_c10d._new_group_with_tag``, which new_subgroups* call too) so that any NCCL
part of a backend string becomes gloo and the options that only NCCL understands
(``pg_options`` for an NCCL group, ``device_id`` naming a GPU) are dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def host_backend(backend: Any) -> Any:
    """``backend`` with NCCL replaced by gloo: "nccl" -> "gloo",
    "cpu:gloo,cuda:nccl" -> "gloo"; None and other backends unchanged."""
    if backend is None:
        return None
    text = str(backend).lower()
    if "nccl" not in text:
        return backend
    return "gloo"


def _drop_nccl_options(backend: Any, kwargs: dict[str, Any], options_key: str) -> Any:
    """The gloo backend for ``backend``, removing NCCL-only entries of kwargs in place."""
    new = host_backend(backend)
    if new != backend:
        kwargs.pop(options_key, None)
    kwargs.pop("device_id", None)  # a GPU for eager NCCL init; gloo binds no device
    return new


def _wrap_init(init: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(init)
    def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        backend = _drop_nccl_options(kwargs.pop("backend", backend), kwargs, "pg_options")
        return init(backend, *args, **kwargs)

    init_process_group.__cpu_standin__ = True  # type: ignore[attr-defined]
    return init_process_group


def _wrap_group(new_group: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(new_group)
    def new_group_with_tag(ranks: Any = None, timeout: Any = None, backend: Any = None,
                           backend_options: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs["backend_options"] = backend_options
        backend = _drop_nccl_options(backend, kwargs, "backend_options")
        options = kwargs.pop("backend_options", None)
        return new_group(ranks, timeout, backend, options, *args, **kwargs)

    new_group_with_tag.__cpu_standin__ = True  # type: ignore[attr-defined]
    return new_group_with_tag


def install() -> None:
    """Serve NCCL process groups with gloo (idempotent)."""
    if not getattr(c10d.init_process_group, "__cpu_standin__", False):
        wrapped = _wrap_init(c10d.init_process_group)
        c10d.init_process_group = wrapped
        dist.init_process_group = wrapped
    if not getattr(c10d._new_group_with_tag, "__cpu_standin__", False):
        c10d._new_group_with_tag = _wrap_group(c10d._new_group_with_tag)
