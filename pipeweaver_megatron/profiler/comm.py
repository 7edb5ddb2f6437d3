"""Communication microbenchmarks: all_reduce and send/recv ping-pong between 2 processes.

Two local processes are spawned with torch.multiprocessing and joined over TCP on
127.0.0.1 and a free port: gloo on the host, NCCL on an accelerator (one device per
rank, so it needs two). Rank 0 writes its medians to a JSON file the parent reads.
Spawned children re-import the caller's __main__ (guarded by ``if __name__ ==
"__main__"`` as usual), so the caller must be a file, ``-m`` or ``-c``, not a script on
stdin. (fork is not an option: forked gloo ranks hang after the parent's OpenMP work.)
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..semu.ops import OpClass
from .measurement import Measurement
from .timing import is_accelerator, synchronize

SIZES_FULL = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
SIZES_QUICK = (16 << 10, 1 << 20, 8 << 20)
WORLD = 2


@dataclass(frozen=True, slots=True)
class CommJob:
    """What the spawned ranks measure (picklable)."""

    dev_type: str
    """torch device type of the ranks."""
    accelerator: bool
    """Ranks use devices 0 and 1 of the accelerator with NCCL (else the host with gloo)."""
    port: int
    """TCP port of the rendezvous on 127.0.0.1."""
    sizes: tuple[int, ...]
    """Message sizes in bytes."""
    repeats: int
    """Timed iterations per size (after 5 warmups)."""
    out: str
    """File rank 0 writes its results to."""


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def comm_skip_reason(dev: torch.device) -> str | None:
    """Why the communication benchmarks cannot run for dev (None: they can)."""
    if is_accelerator(dev) and torch.accelerator.device_count() < WORLD:
        return f"needs {WORLD} {dev.type} devices, found {torch.accelerator.device_count()}"
    return None


def _median(fn, dev: torch.device, repeats: int, warmup: int = 5) -> float:
    """Median seconds of fn() after warmup calls (gloo's first calls set up buffers)."""
    for _ in range(warmup):
        fn()
    synchronize(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, job: CommJob) -> None:
    """One rank: all_reduce and ping-pong over every size."""
    backend = "nccl" if job.accelerator else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{job.port}",
                            rank=rank, world_size=WORLD)
    dev = torch.device(job.dev_type, rank) if job.accelerator else torch.device(job.dev_type)
    peer = 1 - rank
    results = []
    try:
        for size in job.sizes:
            with dev:
                buf = torch.ones(size // 4, dtype=torch.float32)

            def ping_pong(buf=buf) -> None:
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)

            dist.barrier()
            reduce_s = _median(lambda buf=buf: dist.all_reduce(buf), dev, job.repeats)
            dist.barrier()
            round_trip = _median(ping_pong, dev, job.repeats)
            results.append({"bytes": size, "all_reduce_s": reduce_s, "p2p_s": round_trip / 2})
        if rank == 0:
            Path(job.out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def measure_comm(dev: torch.device, quick: bool) -> list[Measurement]:
    """all_reduce (net bytes 2(n-1)/n * size) and one-way P2P (net bytes = size) points."""
    with tempfile.TemporaryDirectory() as tmp:
        job = CommJob(dev_type=dev.type, accelerator=is_accelerator(dev), port=free_port(),
                      sizes=SIZES_QUICK if quick else SIZES_FULL, repeats=15 if quick else 40,
                      out=str(Path(tmp) / "comm.json"))
        mp.spawn(_worker, args=(job,), nprocs=WORLD, join=True)
        rows = json.loads(Path(job.out).read_text())
    points = []
    for row in rows:
        size = row["bytes"]
        shape = {"bytes": size, "ranks": WORLD}
        points.append(Measurement(OpClass.COLLECTIVE, "all_reduce", shape,
                                  net_bytes=2.0 * (WORLD - 1) / WORLD * size,
                                  seconds=row["all_reduce_s"]))
        points.append(Measurement(OpClass.P2P, "send_recv", shape, net_bytes=float(size),
                                  seconds=row["p2p_s"]))
    return points

