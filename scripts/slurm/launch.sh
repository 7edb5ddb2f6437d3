#!/bin/bash
# Shared launcher behind the sbatch files here: one srun task per GPU (or CPU rank) running
# PipeWeaver training with the --pipeweaver flags.
#
#   bash launch.sh MODEL [training flags...]     (inside an allocation; the sbatch files call it)
#
# Entry point: scripts/pretrain_lmm.py (megatron-core alone), or, when MEGATRON_DIR is set,
# the patched Megatron-LM script $MEGATRON_DIR/$MEGATRON_SCRIPT (default pretrain_vlm.py for
# VLM models, pretrain_gpt.py otherwise; patches/ adds the --pipeweaver flags to both, and
# MEGATRON_ARGS carries Megatron's own data and tokenizer flags).
# Overridable environment: PYTHON (default the repo's .venv/bin/python, else python3),
# PIPEWEAVER_DIR (repo root, default the submit directory), PIPEWEAVER_LOG_DIR (default
# logs/), MASTER_ADDR (default the first node), MASTER_PORT (default from the job id),
# OMP_NUM_THREADS and the NCCL_* variables below.
set -euo pipefail

MODEL=${1:?usage: launch.sh MODEL [training flags...]}
shift
: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm allocation (sbatch or salloc)}"
ROOT=${PIPEWEAVER_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -n "${MEGATRON_DIR:-}" ]]; then
    case "${MODEL,,}" in
        *vlm*) default_script=pretrain_vlm.py ;;
        *) default_script=pretrain_gpt.py ;;
    esac
    read -ra megatron_args <<< "${MEGATRON_ARGS:-}"
    ENTRY=("$MEGATRON_DIR/${MEGATRON_SCRIPT:-$default_script}" "${megatron_args[@]}")
    export PYTHONPATH="$MEGATRON_DIR:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    ENTRY=("$ROOT/scripts/pretrain_lmm.py")
fi

# Rendezvous: rank 0 runs on the first node of the allocation; a port per job.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# NCCL: InfiniBand on, the bootstrap on any interface but loopback and docker; Megatron's
# TP/SP overlap wants a single CUDA connection.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^docker0,lo}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

LOG_DIR=${PIPEWEAVER_LOG_DIR:-$ROOT/logs}
mkdir -p "$LOG_DIR"
JOB_LOG="$LOG_DIR/${SLURM_JOB_NAME:-pipeweaver}-${SLURM_JOB_ID:-0}.jsonl"

echo "$(date -Is) job ${SLURM_JOB_ID:-?}: $MODEL, ${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1}" \
     "tasks, master $MASTER_ADDR:$MASTER_PORT, entry ${ENTRY[0]}, log $JOB_LOG"

# Megatron-LM reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun's names): set them per task.
# shellcheck disable=SC2016  # expanded by each task's bash, not here
srun --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
    pipeweaver "$PYTHON" "${ENTRY[@]}" \
    --pipeweaver --pipeweaver-model-config "$MODEL" --pipeweaver-log "$JOB_LOG" "$@"
