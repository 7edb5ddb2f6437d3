"""Text tokenizers for real data: a byte-level one that needs no file, and a local
byte-level BPE trained once on text that ships with Python.

Both share one small interface (TextTokenizer): encode(text) -> ids, decode(ids),
vocab_size, image_token_id. The BPE is saved as a Hugging Face tokenizer folder
(tokenizer.json + tokenizer_config.json) that Megatron-LM loads with
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR` (transformers'
AutoTokenizer, as PreTrainedTokenizerFast); our loader reads the same tokenizer.json
with the `tokenizers` library alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from .errors import DataError

PAD, BOS, EOS, IMAGE = "<pad>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)
"""Special tokens of both tokenizers, in id order; IMAGE marks where an image's tokens go."""
DEFAULT_VOCAB_SIZE = 2048
"""tiny-vlm's vocab_size: the BPE's ids fit its embedding."""
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer(Protocol):
    """What the data layer needs of a tokenizer."""

    name: str
    """For logs and stats: "bytes" or the tokenizer folder."""

    @property
    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size)."""

    @property
    def image_token_id(self) -> int:
        """Id of IMAGE."""

    def encode(self, text: str) -> list[int]:
        """Ids of a text; special tokens written in the text map to their ids; no BOS/EOS
        is added."""

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids (special tokens written out)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, the special tokens after them (256..259)."""

    name = "bytes"
    _SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self) -> int:
        """256 bytes plus the special tokens."""
        return 256 + len(SPECIAL_TOKENS)

    @property
    def image_token_id(self) -> int:
        """Id of IMAGE."""
        return 256 + SPECIAL_TOKENS.index(IMAGE)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes; a special token written in the text becomes its id."""
        ids: list[int] = []
        for piece in self._SPLIT.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(256 + SPECIAL_TOKENS.index(piece))
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of encode for the ids it makes."""
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(SPECIAL_TOKENS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class BpeTokenizer:
    """A byte-level BPE read from a tokenizer.json with the `tokenizers` library."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(path)
        file = folder / TOKENIZER_FILE if folder.is_dir() else folder
        if not file.is_file():
            raise DataError(str(path), f"no {TOKENIZER_FILE} here (a tokenizer folder made by "
                                       "`pipeweaver data demo` or `train_bpe`)")
        self.name = str(path)
        self._tok = Tokenizer.from_file(str(file))
        image = self._tok.token_to_id(IMAGE)
        if image is None:
            raise DataError(str(file), f"the tokenizer has no {IMAGE} token")
        self._image = image

    @property
    def vocab_size(self) -> int:
        """Vocabulary including the special tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def image_token_id(self) -> int:
        """Id of IMAGE."""
        return self._image

    def encode(self, text: str) -> list[int]:
        """BPE ids; special tokens written in the text become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids, special tokens kept."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


def python_text() -> Iterator[str]:
    """Real English text that ships with Python: the paragraphs of pydoc's help topics
    (pydoc_data.topics, about 465k characters), in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(paragraph.split())
            if text:
                yield text


def train_bpe(out: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
              texts: Iterable[str] | None = None) -> BpeTokenizer:
    """Train a byte-level BPE (default: on python_text()) with SPECIAL_TOKENS first and
    save OUT/tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError("--vocab-size", f"a byte-level BPE needs at least "
                                        f"{256 + len(SPECIAL_TOKENS)} ids, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(list(python_text() if texts is None else texts), trainer=trainer)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_FILE))
    specials = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS,
                "additional_special_tokens": [IMAGE]}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
              "clean_up_tokenization_spaces": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return BpeTokenizer(folder)


def load_tokenizer(spec: str | Path | None = None) -> TextTokenizer:
    """None or "bytes": ByteTokenizer; otherwise a tokenizer folder or tokenizer.json."""
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer()
    return BpeTokenizer(spec)
