"""Deterministic synthetic tensors for a Microbatch, from its metadata alone.

Every sample draws from its own generator seeded with (seed, sample_id), so any rank
regenerates exactly the same tensors without communication, whatever else is packed
with the sample. Tensors are made on the host; move them with ``MicrobatchData.to``.

[Note: synthetic LM sequence] A sample's LM sequence is its text with its images
inserted: image j (of n) occupies its LM tokens right after text token (j * T) // n
(T = the sample's text tokens), so the first image opens the sample. Image positions
hold the placeholder id IMAGE_TOKEN_ID; text ids are an arithmetic sequence in
[1, TEXT_SPAN] with a random start and a stride of 1 to 3, so training has something to
learn (first the ids in use, then the next one from the context) and a falling loss
shows that it does. Positions
restart at 0 in every sample. The label of position p is the token at p + 1 of the same
sample; the loss mask is 1 only where that next token is a text token of the same
sample (no loss on predicting image tokens, none across sample boundaries).

[Note: synthetic images] An image of height x width pixels is resized to the rule's
patch grid (ImageRule.grid, as TokenRules counts it) and given as flattened patches of
channels * temporal_patch_size * patch_size**2 values, in window-major order: the
merge_size**2 patches of one merge window are consecutive, windows in row-major order,
so the projector merges consecutive groups of merge_size**2 tokens into one LM token.

[Note: synthetic clips] A clip is given as its patchified latent video x0 (tokens of
latent_channels * patch_size**2 values, frame-major then row-major), Gaussian noise of
the same shape, and one diffusion time t in (0, 1); the generator sees
(1 - t) * x0 + t * noise and predicts the noise.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..config import ImageRule, ModelSpec, ModuleKind, VideoRule
from ..workload import Microbatch, SampleMeta, TokenRules

IMAGE_TOKEN_ID = 0
"""Placeholder token id at image positions of the LM sequence."""
TEXT_SPAN = 61
"""Text ids cycle through 1..TEXT_SPAN (or the vocabulary, if smaller)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class TextData:
    """The LM side of a whole microbatch (see [Note: synthetic LM sequence])."""

    tokens: Tensor
    """[S] int64 token ids (IMAGE_TOKEN_ID at image positions)."""
    labels: Tensor
    """[S] int64 next token of the same sample (0 where there is none)."""
    loss_mask: Tensor
    """[S] float32, 1 where the label is a text token of the same sample."""
    position_ids: Tensor
    """[S] int64 position within its sample."""
    cu_seqlens: Tensor
    """[n + 1] int32 boundaries of the non-empty samples."""
    image_positions: Tensor
    """[T_img] int64 LM positions of all image tokens, image after image."""
    sample_lengths: tuple[int, ...]
    """LM tokens of every sample (empty ones included), in order."""
    loss_tokens: int
    """Number of 1s in loss_mask (known without a device sync)."""

    @property
    def sample_starts(self) -> tuple[int, ...]:
        """First LM position of every sample."""
        starts, at = [], 0
        for length in self.sample_lengths:
            starts.append(at)
            at += length
        return tuple(starts)


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageData:
    """Images of a (sub-)microbatch (see [Note: synthetic images])."""

    indices: tuple[int, ...]
    """Image indices within the microbatch."""
    patches: Tensor
    """[T_enc, patch_dim] float32 flattened patches, image after image."""
    positions: Tensor
    """[T_enc, 2] int64 (row, col) of every patch in its image's grid."""
    cu_seqlens: Tensor
    """[n + 1] int32 image boundaries in patches."""
    grids: tuple[tuple[int, int], ...]
    """Patch grid (rows, cols) of every image."""
    lm_tokens: tuple[int, ...]
    """LM tokens of every image after the patch merger."""

    @property
    def encoder_tokens(self) -> tuple[int, ...]:
        """Encoder tokens of every image."""
        return tuple(r * c for r, c in self.grids)


@dataclass(frozen=True, kw_only=True, eq=False)
class ClipData:
    """Video clips of a (sub-)microbatch (see [Note: synthetic clips])."""

    indices: tuple[int, ...]
    """Clip indices within the microbatch."""
    latents: Tensor
    """[T_video, latent_channels * patch_size**2] float32 clean latents x0."""
    noise: Tensor
    """Like latents: the noise to predict."""
    timesteps: Tensor
    """[n] float32 diffusion time of every clip, in (0, 1)."""
    positions: Tensor
    """[T_video, 3] int64 (latent frame, row, col) of every token."""
    cu_seqlens: Tensor
    """[n + 1] int32 clip boundaries in tokens."""
    lengths: tuple[int, ...]
    """Generator tokens of every clip."""
    samples: tuple[int, ...]
    """Index (within the microbatch) of the sample every clip belongs to."""


