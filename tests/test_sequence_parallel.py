"""Sequence parallelism executed (TP > 1): real multi-process gloo runs of the YAML
models' chunks with megatron-core's sequence-parallel layers, every loss and gradient
against the single-process reference (TP 1, no SP), with sequences that need padding
(TP 2 without SP: tests/test_train.py's TP 2 x PP 2 against PP 2);
the norm that marks its parameters; the schedule refusing chunks that do not run what
the plan's messages say."""

from __future__ import annotations

import pytest
import torch
from test_runtime import check

from pipeweaver_megatron.runtime.verify import build_plans, verify
from pipeweaver_megatron.workload import TokenRules

pytestmark = pytest.mark.filterwarnings("ignore")


def padded_sequences(plans, model) -> int:
    """Sequences of the plans' batches (LM text, each microbatch's images) whose length
    does not divide by 2: each one takes the padding path."""
    rules = TokenRules.from_model(model)
    count = 0
    for plan in plans:
        for mb in plan.batch.microbatches:
            count += mb.lm_tokens(rules) % 2
            count += sum(mb.image_encoder_tokens(rules)) % 2 if rules.image_rule else 0
            count += mb.generator_tokens(rules) % 2 if mb.clips else 0
    return count


@pytest.mark.parametrize("model,transport,memory", [
    ("tiny-vlm", "tags", "planned"), ("tiny-t2v", "nccl-order", "mixed")])
def test_tp2_pp2_with_sequence_parallelism_matches_one_process(model, transport, memory):
    plans, spec = build_plans(model, "pipeweaver", 2, 2, 1, 7, sequence_parallel=True)
    assert all(p.sequence_parallel for p in plans)
    assert padded_sequences(plans, spec), "no sequence of these batches needs padding"
    result = verify(model, "pipeweaver", pp=2, tp=2, batches=[p.batch for p in plans], seed=7,
                    timeout_s=90, transport=transport, memory_strategy=memory,
                    sequence_parallel=True)
    check(result)
    if memory == "mixed":
        assert result.memory  # recompute and offload ran under sequence parallelism too


def test_the_norm_marks_its_parameters_only_under_sequence_parallelism(megatron_single_process):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from pipeweaver_megatron.config import load_model
    from pipeweaver_megatron.models.sequence_parallel import SequenceParallelNorm
    from pipeweaver_megatron.models.transformer_config import transformer_config

    lm = load_model("tiny-vlm").module("lm")
    config = transformer_config(lm, tp=1)
    plain = SequenceParallelNorm(config, lm.hidden_size, eps=1e-6)
    assert type(plain) is type(WrappedTorchNorm(config, lm.hidden_size, eps=1e-6))
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())
    config.sequence_parallel = True  # as a TP > 1 config has it (WrappedTorchNorm refuses it)
    with pytest.raises(AssertionError):
        WrappedTorchNorm(config, lm.hidden_size)
    marked = SequenceParallelNorm(config, lm.hidden_size, eps=1e-6)
    params = list(marked.parameters())
    assert params and all(p.sequence_parallel for p in params)
    x = torch.randn(5, 1, lm.hidden_size)
    assert torch.equal(marked(x), plain(x))  # the same norm, only marked
    assert config.sequence_parallel  # the caller's config is left as it was


def test_the_schedule_refuses_chunks_that_do_not_run_the_plans_messages():
    from types import SimpleNamespace

    from pipeweaver_megatron.runtime.executor import ExecutionError
    from pipeweaver_megatron.runtime.schedule import _check

    plans, _ = build_plans("tiny-vlm", "megatron-1f1b", 2, 2, 1, 0, sequence_parallel=True)
    plan = plans[0]
    count = plan.table.num_microbatches
    with pytest.raises(ExecutionError, match="sequence-parallel, the chunks are not"):
        _check(plan, 0, [0], [SimpleNamespace(sequence_parallel=False)], count)
    wrapped = SimpleNamespace(module=SimpleNamespace(sequence_parallel=True))  # DDP-style
    _check(plan, 0, [0], [wrapped], count)
