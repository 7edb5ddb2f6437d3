"""finalize_pipeweaver_grads on 2 gloo processes (PP 2): the loss tokens of every
pipeline rank are summed before the gradients are scaled, because a PipeWeaver layout
may hold a loss head on any rank ([Note: loss tokens over the pipeline]).

megatron-core's DistributedDataParallel allocates CUDA buffers, so recording chunks
with its two methods (finish_grad_sync, scale_gradients) stand in for it here; the
GPU path wraps the real one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

TOKENS = {0: 3, 1: 5}  # rank 0 holds the LM head mid-pipeline, rank 1 another head


class RecordingChunk:
    def __init__(self) -> None:
        self.calls: list = []

    def finish_grad_sync(self, force_all_reduce=False) -> None:
        self.calls.append(("finish", force_all_reduce))

    def scale_gradients(self, factor: float) -> None:
        self.calls.append(("scale", factor))


def _worker(rank: int, store_path: str, results) -> None:
    from megatron.core import parallel_state

    from pipeweaver_megatron.megatron.optim import finalize_pipeweaver_grads

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(1, 2)
        chunks = [RecordingChunk(), RecordingChunk()]
        finalize_pipeweaver_grads(chunks, torch.tensor(TOKENS[rank]), force_all_reduce=True)
        results[rank] = [c.calls for c in chunks]
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_tokens_of_every_pipeline_rank_scale_every_chunk(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
        got = dict(results)
    total = sum(TOKENS.values())
    for rank in (0, 1):
        for calls in got[rank]:
            assert calls[0] == ("finish", True)
            assert calls[1][0] == "scale" and calls[1][1] == pytest.approx(1.0 / total)