@dataclass(frozen=True, kw_only=True, eq=False)
class MicrobatchData:
    """Synthetic tensors of a microbatch, or of one sub-microbatch after `select`."""

    index: int
    """Microbatch index within its global batch."""
    text: TextData
    """The whole microbatch's LM sequence (never split)."""
    images: ImageData
    """All images, or a sub-microbatch's (possibly none)."""
    clips: ClipData
    """All clips, or a sub-microbatch's (possibly none)."""
    splits: tuple[tuple[str, str], ...]
    """(module, "images" | "clips" | "samples"): what `select` splits for each module."""

    def to(self, device: torch.device) -> MicrobatchData:
        """A copy with every tensor on device."""
        def move(value):
            if isinstance(value, Tensor):
                return value.to(device)
            if dataclasses.is_dataclass(value):
                return dataclasses.replace(value, **{f.name: move(getattr(value, f.name))
                                                     for f in dataclasses.fields(value)})
            return value
        return move(self)


def sample_generator(seed: int, sample_id: int) -> torch.Generator:
    """The host generator all of a sample's tensors are drawn from."""
    key = zlib.crc32(f"pipeweaver-data:{seed}:{sample_id}".encode())
    return torch.Generator().manual_seed(key)


def window_positions(rows: int, cols: int, merge: int) -> Tensor:
    """[rows * cols, 2] (row, col) of the patches in window-major order."""
    r = torch.arange(rows).view(rows // merge, merge, 1, 1).expand(-1, -1, cols // merge, merge)
    c = torch.arange(cols).view(1, 1, cols // merge, merge).expand(rows // merge, merge, -1, -1)
    # order: window row, window col, row within window, col within window
    r, c = r.permute(0, 2, 1, 3).reshape(-1), c.permute(0, 2, 1, 3).reshape(-1)
    return torch.stack((r, c), dim=1)


def clip_positions(frames: int, rows: int, cols: int) -> Tensor:
    """[frames * rows * cols, 3] (frame, row, col), frame-major then row-major."""
    grid = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols),
                          indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


def cu_seqlens(lengths: Sequence[int]) -> Tensor:
    """int32 [n + 1] boundaries of the non-empty lengths."""
    kept = [n for n in lengths if n > 0]
    return torch.tensor([0] + torch.tensor(kept, dtype=torch.int64).cumsum(0).tolist()
                        if kept else [0], dtype=torch.int32)


def _sample_text(sample: SampleMeta, image_tokens: Sequence[int], vocab: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(token ids, is-image flags) of one sample's LM sequence."""
    span = min(vocab - 1, TEXT_SPAN)
    start = torch.randint(0, span, (1,), generator=gen)
    stride = torch.randint(1, 4, (1,), generator=gen)
    text = (start + torch.arange(sample.text_tokens) * stride) % span + 1  # learnable
    pieces, flags, done = [], [], 0
    n = len(image_tokens)
    for j, count in enumerate(image_tokens):
        cut = (j * sample.text_tokens) // n
        pieces += [text[done:cut], torch.full((count,), IMAGE_TOKEN_ID)]
        flags += [torch.zeros(cut - done, dtype=torch.bool), torch.ones(count, dtype=torch.bool)]
        done = cut
    pieces.append(text[done:])
    flags.append(torch.zeros(sample.text_tokens - done, dtype=torch.bool))
    return torch.cat(pieces), torch.cat(flags)


def _image_patches(rule: ImageRule, height: int, width: int,
                   gen: torch.Generator) -> tuple[Tensor, Tensor, tuple[int, int]]:
    rows, cols = rule.grid(height, width)
    dim = rule.channels * rule.temporal_patch_size * rule.patch_size**2
    return (torch.randn(rows * cols, dim, generator=gen),
            window_positions(rows, cols, rule.merge_size), (rows, cols))


def _clip(rule: VideoRule, seconds: float, gen: torch.Generator) -> tuple[Tensor, ...]:
    frames = rule.latent_frames(seconds)
    unit = rule.spatial_compression * rule.patch_size
    rows, cols = rule.height // unit, rule.width // unit
    dim = rule.latent_channels * rule.patch_size**2
    tokens = frames * rows * cols
    latents = torch.randn(tokens, dim, generator=gen)
    noise = torch.randn(tokens, dim, generator=gen)
    t = torch.rand((), generator=gen) * 0.98 + 0.01
    return latents, noise, t, clip_positions(frames, rows, cols)


def microbatch_data(model: ModelSpec, microbatch: Microbatch, rules: TokenRules,
                    seed: int = 0) -> MicrobatchData:
    """The synthetic tensors of a whole microbatch (see the notes above)."""
    vocab = model.language_model.vocab_size
    tokens, flags, sample_lengths = [], [], []
    patches, patch_pos, grids, image_lm = [], [], [], []
    latents, noise, times, clip_pos, clip_len, clip_sample = [], [], [], [], [], []
    for s, sample in enumerate(microbatch.samples):
        gen = sample_generator(seed, sample.sample_id)
        counts = [rules.image_lm_tokens(i) for i in sample.images]
        ids, is_image = _sample_text(sample, counts, vocab, gen)
        tokens.append(ids)
        flags.append(is_image)
        sample_lengths.append(ids.numel())
        for image in sample.images:
            rule = rules.require_image_rule("an image")
            x, pos, grid = _image_patches(rule, image.height, image.width, gen)
            patches.append(x)
            patch_pos.append(pos)
            grids.append(grid)
            image_lm.append(rules.image_lm_tokens(image))
        for clip in sample.clips:
            x0, eps, t, pos = _clip(rules.require_video_rule("a clip"), clip.seconds, gen)
            latents.append(x0)
            noise.append(eps)
            times.append(t)
            clip_pos.append(pos)
            clip_len.append(x0.size(0))
            clip_sample.append(s)
    text = _text_data(tokens, flags, sample_lengths)
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
    latent_dim = 0
    if rules.video_rule is not None:
        latent_dim = rules.video_rule.latent_channels * rules.video_rule.patch_size**2
    clips = ClipData(
        indices=tuple(range(len(clip_len))),
        latents=torch.cat(latents) if latents else torch.zeros(0, latent_dim),
        noise=torch.cat(noise) if noise else torch.zeros(0, latent_dim),
        timesteps=torch.stack(times) if times else torch.zeros(0),
        positions=torch.cat(clip_pos) if clip_pos else torch.zeros(0, 3, dtype=torch.int64),
        cu_seqlens=cu_seqlens(clip_len), lengths=tuple(clip_len), samples=tuple(clip_sample))
    return MicrobatchData(index=microbatch.index, text=text, images=images, clips=clips,
                          splits=_splits(model))


def _splits(model: ModelSpec) -> tuple[tuple[str, str], ...]:
    found = []
    for module in model.modules:
        if module.kind in (ModuleKind.VISION_ENCODER, ModuleKind.PROJECTOR):
            found.append((module.name, "images"))
        elif module.kind == ModuleKind.GENERATOR:
            found.append((module.name, "clips"))
        else:
            found.append((module.name, "samples"))
    return tuple(found)


def _text_data(tokens: list[Tensor], flags: list[Tensor], lengths: list[int]) -> TextData:
    ids = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64)
    is_image = torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)
    labels = torch.zeros_like(ids)
    mask = torch.zeros(ids.numel(), dtype=torch.float32)
    positions = torch.cat([torch.arange(n) for n in lengths]) if lengths else labels.clone()
    start = 0
    for n in lengths:
        if n > 1:
            labels[start:start + n - 1] = ids[start + 1:start + n]
            mask[start:start + n - 1] = (~is_image[start + 1:start + n]).float()
        start += n
    return TextData(tokens=ids, labels=labels, loss_mask=mask, position_ids=positions,
                    cu_seqlens=cu_seqlens(lengths),
                    image_positions=is_image.nonzero().view(-1),
                    sample_lengths=tuple(lengths), loss_tokens=int(mask.sum().item()))


