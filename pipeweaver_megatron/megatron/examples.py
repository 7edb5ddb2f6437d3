"""Example Megatron-LM command lines that run on a CPU (through the stand-in).

TINY_LLAVA: pretrain_vlm.py's flags for a LLaVA small enough for 2 CPU cores (CLIP ViT
2 x 64 on 32 px tiles of 8 px patches, GPT 4 x 64, 4 microbatches of 80 LM tokens per
iteration), with what a CPU needs (--transformer-impl local, NullTokenizer, the torch
checkpoint format pretrain_vlm.py asserts, --eval-interval even without evaluation),
dropout off so that runs at different PP compare exactly, and per-token losses. Add
--pipeline-model-parallel-size, --train-iters and --pipeweaver as wanted. The drop-in
tests and benchmarks/megatron_dropin.py run it.

TINY_GPT: pretrain_gpt.py's flags for a GPT of 4 layers x 64 on sequences of 64 tokens
(4 microbatches per iteration), its mock data, the same CPU settings and dropout off, and
--untie-embeddings-and-output-weights (the GPT chunks do not tie the output layer to the
embedding). tests/test_gpt_dropin.py runs it.

tiny_llava_on(dataset, tokenizer): TINY_LLAVA on a prepared Energon dataset (--data-path,
megatron/vlm_data.py) with its BPE read by Megatron's HuggingFaceTokenizer, instead of
the mock data and NullTokenizer; --seq-length leaves room for the dataset's documents.
"""

TINY_LLAVA: tuple[str, ...] = (
    "--encoder-num-layers", "2", "--decoder-num-layers", "4", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "256", "--img-h", "32", "--img-w", "32", "--patch-dim", "8",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--transformer-impl", "local",
    "--ckpt-format", "torch", "--log-interval", "1", "--mock-data", "--seed", "1234",
    "--calculate-per-token-loss", "--hidden-dropout", "0", "--attention-dropout", "0")

TINY_GPT: tuple[str, ...] = (
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--transformer-impl", "local",
    "--untie-embeddings-and-output-weights", "--ckpt-format", "torch", "--log-interval", "1",
    "--mock-data", "--num-workers", "0", "--seed", "1234", "--calculate-per-token-loss",
    "--hidden-dropout", "0", "--attention-dropout", "0")


def tiny_llava_on(dataset: str, tokenizer: str, seq_length: int = 192) -> tuple[str, ...]:
    """TINY_LLAVA reading `dataset` (a `pipeweaver data prepare` folder) tokenized by the
    BPE folder `tokenizer` (`pipeweaver data demo` makes both), LM text of seq_length."""
    flags = list(TINY_LLAVA)
    for flag in ("--tokenizer-type", "--vocab-size", "--seq-length"):
        i = flags.index(flag)
        del flags[i:i + 2]
    flags.remove("--mock-data")
    return (*flags, "--seq-length", str(seq_length), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(tokenizer), "--data-path", str(dataset))
