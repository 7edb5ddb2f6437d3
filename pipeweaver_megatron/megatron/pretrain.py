"""The training entry point behind scripts/pretrain_lmm.py: PipeWeaver on megatron-core
alone (no Megatron-LM needed).

    torchrun --nproc-per-node 2 scripts/pretrain_lmm.py --pipeweaver \
        --pipeweaver-model-config tiny-vlm --pipeline-model-parallel-size 2 --train-iters 5

or under srun (SLURM_PROCID / SLURM_NTASKS). NCCL on CUDA, gloo otherwise. Megatron-style
flags below; the --pipeweaver flags come from pipeweaver_megatron.add_arguments.
"""

from __future__ import annotations

import argparse
import sys

import pipeweaver_megatron


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--train-iters", type=int, default=10)
    parser.add_argument("--global-batch-size", type=int,
                        help="packed microbatches per iteration over all data-parallel "
                             "replicas (default: the model spec's)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="sequences per microbatch: 1, one packed sequence of "
                             "--seq-length tokens")
    parser.add_argument("--seq-length", type=int,
                        help="LM tokens per packed microbatch (default: the model spec's)")
    parser.add_argument("--use-distributed-optimizer", action="store_true",
                        help="megatron-core's distributed optimizer (CUDA)")
    parser.add_argument("--clip-grad", type=float, default=0.0,
                        help="clip the global gradient norm to this (0: off)")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="with TP > 1: megatron sequence parallelism in every module "
                             "(norms and activations between layers sharded over TP)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true",
                        help="chunks compute and stages exchange activations in bfloat16; "
                             "gradients are summed and Adam steps in fp32 (main copies)")
    parser.add_argument("--transformer-impl", choices=("transformer_engine", "local"),
                        help="layer spec (default: transformer_engine when it and CUDA are "
                             "present, else local with SDPA core attention)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workload", help="dataset generator or JSONL trace of a real dataset's "
                                           "metadata (default: the model's)")
    parser.add_argument("--data-path", metavar="DIR_OR_METADATASET_YAML",
                        help="train on a prepared Energon dataset (`pipeweaver data prepare`) "
                             "instead of synthetic tensors: each data-parallel rank reads its "
                             "share, the planner plans those batches")
    parser.add_argument("--data-split", default="train",
                        help="the split of --data-path to train on")
    parser.add_argument("--tokenizer-model", metavar="DIR",
                        help="tokenizer folder (tokenizer.json, e.g. `pipeweaver data demo`'s "
                             "BPE) for --data-path (default: byte-level, no file)")
    parser.add_argument("--save", help="checkpoint directory")
    parser.add_argument("--save-interval", type=int, default=0)
    parser.add_argument("--load", help="resume from this checkpoint directory")
    parser.add_argument("--pipeweaver-save-grads", metavar="DIR",
                        help="debugging: after each iteration's reduction and clipping, write "
                             "every rank's gradients by parameter name to "
                             "DIR/iter_NNNNNNN_rank_RRRR.pt (to compare runs or layouts)")
    pipeweaver_megatron.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.pipeweaver:
        parser.error("this entry point runs LMM chunks through forward_backward_pipeweaver: pass "
                     "--pipeweaver (with --pipeweaver-schedule megatron-1f1b for Megatron's "
                     "static order through the same runtime)")
    if not args.pipeweaver_model_config:
        parser.error("--pipeweaver-model-config is required")
    if args.micro_batch_size != 1:
        parser.error(f"--micro-batch-size {args.micro_batch_size}: a PipeWeaver microbatch is "
                     "one packed sequence of samples (--seq-length tokens); use 1")
    if args.clip_grad < 0:
        parser.error(f"--clip-grad must be >= 0, got {args.clip_grad}")
    if args.data_path and args.workload:
        parser.error("--data-path and --workload: train on a dataset (--data-path) or on a "
                     "synthetic workload (--workload), not both")
    if args.tokenizer_model and not args.data_path:
        parser.error("--tokenizer-model needs --data-path (synthetic data has no text)")
    if args.pipeweaver_skip_bad_samples < 0:
        parser.error(f"--pipeweaver-skip-bad-samples must be >= 0, got "
                     f"{args.pipeweaver_skip_bad_samples}")
    if args.use_distributed_optimizer and (args.save or args.load):
        parser.error("--save/--load with --use-distributed-optimizer: this entry point does not "
                     "yet save the distributed optimizer's sharded state; train without it or "
                     "without checkpoints")
    return args


def main(argv=None) -> int:
    from pipeweaver_megatron.megatron.trainer import train

    train(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
