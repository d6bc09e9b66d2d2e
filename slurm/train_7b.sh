#!/bin/bash
# Distill teacher traces into a Qwen2.5-7B-class student with DCOD on 8 nodes × 8 GPUs.
#
#   sbatch slurm/train_7b.sh                          # submit from the checkout's root
#   TP=4 GLOBAL_BATCH=256 sbatch slurm/train_7b.sh    # any setting below, from the environment
#   DRY_RUN=1 bash slurm/train_7b.sh                  # print the command and check every flag
#                                                     # with the trainer's parser; no GPU needed
#   NNODES=1 GPUS_PER_NODE=2 bash slurm/train_7b.sh   # no Slurm: torchrun on this machine
#
# Stopped by its time limit, the job checkpoints and requeues itself (slurm/common.sh); a
# preempted one is requeued by Slurm (--requeue). Either resumes from its last checkpoint.
#
# ---- resources: one torchrun per node, which starts one trainer process per GPU ---------------
#SBATCH --job-name=dcod-7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=12:00:00
# ---- log: in the submit dir; a requeued run appends to the same file -------------------------
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
# ---- stop and requeue: USR1 to the batch shell 300 s before the time limit (slurm/common.sh) --
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

# The checkout: this file's parent dir, or under sbatch (which runs a copy of this file from its
# spool dir) the dir the job was submitted from.
if [[ -z "${REPO_ROOT:-}" ]]; then
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -f "${REPO_ROOT}/slurm/common.sh" ]] || REPO_ROOT="${SLURM_SUBMIT_DIR:-${PWD}}"
fi
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

# ---- inputs and outputs ----------------------------------------------------------------------
: "${HF_CONFIG:=${REPO_ROOT}/examples/presets/qwen2.5-7b}" # dir of the student's config.json
: "${TOKENIZER:=}"              # student tokenizer dir: datasets made with another are refused
: "${DATA_PATH:=${REPO_ROOT}/data/traces}" # trace dataset prefixes, weighted: "0.7 a 0.3 b"
: "${SPLIT:=98,2,0}"            # train / validation / test shares of the traces
: "${INIT_CKPT:=}"              # the student's pretrained weights (convert_hf.sh MODE=import-hf)
: "${RUN_DIR:=${REPO_ROOT}/runs/dcod-7b}"
: "${SAVE_DIR:=${RUN_DIR}/checkpoints}"
: "${TENSORBOARD_DIR:=${RUN_DIR}/tensorboard}"
: "${WANDB_PROJECT:=}"          # also log to Weights & Biases when set

# ---- parallelism and batch -------------------------------------------------------------------
# world        = NNODES × GPUS_PER_NODE                = 8 × 8          = 64 GPUs
# DP           = world / (TP × PP)                     = 64 / (2 × 1)   = 32 model replicas
# accumulation = GLOBAL_BATCH / (MICRO_BATCH × DP)     = 128 / (1 × 32) = 4 micro-batches a step
# tokens/step  = GLOBAL_BATCH × SEQ_LENGTH             = 128 × 16384    ≈ 2.1 M (packed traces)
# Megatron checks these divisions at start-up; DRY_RUN=1 runs the same check here.
# TP must divide the 28 attention heads and the 4 key/value groups: 1, 2 or 4, inside a node.
# Memory per GPU at TP=2, roughly: bf16 weights and fp32 gradients, (2 + 4) B × 7.6 B params / 2
# ≈ 23 GB; Adam's fp32 master weights and moments, 12 B/param sharded over the 32 DP ranks by
# the distributed optimizer ≈ 1.4 GB; activations of a 16k-token micro-batch with sequence
# parallelism and flash attention ≈ 35 GB; fp32 logits 16384 × 152064 / 2 × 4 B ≈ 5 GB.
: "${NNODES:=${SLURM_JOB_NUM_NODES:-8}}"
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"
: "${TP:=2}"
: "${PP:=1}"
: "${MICRO_BATCH:=1}"           # packed sequences per GPU per forward pass (1 with PP > 1)
: "${GLOBAL_BATCH:=128}"
: "${SEQ_LENGTH:=16384}"        # traces are packed into rows of this many tokens
: "${SEQUENCE_PARALLEL:=1}"     # shard norms/dropout activations over TP (needs TE; TP > 1)

# ---- schedule, precision, correction ---------------------------------------------------------
: "${TRAIN_ITERS:=2000}"        # 2000 steps × 2.1 M tokens ≈ 4.2 B tokens
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_ITERS:=50}"
: "${SAVE_INTERVAL:=200}"       # a checkpoint (weights + optimizer ≈ 14 B/param ≈ 106 GB)
: "${EVAL_INTERVAL:=200}"
: "${EVAL_ITERS:=10}"
: "${LOG_INTERVAL:=10}"
: "${PRECISION:=bf16}"          # bf16 or fp32 (fp32: CPU runs)
: "${FP8:=1}"                   # FP8 GEMMs through Transformer Engine (H100 and newer)
: "${WEIGHTING:=dcod}"          # sft, dft, iw_sft, dcod (README, docs/method.md)
: "${DCOD_SCOPE:=token}"
: "${DCOD_TEMPERATURE:=4}"
: "${DCOD_OFFSET:=0}"
: "${DCOD_SCALE:=2}"            # w = scale · σ((Δ − offset) / temperature), 1 where Δ = offset
: "${EXTRA_ARGS:=}"             # more trainer flags, appended last (so they override)

