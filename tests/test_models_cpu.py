"""Real megatron-core layers on CPU: tiny-vlm's LM and ViT layers run forward and
backward, and the SDPA core attention matches a plain softmax(QK^T/sqrt(d))V reference
for causal, bidirectional, padded, packed and grouped-query attention."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from pipeweaver_megatron.config import load_model  # noqa: E402
from pipeweaver_megatron.models import (  # noqa: E402
    SDPAttention, build_layer, transformer_config,
)

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-vlm")


def packed(lengths: list[int]) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def reference(q, k, v, allowed=None):
    """Plain attention on [b, heads, s, d]; k/v may have fewer heads (GQA);
    allowed: bool, broadcastable to [b, heads, sq, sk], True where a query may attend."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def tril(s):
    return torch.ones(s, s, dtype=torch.bool).tril()


def attention(spec, mask_type):
    return SDPAttention(transformer_config(spec, num_layers=1), layer_number=1,
                        attn_mask_type=mask_type, attention_type="self")


def sbhd_to_bhsd(t):
    return t.permute(1, 2, 0, 3)


@pytest.mark.parametrize("module,mask_type", [("lm", AttnMaskType.causal),
                                              ("vision", AttnMaskType.no_mask),
                                              ("lm", AttnMaskType.no_mask)])
def test_unpacked_attention_matches_reference(tiny, module, mask_type):
    spec = tiny.module(module)
    core = attention(spec, mask_type)
    s, b, heads, groups, d = 9, 2, spec.num_attention_heads, spec.query_groups, spec.head_dim
    q = torch.randn(s, b, heads, d)
    k, v = torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    out = core(q, k, v, None)
    assert out.shape == (s, b, heads * d)
    allowed = tril(s) if mask_type == AttnMaskType.causal else None
    want = reference(sbhd_to_bhsd(q), sbhd_to_bhsd(k), sbhd_to_bhsd(v), allowed)
    torch.testing.assert_close(out, want.permute(2, 0, 1, 3).reshape(s, b, -1), atol=ATOL, rtol=0)


