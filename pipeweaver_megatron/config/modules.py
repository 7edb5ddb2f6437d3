"""Modality modules: what each module of an LMM is, its sizes and its token rules."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .errors import SpecError


class ModuleKind(str, enum.Enum):
    """The role of a module in the LMM's chain."""

    VISION_ENCODER = "vision_encoder"
    LANGUAGE_MODEL = "language_model"
    GENERATOR = "generator"
    PROJECTOR = "projector"


TRANSFORMER_KINDS = (ModuleKind.VISION_ENCODER, ModuleKind.LANGUAGE_MODEL, ModuleKind.GENERATOR)


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageRule:
    """How an image becomes encoder tokens and LM tokens.

    Dynamic resolution (Qwen2-VL-style ViT, the default): the image is resized to a
    multiple of patch_size * merge_size, cut into patch_size x patch_size patches (the
    encoder's sequence), and merge_size x merge_size neighbouring patches are merged by
    the projector into one LM token.

    Fixed tiles (CLIP ViT of Megatron's LLaVA, fixed_height and fixed_width set): every
    image is one fixed_height x fixed_width tile; the encoder prepends class_tokens
    learned tokens to its patches, and the LM sees every encoder token (merge_size 1)
    unless drop_class_tokens (Megatron's --disable-vision-class-token) drops them before
    the projector.
    """

    patch_size: int = 14
    """Side of one ViT patch in pixels."""
    merge_size: int = 2
    """Side of the patch-merger window; merge_size**2 patches become one LM token."""
    temporal_patch_size: int = 1
    """Frames per temporal patch (Qwen2-VL duplicates a still image into 2)."""
    channels: int = 3
    """Input channels."""
    image_size: int = 364
    """Default side of an image in pixels (364 -> 26x26 patches -> 169 LM tokens)."""
    fixed_height: int = 0
    """Fixed tiles: every image is resized to this height (0: dynamic resolution)."""
    fixed_width: int = 0
    """Fixed tiles: every image is resized to this width (0: dynamic resolution)."""
    class_tokens: int = 0
    """Learned tokens the encoder prepends to every image's patches (CLIP: 1)."""
    drop_class_tokens: bool = False
    """The class tokens are dropped before the projector (they reach no LM position)."""

    def __post_init__(self) -> None:
        for key in ("patch_size", "merge_size", "temporal_patch_size", "channels", "image_size"):
            if getattr(self, key) < 1:
                raise SpecError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("fixed_height", "fixed_width", "class_tokens"):
            if getattr(self, key) < 0:
                raise SpecError(key, f"must be >= 0, got {getattr(self, key)}")
        if bool(self.fixed_height) != bool(self.fixed_width):
            raise SpecError("fixed_height", "fixed tiles need both fixed_height and fixed_width")
        if self.fixed:
            for key in ("fixed_height", "fixed_width"):
                if getattr(self, key) < self.patch_size:
                    raise SpecError(key, f"{getattr(self, key)} is smaller than one patch "
                                         f"({self.patch_size} pixels)")
        if self.class_tokens and self.merge_size != 1:
            raise SpecError("class_tokens", "class tokens need merge_size 1 (no patch merger)")
        if self.drop_class_tokens and not self.class_tokens:
            raise SpecError("drop_class_tokens", "there are no class tokens to drop")
        if self.image_size < self.patch_size * self.merge_size:
            raise SpecError(
                "image_size",
                f"{self.image_size} is smaller than one merge window "
                f"({self.patch_size}*{self.merge_size} pixels)",
            )

    @property
    def fixed(self) -> bool:
        """Every image is one fixed-size tile (CLIP), whatever its size."""
        return bool(self.fixed_height)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols): of the fixed tile, or after resizing to multiples of
        the merge window."""
        if self.fixed:
            return self.fixed_height // self.patch_size, self.fixed_width // self.patch_size
        unit = self.patch_size * self.merge_size
        rows = max(1, round(height / unit)) * self.merge_size
        cols = max(1, round(width / unit)) * self.merge_size
        return rows, cols

    def encoder_tokens(self, height: int, width: int) -> int:
        """Sequence length the vision encoder processes for one image (its patches and
        class tokens)."""
        rows, cols = self.grid(height, width)
        return rows * cols + self.class_tokens

    def lm_tokens(self, height: int, width: int) -> int:
        """Tokens the image occupies in the LM sequence after the projector."""
        rows, cols = self.grid(height, width)
        kept = 0 if self.drop_class_tokens else self.class_tokens
        return rows * cols // (self.merge_size**2) + kept

    @property
    def default_lm_tokens(self) -> int:
        """LM tokens of an image of the default size."""
        return self.lm_tokens(self.image_size, self.image_size)


@dataclass(frozen=True, kw_only=True, slots=True)
class VideoRule:
    """How a video clip becomes generator (DiT) tokens (MovieGen-style latent video).

    Frames are sampled at fps, compressed by the video autoencoder by
    temporal_compression in time and spatial_compression in each spatial dimension,
    then patchified with patch_size x patch_size spatial patches.
    """

    fps: int = 16
    """Frames per second of the training clips."""
    max_clip_seconds: float = 16.0
    """Longest clip; longer source videos are cut."""
    max_clips_per_microbatch: int = 8
    """At most this many clips packed in one microbatch."""
    max_seconds_per_microbatch: float = 16.0
    """Total clip length of one microbatch stays at or under this."""
    height: int = 512
    """Frame height in pixels."""
    width: int = 512
    """Frame width in pixels."""
    temporal_compression: int = 8
    """Frames per latent frame."""
    spatial_compression: int = 8
    """Pixels per latent pixel along each side."""
    patch_size: int = 2
    """Latent pixels per DiT patch along each side."""
    latent_channels: int = 16
    """Channels of the latent video."""

    def __post_init__(self) -> None:
        for key in ("fps", "max_clips_per_microbatch", "temporal_compression",
                    "spatial_compression", "patch_size", "latent_channels"):
            if getattr(self, key) < 1:
                raise SpecError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_clip_seconds", "max_seconds_per_microbatch"):
            if getattr(self, key) <= 0:
                raise SpecError(key, f"must be > 0, got {getattr(self, key)}")
        unit = self.spatial_compression * self.patch_size
        for key in ("height", "width"):
            if getattr(self, key) % unit:
                raise SpecError(key, f"{getattr(self, key)} is not a multiple of "
                                     f"spatial_compression*patch_size = {unit}")

    @property
    def tokens_per_latent_frame(self) -> int:
        """DiT tokens of one latent frame."""
        unit = self.spatial_compression * self.patch_size
        return (self.height // unit) * (self.width // unit)

    def latent_frames(self, seconds: float) -> int:
        """Latent frames of a clip of this length (at least one)."""
        frames = max(1, round(seconds * self.fps))
        return math.ceil(frames / self.temporal_compression)

    def tokens(self, seconds: float) -> int:
        """DiT sequence length of one clip."""
        return self.latent_frames(seconds) * self.tokens_per_latent_frame


@dataclass(frozen=True, kw_only=True, slots=True)
class ModuleSpec:
    """One modality module: a transformer stack (encoder, LM, generator) or a projector."""

    name: str
    """Unique name inside the model; stages' parts refer to it."""
    kind: ModuleKind
    """Role of the module."""
    num_layers: int
    """Transformer layers (a projector counts as one layer)."""
    hidden_size: int
    """Model width (for a projector: its output width, the LM's hidden size)."""
    ffn_hidden_size: int
    """MLP inner width (for a projector: its inner width)."""
    num_attention_heads: int = 0
    """Attention heads (0 for a projector)."""
    num_query_groups: int = 0
    """Key/value groups for grouped-query attention; 0 means one per head (MHA)."""
    gated_mlp: bool = False
    """SwiGLU-style gated MLP (3 weight matrices) instead of a 2-matrix GELU MLP."""
    vocab_size: int = 0
    """Vocabulary of a language model (embedding and output layer)."""
    untie_embeddings: bool = True
    """The LM's output layer has its own weights."""
    cross_attention: bool = False
    """Each layer attends to a conditioning sequence (a DiT conditioned on the LM)."""
    input_size: int = 0
    """Projector input width (vision hidden * merge_size**2); 0 for transformer stacks."""
    image: ImageRule | None = None
    """Image token rule (vision encoders)."""
    video: VideoRule | None = None
    """Video clip token rule (generators)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise SpecError("name", f"{self.name!r} is not a simple identifier")
        for key in ("num_layers", "hidden_size", "ffn_hidden_size"):
            if getattr(self, key) < 1:
                raise SpecError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.kind == ModuleKind.PROJECTOR:
            if self.num_layers != 1:
                raise SpecError("num_layers", "a projector is one layer")
            if self.input_size < 1:
                raise SpecError("input_size", "a projector needs its input width")
            return
        heads, groups = self.num_attention_heads, self.num_query_groups
        if heads < 1:
            raise SpecError("num_attention_heads", f"must be >= 1, got {heads}")
        if self.hidden_size % heads:
            raise SpecError("num_attention_heads",
                            f"{heads} heads do not divide hidden_size {self.hidden_size}")
        if groups < 0 or (groups and heads % groups):
            raise SpecError("num_query_groups",
                            f"{groups} query groups do not divide {heads} attention heads")
        if self.kind == ModuleKind.LANGUAGE_MODEL and self.vocab_size < 1:
            raise SpecError("vocab_size", "a language model needs a vocabulary")
        if self.kind == ModuleKind.VISION_ENCODER and self.image is None:
            raise SpecError("image", "a vision encoder needs an image rule")
        if self.kind == ModuleKind.GENERATOR and self.video is None:
            raise SpecError("video", "a generator needs a video rule")

    @property
    def is_transformer(self) -> bool:
        """A stack of attention + MLP layers (not a projector)."""
        return self.kind in TRANSFORMER_KINDS

    @property
    def query_groups(self) -> int:
        """Effective key/value groups."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0

    @property
    def causal(self) -> bool:
        """Causal self-attention (the LM); encoders and DiTs attend bidirectionally."""
        return self.kind == ModuleKind.LANGUAGE_MODEL

    def layer_params(self, condition_hidden: int = 0) -> int:
        """Weights of one layer (biases ignored; norms counted).

        condition_hidden is the width of the conditioning sequence for cross-attention.
        """
        if self.kind == ModuleKind.PROJECTOR:
            return self.input_size * self.ffn_hidden_size + self.ffn_hidden_size * self.hidden_size
        h, kv = self.hidden_size, self.query_groups * self.head_dim
        attention = h * h + 2 * h * kv + h * h
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_hidden_size
        cross = 0
        if self.cross_attention:
            cond = condition_hidden or h
            cross = h * h + 2 * cond * h + h * h
        return attention + mlp + cross + 2 * h

    def input_params(self) -> int:
        """Weights in front of the first layer (token embedding or patch embedding)."""
        if self.kind == ModuleKind.LANGUAGE_MODEL:
            return self.vocab_size * self.hidden_size
        if self.kind == ModuleKind.VISION_ENCODER and self.image is not None:
            rule = self.image
            return rule.channels * rule.temporal_patch_size * rule.patch_size**2 * self.hidden_size
        if self.kind == ModuleKind.GENERATOR and self.video is not None:
            return self.video.latent_channels * self.video.patch_size**2 * self.hidden_size
        return 0

    def output_params(self, head: bool = True) -> int:
        """Weights behind the last layer (final norm, LM head, DiT output projection).

        head=False leaves out the LM head of an LM that only conditions a generator.
        """
        if self.kind == ModuleKind.PROJECTOR:
            return 0
        norm = self.hidden_size
        if self.kind == ModuleKind.LANGUAGE_MODEL and self.untie_embeddings and head:
            return norm + self.vocab_size * self.hidden_size
        if self.kind == ModuleKind.GENERATOR and self.video is not None:
            return norm + self.hidden_size * self.video.latent_channels * self.video.patch_size**2
        return norm

    def params(self, condition_hidden: int = 0, head: bool = True) -> int:
        """All weights of the module."""
        return (self.input_params() + self.num_layers * self.layer_params(condition_hidden)
                + self.output_params(head))
