"""Tensors of a Microbatch from real samples: tokenized text and patchified pixels.

The real counterpart of models/data.py's microbatch_data: the same MicrobatchData
structure, so the chunks and the runtime cannot tell the two apart, but made from a
dataset's decoded samples instead of from metadata alone.

[Note: real LM sequence] A sample's LM sequence follows its content order: every text
run becomes the tokenizer's ids (no BOS/EOS added, as `pipeweaver data stats` counts
them), every image becomes image_lm_tokens copies of the tokenizer's image token id
(the image's place). A captioning sample is its image, then its caption. Labels, loss
mask and positions follow [Note: synthetic LM sequence]: the label of position p is the
token at p + 1 of the same sample, with loss only where that next token is text.

[Note: real images] An image is resized (PIL, bicubic, on its 8-bit pixels) to the
vision rule's patch grid in pixels (ImageRule.grid x patch_size: the dynamic-resolution
rule rounds each side to the merge window, fixed tiles take the tile size), scaled to
[0, 1], and cut into patch_size x patch_size patches in the window-major order of
[Note: synthetic images]. One patch is flattened as (channel, temporal copy, row, col):
a still image is repeated temporal_patch_size times, as Qwen2-VL does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import ImageRule, ModelSpec
from ..workload import ImageMeta, Microbatch, SampleMeta, TokenRules
from .data import ClipData, ImageData, MicrobatchData, _splits, _text_data, cu_seqlens
from .data import window_positions


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedSample:
    """One dataset sample ready for packing: its metadata and its content."""

    key: str
    """The dataset's sample key."""
    shard: str
    """The shard it came from."""
    meta: SampleMeta
    """What the planner and the packer see (text tokens, image sizes)."""
    content: tuple[tuple[int, ...] | Tensor, ...]
    """Text runs as token ids and images as float CHW tensors in [0, 1], in order."""


def tokenize_sample(key: str, shard: str, sequence: Sequence[str | Tensor], tokenizer,
                    sample_id: int) -> TokenizedSample:
    """Tokenize a decoded sample's text runs (sequence: text and images in content order)."""
    content: list[tuple[int, ...] | Tensor] = []
    images: list[ImageMeta] = []
    text_tokens = 0
    for item in sequence:
        if isinstance(item, str):
            ids = tuple(tokenizer.encode(item))
            text_tokens += len(ids)
            content.append(ids)
        else:
            images.append(ImageMeta(height=int(item.shape[-2]), width=int(item.shape[-1])))
            content.append(item)
    return TokenizedSample(key=key, shard=shard, content=tuple(content),
                           meta=SampleMeta(sample_id=sample_id, text_tokens=text_tokens,
                                           images=tuple(images)))


def resize_pixels(image: Tensor, height: int, width: int, channels: int = 3) -> np.ndarray:
    """[height, width, channels] float32 pixels in [0, 1] of a CHW image in [0, 1]: its
    8-bit pixels resized by PIL (bicubic), as RGB or, for one channel, L."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    picture = picture.convert("RGB" if channels == 3 else "L")
    out = np.asarray(picture.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
    return out[..., None] if out.ndim == 2 else out


def resize_image(image: Tensor, rule: ImageRule) -> np.ndarray:
    """[H, W, channels] float32 pixels in [0, 1] of a CHW image in [0, 1], resized to the
    rule's patch grid (see [Note: real images])."""
    rows, cols = rule.grid(int(image.shape[-2]), int(image.shape[-1]))
    return resize_pixels(image, rows * rule.patch_size, cols * rule.patch_size, rule.channels)


def patchify(pixels: np.ndarray, rule: ImageRule) -> Tensor:
    """[rows * cols, channels * temporal_patch_size * patch_size**2] patches of resized
    [H, W, C] pixels, window-major (see [Note: real images])."""
    p, m, t = rule.patch_size, rule.merge_size, rule.temporal_patch_size
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)  # C, H, W
    c, height, width = x.shape
    rows, cols = height // p, width // p
    x = x.reshape(c, rows // m, m, p, cols // m, m, p)
    # window row, window col, row in window, col in window, channel, pixel row, pixel col
    x = x.permute(1, 4, 2, 5, 0, 3, 6).reshape(rows * cols, c, 1, p, p)
    return x.expand(-1, -1, t, -1, -1).reshape(rows * cols, c * t * p * p).contiguous()


def real_microbatch_data(model: ModelSpec, microbatch: Microbatch, rules: TokenRules,
                         samples: Mapping[int, TokenizedSample],
                         image_token_id: int) -> MicrobatchData:
    """The tensors of a microbatch of real samples (samples: by sample_id; see the notes
    above)."""
    tokens, flags, lengths = [], [], []
    patches, patch_pos, grids, image_lm = [], [], [], []
    for meta in microbatch.samples:
        sample = samples[meta.sample_id]
        ids: list[Tensor] = []
        is_image: list[Tensor] = []
        for item in sample.content:
            if isinstance(item, tuple):
                ids.append(torch.tensor(item, dtype=torch.int64))
                is_image.append(torch.zeros(len(item), dtype=torch.bool))
                continue
            rule = rules.require_image_rule(f"sample {sample.key!r}'s image")
            image = ImageMeta(height=int(item.shape[-2]), width=int(item.shape[-1]))
            count = rules.image_lm_tokens(image)
            ids.append(torch.full((count,), image_token_id, dtype=torch.int64))
            is_image.append(torch.ones(count, dtype=torch.bool))
            rows, cols = rule.grid(image.height, image.width)
            patches.append(patchify(resize_image(item, rule), rule))
            patch_pos.append(window_positions(rows, cols, rule.merge_size))
            grids.append((rows, cols))
            image_lm.append(count)
        seq = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        tokens.append(seq)
        flags.append(torch.cat(is_image) if is_image else torch.zeros(0, dtype=torch.bool))
        lengths.append(seq.numel())
    patch_dim = 0
    if rules.image_rule is not None:
        rule = rules.image_rule
        patch_dim = rule.channels * rule.temporal_patch_size * rule.patch_size**2
    images = ImageData(
        indices=tuple(range(len(grids))),
        patches=torch.cat(patches) if patches else torch.zeros(0, patch_dim),
        positions=torch.cat(patch_pos) if patch_pos else torch.zeros(0, 2, dtype=torch.int64),
        cu_seqlens=cu_seqlens([r * c for r, c in grids]), grids=tuple(grids),
        lm_tokens=tuple(image_lm))
    clips = ClipData(indices=(), latents=torch.zeros(0, 0), noise=torch.zeros(0, 0),
                     timesteps=torch.zeros(0), positions=torch.zeros(0, 3, dtype=torch.int64),
                     cu_seqlens=cu_seqlens([]), lengths=(), samples=())
    return MicrobatchData(index=microbatch.index, text=_text_data(tokens, flags, lengths),
                          images=images, clips=clips, splits=_splits(model))
