"""A microbatch of Megatron-LM's pretrain_vlm.py as MicrobatchData for LLaVA chunks.

pretrain_vlm.py's get_batch yields, at --micro-batch-size 1, tokens [1, S] with
DEFAULT_IMAGE_TOKEN_INDEX (-200) where each image goes (its mock dataset prepends one),
position_ids [1, S], labels [1, S], images [num_tiles, 3, img_h, img_w] and loss_mask
[1, S]. LLaVAModel.forward turns them into the LM's sequence in _preprocess_data: every
image token becomes the img_seq_len embeddings of its tile, and the labels and loss mask
move with the text (IGNORE_INDEX labels and no loss at image positions, none on the
text token right before an image). llava_microbatch runs that same megatron-core code
once, off the graph, so the last LM chunk finds the combined labels and loss mask in
TextData and the first LM chunk calls it again for the embeddings (models/llava.py).

[Note: LLaVA microbatch] TextData describes the combined LM sequence (S' tokens):
tokens (IMAGE_TOKEN_ID at image positions), LLaVA's final labels (IGNORE_INDEX, -100,
at positions without a label) and loss mask, position_ids 0..S'-1 (GPTModel's RoPE
positions), one sample. LlavaTextData adds what the embedding needs: the raw text
(input_ids with the image token index, its own position_ids for learned absolute
position embeddings: an image counts as one position) and the tiles per image (one
each, as LLaVAModel assumes when it is not given num_image_tiles). ImageData holds the
pixels as flattened patches, tile after tile, each patch in conv1's weight order
(channel, row, column) and patches row-major (llava_patches; llava_pixels inverts it
exactly), with grids (img_h / p, img_w / p), so models.data.select splits the images
into sub-microbatches; lm_tokens counts every tile's img_seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from .data import IMAGE_TOKEN_ID, ClipData, ImageData, MicrobatchData, TextData, cu_seqlens

if TYPE_CHECKING:
    from .llava import LlavaRecipe

VISION_MODEL, VISION_PROJECTION, LANGUAGE_MODEL = "vision_model", "vision_projection", \
    "language_model"
"""LLaVAModel's module names, which the chunks' parameters are named after."""
LLAVA_SPLITS = ((VISION_MODEL, "images"), (VISION_PROJECTION, "images"),
                (LANGUAGE_MODEL, "samples"))
"""What models.data.select splits for each LLaVA module."""


@dataclass(frozen=True, kw_only=True, eq=False)
class LlavaTextData(TextData):
    """TextData of the combined sequence plus the raw text (see [Note: LLaVA microbatch])."""

    input_ids: Tensor
    """[1, S] int64 the script's tokens (recipe.image_token_index where images go)."""
    text_position_ids: Tensor
    """[1, S] int64 the script's position_ids (the learned position embeddings' input)."""
    num_image_tiles: Tensor
    """[number of image tokens] int32 tiles of every image (all 1 here)."""


def preprocess_shim(recipe: LlavaRecipe, *, pre_process: bool, post_process: bool) -> Any:
    """The attributes LLaVAModel._preprocess_data reads from its model, as a PP-1
    LLaVAModel with CP 1 has them (no padding to the max length, which only pipelined
    LLaVA models add); call ``LLaVAModel._preprocess_data(shim, ...)``."""
    return SimpleNamespace(add_decoder=True, pre_process=pre_process, post_process=post_process,
                           img_seq_len=recipe.img_seq_len, _language_is_pipeline_parallel=False,
                           _language_max_sequence_length=recipe.max_sequence_length,
                           context_parallel_lm=1, vision_model=None)


def llava_patches(images: Tensor, patch: int) -> Tensor:
    """[n * rows * cols, 3 * patch**2] flattened patches of [n, 3, h, w] pixels: tile
    after tile, patches row-major, each in conv1's (channel, row, column) order."""
    n, c, h, w = images.shape
    rows, cols = h // patch, w // patch
    x = images.reshape(n, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * rows * cols, c * patch * patch)


def llava_pixels(images: ImageData, patch: int, channels: int = 3) -> Tensor:
    """[n, channels, h, w] pixels of the (sub-microbatch's) images: llava_patches
    inverted (exactly: only a reshape). All tiles have one size."""
    n = len(images.grids)
    if n == 0:
        return images.patches.new_zeros(0, channels, patch, patch)
    rows, cols = images.grids[0]
    if any(g != (rows, cols) for g in images.grids):
        raise ValueError(f"LLaVA tiles have one size; got grids {images.grids}")
    x = images.patches.reshape(n, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, rows * patch, cols * patch)


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    if isinstance(batch, Mapping):
        images = batch.get("images", batch.get("image"))
        return (batch["tokens"], batch["position_ids"], batch["labels"], images,
                batch["loss_mask"])
    tokens, position_ids, labels, images, loss_mask = tuple(batch)[:5]
    return tokens, position_ids, labels, images, loss_mask


def _check_packed(params: Any) -> None:
    """Under --sequence-parallel (CP 1) pretrain_vlm.py's get_batch pads the text so that
    the combined sequence divides by TP and passes megatron-core's
    context_parallel.get_packed_seq_params: one "sbhd" sequence whose cu_seqlens end
    where the padding starts, for Transformer Engine's padding-causal mask. The padding
    is the sequence's tail and carries no loss, and under the causal mask no real token
    attends to it, so the chunks run it as part of the one causal sequence; anything
    else (packed samples, THD for context parallelism) is refused."""
    fmt = getattr(params, "qkv_format", None)
    cu_q, cu_kv = getattr(params, "cu_seqlens_q", None), getattr(params, "cu_seqlens_kv", None)
    one = (cu_q is not None and cu_q.numel() == 2 and int(cu_q[0]) == 0
           and cu_kv is not None and cu_q.tolist() == cu_kv.tolist())
    if fmt != "sbhd" or not one:
        raise ValueError(f"packed_seq_params of format {fmt!r} with cu_seqlens_q "
                         f"{None if cu_q is None else cu_q.tolist()}: LLaVA chunks take one "
                         "sequence (--micro-batch-size 1, no packed sequences or context "
                         "parallelism)")