def test_padding_mask_matches_reference(tiny):
    spec = tiny.module("vision")
    core = attention(spec, AttnMaskType.padding)
    s, b, heads, d = 7, 2, spec.num_attention_heads, spec.head_dim
    q, k, v = (torch.randn(s, b, heads, d) for _ in range(3))
    blocked = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    blocked[1, ..., 5:] = True  # the second row's last two keys are padding
    out = core(q, k, v, blocked)
    want = reference(sbhd_to_bhsd(q), sbhd_to_bhsd(k), sbhd_to_bhsd(v), ~blocked)
    torch.testing.assert_close(out, want.permute(2, 0, 1, 3).reshape(s, b, -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("module,mask_type,lengths", [
    ("lm", AttnMaskType.causal, [5, 7]),          # GQA: 4 heads, 2 groups
    ("vision", AttnMaskType.no_mask, [5, 7]),
    ("vision", AttnMaskType.no_mask, [4, 4, 6]),  # equal lengths share one SDPA call
    ("lm", AttnMaskType.causal, [3, 3, 3, 8]),
])
def test_packed_attention_matches_reference_per_sample(tiny, module, mask_type, lengths):
    spec = tiny.module(module)
    core = attention(spec, mask_type)
    t, heads, groups, d = sum(lengths), spec.num_attention_heads, spec.query_groups, spec.head_dim
    q = torch.randn(t, heads, d)
    k, v = torch.randn(t, groups, d), torch.randn(t, groups, d)
    out = core(q, k, v, None, packed_seq_params=packed(lengths))
    assert out.shape == (t, heads * d)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        as_bhsd = [x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        allowed = tril(n) if mask_type == AttnMaskType.causal else None
        want = reference(*as_bhsd, allowed)[0].transpose(0, 1).reshape(n, -1)
        torch.testing.assert_close(out[rows], want, atol=ATOL, rtol=0)
        start += n


@pytest.mark.parametrize("module,mask_type", [("lm", AttnMaskType.causal),
                                             ("vision", AttnMaskType.no_mask)])
def test_padded_packed_samples_match_per_sample_and_padding_rows_are_zero(tiny, module, mask_type,
                                                                         monkeypatch):
    """cu_seqlens_*_padded place samples of 5 and 7 tokens at rows 0 and 8 of 16: each
    sample attends only itself, the padding rows come out zero, and cu_seqlens is read
    from the device once for every layer that sees these params (none when built by
    packed_params from host lengths)."""
    from pipeweaver_megatron.models import attention as attention_module
    from pipeweaver_megatron.models.language import packed_params

    spec = tiny.module(module)
    core = attention(spec, mask_type)
    heads, groups, d = spec.num_attention_heads, spec.query_groups, spec.head_dim
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    padded = torch.tensor([0, 8, 16], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                             max_seqlen_q=8, max_seqlen_kv=8)
    q, k, v = torch.randn(16, heads, d), torch.randn(16, groups, d), torch.randn(16, groups, d)
    reads = []
    read = attention_module._device_segments
    monkeypatch.setattr(attention_module, "_device_segments",
                        lambda p: reads.append(1) or read(p))
    out = core(q, k, v, None, packed_seq_params=params)
    again = core(q, k, v, None, packed_seq_params=params)  # a later layer, same params
    assert len(reads) == 1 and torch.equal(out, again)
    core(q[:12], k[:12], v[:12], None, packed_seq_params=packed_params(cu, (5, 7)))
    assert len(reads) == 1
    for start, n in ((0, 5), (8, 7)):
        rows = slice(start, start + n)
        as_bhsd = [x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        allowed = tril(n) if mask_type == AttnMaskType.causal else None
        want = reference(*as_bhsd, allowed)[0].transpose(0, 1).reshape(n, -1)
        torch.testing.assert_close(out[rows], want, atol=ATOL, rtol=0)
    assert out[5:8].abs().max() == 0 and out[15].abs().max() == 0


def test_grouped_query_attention_differs_from_mha_reading(tiny):
    """GQA groups query heads 2g, 2g+1 onto key/value group g (megatron's layout)."""
    spec = tiny.module("lm")
    assert spec.query_groups < spec.num_attention_heads
    core = attention(spec, AttnMaskType.no_mask)
    s, d = 6, spec.head_dim
    q = torch.randn(s, 1, spec.num_attention_heads, d)
    k, v = torch.randn(s, 1, spec.query_groups, d), torch.randn(s, 1, spec.query_groups, d)
    out = core(q, k, v, None).view(s, 1, spec.num_attention_heads, d)
    for head in range(spec.num_attention_heads):
        group = head // (spec.num_attention_heads // spec.query_groups)
        want = reference(sbhd_to_bhsd(q[:, :, head:head + 1]),
                         sbhd_to_bhsd(k[:, :, group:group + 1]),
                         sbhd_to_bhsd(v[:, :, group:group + 1]))
        torch.testing.assert_close(out[:, :, head], want[0, 0].unsqueeze(1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("module", ["lm", "vision"])
def test_layer_forward_backward_packed(tiny, module):
    """A whole megatron-core TransformerLayer on packed samples: gradients reach every
    weight, and neither outputs nor input gradients cross sample boundaries."""
    spec = tiny.module(module)
    layer = build_layer(spec)
    lengths = [24, 40]
    params = packed(lengths)
    x = torch.randn(sum(lengths), 1, spec.hidden_size, requires_grad=True)
    out, _ = layer(x, attention_mask=None, packed_seq_params=params)
    assert out.shape == x.shape
    loss = out[:lengths[0]].square().sum()  # depends on sample 1 only
    loss.backward()
    assert torch.all(x.grad[lengths[0]:] == 0), "gradient leaked into sample 2"
    for name, weight in layer.named_parameters():
        assert weight.grad is not None and torch.isfinite(weight.grad).all(), name
        assert weight.grad.abs().sum() > 0, name

    with torch.no_grad():
        perturbed = x.detach().clone()
        perturbed[lengths[0]:] += torch.randn_like(perturbed[lengths[0]:])
        again, _ = layer(perturbed, attention_mask=None, packed_seq_params=params)
        alone, _ = layer(x.detach()[:lengths[0]], attention_mask=None)
    torch.testing.assert_close(again[:lengths[0]], out.detach()[:lengths[0]], atol=ATOL, rtol=0)
    assert not torch.allclose(again[lengths[0]:], out.detach()[lengths[0]:])
    torch.testing.assert_close(alone, out.detach()[:lengths[0]], atol=ATOL, rtol=0)


def test_lm_layer_is_causal_and_vit_layer_is_not(tiny):
    """Changing the last token changes earlier outputs in the ViT layer only."""
    for module, causal in (("lm", True), ("vision", False)):
        spec = tiny.module(module)
        layer = build_layer(spec, layer_number=2)
        x = torch.randn(10, 2, spec.hidden_size)
        y = x.clone()
        y[-1] += torch.randn(2, spec.hidden_size)  # not a constant: LayerNorm removes those
        with torch.no_grad():
            a, _ = layer(x, attention_mask=None)
            b, _ = layer(y, attention_mask=None)
        same = torch.allclose(a[:-1], b[:-1], atol=ATOL)
        assert same == causal, module


def test_build_layer_rejects_a_projector_and_a_wrong_tp(tiny):
    with pytest.raises(ValueError, match="not a transformer"):
        build_layer(tiny.module("projector"))
    with pytest.raises(ValueError, match="tensor-parallel size 1"):
        build_layer(tiny.module("lm"), tp=2)
    wide = dataclasses.replace(tiny.module("lm"), num_query_groups=0)
    assert build_layer(wide).self_attention.num_query_groups_per_partition == 4


def test_dropout_runs_on_the_cpu_rng_tracker(tiny):
    """Attention dropout forks megatron's tensor-parallel RNG state (a CPU tracker here):
    masks differ between calls and repeat after reseeding."""
    from pipeweaver_megatron.models import seed_model_parallel

    spec = tiny.module("lm")
    layer = build_layer(spec, dropout=0.5)
    x = torch.randn(16, 1, spec.hidden_size)
    host = torch.device(torch.cpu.current_device())

    def run():
        seed_model_parallel(7, host)
        first, _ = layer(x, attention_mask=None)
        second, _ = layer(x, attention_mask=None)
        return first.detach(), second.detach()

    a1, a2 = run()
    b1, b2 = run()
    assert not torch.allclose(a1, a2)
    torch.testing.assert_close(a1, b1, atol=0, rtol=0)
    torch.testing.assert_close(a2, b2, atol=0, rtol=0)
    seed_model_parallel(1234, host)
