"""Example Megatron-LM command lines that run on a CPU (through the stand-in).

TINY_LLAVA: pretrain_vlm.py's flags for a LLaVA small enough for 2 CPU cores (CLIP ViT
2 x 64 on 32 px tiles of 8 px patches, GPT 4 x 64, 4 microbatches of 80 LM tokens per
iteration), with what a CPU needs (--transformer-impl local, NullTokenizer, the torch
checkpoint format pretrain_vlm.py asserts, --eval-interval even without evaluation),
dropout off so that runs at different PP compare exactly, and per-token losses. Add
--pipeline-model-parallel-size, --train-iters and --pipeweaver as wanted. The drop-in
tests and benchmarks/megatron_dropin.py run it.
"""

TINY_LLAVA: tuple[str, ...] = (
    "--encoder-num-layers", "2", "--decoder-num-layers", "4", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "256", "--img-h", "32", "--img-w", "32", "--patch-dim", "8",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--transformer-impl", "local",
    "--ckpt-format", "torch", "--log-interval", "1", "--mock-data", "--seed", "1234",
    "--calculate-per-token-loss", "--hidden-dropout", "0", "--attention-dropout", "0")