def _take(values: Tensor, bounds: Sequence[int], members: Sequence[int]) -> Tensor:
    """Rows of the members' segments (bounds: cumulative segment ends, from 0)."""
    if not members:
        return values[:0]
    return torch.cat([values[bounds[i]:bounds[i + 1]] for i in members])


def _bounds(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def select(data: MicrobatchData, module: str, members: Sequence[int] | None) -> MicrobatchData:
    """A sub-microbatch's data for a module: the images (encoder, projector) or clips
    (generator) in members, indices relative to the data given, with their own
    cu_seqlens; None keeps everything. The LM is never split: members must then be None
    or every sample. The text is always the whole microbatch's."""
    kind = dict(data.splits).get(module)
    if kind is None:
        raise KeyError(f"no module {module!r} in the data's model")
    if members is None:
        return data
    members = tuple(members)
    if kind == "samples":
        if members != tuple(range(len(data.text.sample_lengths))):
            raise ValueError(f"module {module!r} is never split; members must be every sample")
        return data
    if kind == "images":
        images = data.images
        count = len(images.indices)
        _check_members(module, members, count)
        bounds = _bounds(images.encoder_tokens)
        chosen = ImageData(
            indices=tuple(images.indices[i] for i in members),
            patches=_take(images.patches, bounds, members),
            positions=_take(images.positions, bounds, members),
            cu_seqlens=cu_seqlens([images.encoder_tokens[i] for i in members]),
            grids=tuple(images.grids[i] for i in members),
            lm_tokens=tuple(images.lm_tokens[i] for i in members))
        return dataclasses.replace(data, images=chosen)
    clips = data.clips
    _check_members(module, members, len(clips.indices))
    bounds = _bounds(clips.lengths)
    chosen_clips = ClipData(
        indices=tuple(clips.indices[i] for i in members),
        latents=_take(clips.latents, bounds, members), noise=_take(clips.noise, bounds, members),
        timesteps=clips.timesteps[list(members)],
        positions=_take(clips.positions, bounds, members),
        cu_seqlens=cu_seqlens([clips.lengths[i] for i in members]),
        lengths=tuple(clips.lengths[i] for i in members),
        samples=tuple(clips.samples[i] for i in members))
    return dataclasses.replace(data, clips=chosen_clips)


def _check_members(module: str, members: tuple[int, ...], count: int) -> None:
    if any(not 0 <= i < count for i in members) or len(set(members)) != len(members):
        raise ValueError(f"module {module!r}: members {members} are not distinct indices in "
                         f"[0, {count})")

