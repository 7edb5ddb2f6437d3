"""Train a multimodal model with PipeWeaver on megatron-core alone (no Megatron-LM needed).

    torchrun --nproc-per-node 2 scripts/pretrain_lmm.py --pipeweaver \\
        --pipeweaver-model-config tiny-vlm --pipeline-model-parallel-size 2 --train-iters 5

Flags: `--help`; the code lives in pipeweaver_megatron.megatron.pretrain (also runnable as
`torchrun ... -m pipeweaver_megatron.megatron.pretrain`).
"""

import sys

from pipeweaver_megatron.megatron.pretrain import main

if __name__ == "__main__":  # the planner service spawns processes that re-import __main__
    sys.exit(main())
