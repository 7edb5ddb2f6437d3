"""Shape signatures: the sequence lengths a stage processes for one (sub-)microbatch.

Costs depend only on these lengths (and on the model), so they are also the key of the
subgraph reuse cache. A vision encoder's sequences are its images (attention never
crosses images); an LM's are the samples packed into the microbatch; a generator's are
its clips, each conditioned on its sample's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..config import ModelSpec, ModuleKind
from ..workload import Microbatch, TokenRules


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """Sequence lengths of one module's input; cond: conditioning lengths per sequence."""

    seqs: tuple[int, ...]
    cond: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        """Total tokens."""
        return sum(self.seqs)

    @property
    def signature(self) -> tuple:
        """Order-free identity: costs do not depend on the order of sequences."""
        if self.cond:
            return tuple(sorted(zip(self.seqs, self.cond)))
        return tuple(sorted(self.seqs))


StageShapes = Mapping[str, ModuleShape]
"""Module name -> its shape for one (sub-)microbatch."""


def microbatch_shapes(model: ModelSpec, microbatch: Microbatch, rules: TokenRules) -> dict[str, ModuleShape]:
    """The shape of every module for a whole microbatch (no sub-microbatch split)."""
    shapes: dict[str, ModuleShape] = {}
    images = rules.image_rule is not None
    for name in model.order:
        kind = model.module(name).kind
        if kind in (ModuleKind.VISION_ENCODER, ModuleKind.PROJECTOR) and images:
            shapes[name] = ModuleShape(microbatch.image_encoder_tokens(rules))
        elif kind == ModuleKind.LANGUAGE_MODEL:
            shapes[name] = ModuleShape(tuple(rules.lm_tokens(s) for s in microbatch.samples))
        elif kind == ModuleKind.GENERATOR:
            seqs, cond = [], []
            for sample in microbatch.samples:
                for clip in sample.clips:
                    seqs.append(rules.generator_tokens(clip))
                    cond.append(max(1, sample.text_tokens))
            shapes[name] = ModuleShape(tuple(seqs), tuple(cond))
    return shapes