def llava_microbatch(batch: Any, recipe: LlavaRecipe, index: int = 0) -> MicrobatchData:
    """MicrobatchData of one pretrain_vlm.py microbatch (see [Note: LLaVA microbatch]).

    batch: what get_batch returns at --micro-batch-size 1, (tokens, position_ids,
    labels, images, loss_mask, attention_mask, packed_seq_params) (attention_mask
    None; packed_seq_params None, or under --sequence-parallel the one-sequence
    descriptor get_batch makes, see _check_packed), or a mapping with those keys
    ("image" for "images" too, as the dataset names it). index: the microbatch's index
    within its global batch. Tensors stay where they are."""
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    tokens, position_ids, labels, images, loss_mask = _unpack(batch)
    if not isinstance(batch, Mapping) and len(tuple(batch)) > 5:
        rest = tuple(batch)[5:]
        if rest[0] is not None:
            raise ValueError("the batch has an attention mask; LLaVA chunks take the layer "
                             "spec's mask type (pretrain_vlm.py passes None)")
        if len(rest) > 1 and rest[1] is not None:
            _check_packed(rest[1])
    if tokens.dim() != 2 or tokens.size(0) != 1:
        raise ValueError(f"tokens must be [1, S] (--micro-batch-size 1), got "
                         f"{tuple(tokens.shape)}")
    tokens, position_ids, labels = tokens.long(), position_ids.long(), labels.long()
    loss_mask = loss_mask.float()
    if images is None:
        images = torch.zeros(0, 3, recipe.img_h, recipe.img_w, device=tokens.device)
    images = images.float()
    want = (3, recipe.img_h, recipe.img_w)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must be [num_tiles, {', '.join(map(str, want))}], got "
                         f"{tuple(images.shape)}")
    n = images.size(0)
    image_token = recipe.image_token_index
    if int((tokens == image_token).sum()) != n:
        raise ValueError(f"{int((tokens == image_token).sum())} image tokens but {n} tiles "
                         "(LLaVAModel takes one tile per image token)")
    tiles = torch.ones(n, dtype=torch.int, device=tokens.device)

    # The labels and loss mask as LLaVAModel's last LM stage makes them.
    _, final_labels, final_mask = LLaVAModel._preprocess_data(
        preprocess_shim(recipe, pre_process=False, post_process=True), None, None, tokens,
        loss_mask, labels, False, None, image_token, tiles)
    # Where every text token lands: the same code with "embeddings" that hold each
    # token's index + 1 (images -1, padding 0; float64 holds them exactly).
    source = torch.arange(1, tokens.size(1) + 1, dtype=torch.float64,
                          device=tokens.device).view(1, -1, 1)
    # (No images: LLaVAModel's empty [0, 0, h] image embeddings.)
    marks = torch.full((recipe.img_seq_len if n else 0, n, 1), -1.0, dtype=torch.float64,
                       device=tokens.device)
    placed, _, _ = LLaVAModel._preprocess_data(
        preprocess_shim(recipe, pre_process=True, post_process=False), marks, source, tokens,
        None, None, False, None, image_token, tiles)
    placed = placed.view(-1).round().long()
    if (placed == 0).any():
        raise ValueError("LLaVA left padding in a one-sample microbatch")
    is_image = placed < 0
    text_ids = tokens[0, (placed - 1).clamp(min=0)]
    lm_tokens = torch.where(is_image, torch.full_like(text_ids, IMAGE_TOKEN_ID), text_ids)
    length = lm_tokens.numel()
    if final_labels.size(1) != length:
        raise ValueError(f"LLaVA's labels hold {final_labels.size(1)} positions, its "
                         f"embeddings {length}")
    text = LlavaTextData(
        tokens=lm_tokens, labels=final_labels[0], loss_mask=final_mask[0].float(),
        position_ids=torch.arange(length, device=tokens.device),
        cu_seqlens=cu_seqlens([length]).to(tokens.device),
        image_positions=is_image.nonzero().view(-1), sample_lengths=(length,),
        loss_tokens=int(final_mask.sum().item()), input_ids=tokens,
        text_position_ids=position_ids, num_image_tiles=tiles)
    rows, cols = recipe.img_h // recipe.patch_dim, recipe.img_w // recipe.patch_dim
    grid_r = torch.arange(rows).repeat_interleave(cols)
    grid_c = torch.arange(cols).repeat(rows)
    positions = torch.stack((grid_r, grid_c), dim=1).repeat(n, 1).to(tokens.device)
    image_data = ImageData(
        indices=tuple(range(n)), patches=llava_patches(images, recipe.patch_dim),
        positions=positions, cu_seqlens=cu_seqlens([rows * cols] * n).to(tokens.device),
        grids=((rows, cols),) * n, lm_tokens=(recipe.img_seq_len,) * n)
    empty = torch.zeros(0, 0, device=tokens.device)
    clips = ClipData(indices=(), latents=empty, noise=empty.clone(),
                     timesteps=torch.zeros(0, device=tokens.device),
                     positions=torch.zeros(0, 3, dtype=torch.int64, device=tokens.device),
                     cu_seqlens=cu_seqlens([]).to(tokens.device), lengths=(), samples=())
    return MicrobatchData(index=index, text=text, images=image_data, clips=clips,
                          splits=LLAVA_SPLITS)