# ---- the trainer's flags ---------------------------------------------------------------------
read -r -a data_paths <<<"${DATA_PATH}"
read -r -a extra_args <<<"${EXTRA_ARGS}"

# The architecture (layers, heads, GQA, RoPE, vocabulary) comes from config.json (train.py).
MODEL_ARGS=(--hf-config "${HF_CONFIG}")
if [[ -n "${TOKENIZER}" ]]; then
    MODEL_ARGS+=(--dcod-tokenizer "${TOKENIZER}")
fi

# Traces are packed greedily into SEQ_LENGTH rows, attention kept inside each trace.
DATA_ARGS=(--data-path "${data_paths[@]}" --split "${SPLIT}" --seq-length "${SEQ_LENGTH}")

# The distributed optimizer shards Adam's state over DP; its gradient reduce-scatter and
# parameter all-gather overlap the backward and forward passes.
PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)
if [[ "${SEQUENCE_PARALLEL}" == 1 && "${TP}" -gt 1 ]]; then
    PARALLEL_ARGS+=(--sequence-parallel)
fi

# Manual GC: Python's collector runs on all ranks at the same step instead of stalling one.
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH}"
    --global-batch-size "${GLOBAL_BATCH}"
    --train-iters "${TRAIN_ITERS}"
    --lr "${LR}"
    --min-lr "${MIN_LR}"
    --lr-decay-style cosine
    --lr-warmup-iters "${WARMUP_ITERS}"
    --adam-beta2 0.95
    --clip-grad 1.0
    --seed 1234
    --manual-gc
    --manual-gc-interval 100
)

# Hybrid FP8: E4M3 for weights and activations (forward), E5M2 for gradients (wider range);
# each tensor's scale comes from the largest |x| it had over the last 1024 steps (delayed
# scaling). Only GEMM inputs are FP8: parameters stay bf16, master weights, gradient reduction
# and Adam fp32.
PRECISION_ARGS=()
case "${PRECISION}" in
    bf16) PRECISION_ARGS+=(--bf16) ;;
    fp32) ;;
    *) die "PRECISION must be bf16 or fp32, not ${PRECISION}" ;;
esac
if [[ "${FP8}" == 1 ]]; then
    PRECISION_ARGS+=(--fp8-format hybrid --fp8-recipe delayed
        --fp8-amax-history-len 1024 --fp8-amax-compute-algo max)
fi

DCOD_ARGS=(
    --dcod-weighting "${WEIGHTING}"
    --dcod-scope "${DCOD_SCOPE}"
    --dcod-temperature "${DCOD_TEMPERATURE}"
    --dcod-offset "${DCOD_OFFSET}"
    --dcod-scale "${DCOD_SCALE}"
)

# --load is the --save dir: a requeued job resumes from its last checkpoint (model, optimizer,
# LR schedule, RNG and data position). The first run, with none there, starts from INIT_CKPT.
# --exit-signal-handler: on SIGTERM finish the step, save, exit (slurm/common.sh).
CHECKPOINT_ARGS=(
    --save "${SAVE_DIR}"
    --load "${SAVE_DIR}"
    --save-interval "${SAVE_INTERVAL}"
    --ckpt-format torch_dist
    --exit-signal-handler
)
if [[ -n "${INIT_CKPT}" ]]; then
    CHECKPOINT_ARGS+=(--pretrained-checkpoint "${INIT_CKPT}")
fi

LOGGING_ARGS=(
    --log-interval "${LOG_INTERVAL}"
    --eval-interval "${EVAL_INTERVAL}"
    --eval-iters "${EVAL_ITERS}"
    --log-throughput
    --tensorboard-dir "${TENSORBOARD_DIR}"
    --log-timers-to-tensorboard
    --log-validation-ppl-to-tensorboard
)
if [[ -n "${WANDB_PROJECT}" ]]; then
    LOGGING_ARGS+=(--wandb-project "${WANDB_PROJECT}" --wandb-exp-name "${SLURM_JOB_NAME:-dcod-7b}"
        --wandb-save-dir "${RUN_DIR}/wandb")
fi

TRAIN_ARGS=(
    "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}"
    "${PRECISION_ARGS[@]}" "${DCOD_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}"
    "${extra_args[@]}"
)

# ---- launch ----------------------------------------------------------------------------------
world_size="$((NNODES * GPUS_PER_NODE))" # not WORLD_SIZE: torchrun sets that
log "dcod-7b: ${NNODES} nodes × ${GPUS_PER_NODE} GPUs = ${world_size}, TP ${TP}, PP ${PP}," \
    "global batch ${GLOBAL_BATCH} × ${SEQ_LENGTH} tokens; checkpoints in ${SAVE_DIR}"
if [[ -z "${INIT_CKPT}" && ! -f "${SAVE_DIR}/latest_checkpointed_iteration.txt" ]]; then
    log "no checkpoint in SAVE_DIR and no INIT_CKPT: the student starts from random weights"
fi

if [[ "${DRY_RUN}" == 1 ]]; then
    launch_torchrun -m megatron_dcod.train "${TRAIN_ARGS[@]}"
    # Megatron's parser and validation of a world_size-process run, then the project's checks.
    "${PYTHON}" -m megatron_dcod.train --dcod-dry-run "${world_size}" "${TRAIN_ARGS[@]}"
    exit
fi

mkdir -p "${SAVE_DIR}" "${TENSORBOARD_DIR}"
status=0
launch_torchrun -m megatron_dcod.train "${TRAIN_ARGS[@]}" || status=$?
finish_or_requeue "${status}" "${SAVE_DIR}" "${TRAIN_ITERS}"
