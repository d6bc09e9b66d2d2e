#!/bin/bash
# Add a teacher's log-probs (and top-k) to trace datasets with the Megatron scorer
# (python -m megatron_dcod.score): the teacher split over TP (× PP) GPUs, the traces over the
# data-parallel replicas, across NNODES nodes.
#
#   TEACHER=models/Qwen2.5-32B-Instruct TEACHER_CKPT=ckpt/qwen2.5-32b-tp4 \
#       DATA_PATH=data/traces sbatch slurm/score_teacher.sh
#   DRY_RUN=1 bash slurm/score_teacher.sh          # print the command
#
# Before: the datasets (slurm/preprocess.sh, records without log-probs) and the teacher as a
# Megatron checkpoint (MODE=import-hf HF_DIR=$TEACHER OUT=$TEACHER_CKPT bash slurm/convert_hf.sh;
# torch_dist checkpoints load at any TP/PP). The teacher must share the student's tokenizer
# (checked before any work). AS=ref with the initial student writes ref_logprobs (iw-SFT).
# Stopped by the time limit or preempted, the job requeues and skips the finished shards; a
# rerun of a finished job is a no-op. The datasets must be on a file system every node sees.
#
# ---- resources: one torchrun per node, one scorer process per GPU ----------------------------
#SBATCH --job-name=dcod-score
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

set -euo pipefail

# The checkout: this file's parent dir, or under sbatch (which runs a copy of this file from its
# spool dir) the dir the job was submitted from.
if [[ -z "${REPO_ROOT:-}" ]]; then
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -f "${REPO_ROOT}/slurm/common.sh" ]] || REPO_ROOT="${SLURM_SUBMIT_DIR:-${PWD}}"
fi
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

: "${DATA_PATH:=${REPO_ROOT}/data/traces}"        # dataset prefixes, scored one after the other
: "${TEACHER:=${REPO_ROOT}/models/teacher}"       # HF dir: config.json and tokenizer
: "${TEACHER_CKPT:=${REPO_ROOT}/ckpt/teacher}"    # its Megatron checkpoint (import-hf)
: "${AS:=teacher}"              # teacher: teacher_logprobs (+ top-k); ref: ref_logprobs
: "${TOPK:=8}"                  # teacher top-k per token (--dcod-base-loss kl / todi); 0: none
: "${OVERWRITE:=0}"             # 1: replace arrays the datasets already have

# ---- parallelism -----------------------------------------------------------------------------
# world = NNODES × GPUS_PER_NODE = 2 × 8 = 16 GPUs; DP = world / (TP × PP) = 16 / 4 = 4 replicas.
# A 32B teacher in bf16 is 64 GB of weights: 16 GB per GPU at TP=4, leaving room for one packed
# 16k-token row's activations and its logits (fp32 log-softmax in chunks of 4096 tokens:
# 4096 × 152k / 4 × 4 B ≈ 0.6 GB). TP must divide the attention heads and KV groups (8 for
# Qwen2.5-32B) and stay inside a node; PP splits the layers for 70B-class teachers.
: "${NNODES:=${SLURM_NNODES:-2}}"
: "${GPUS_PER_NODE:=8}"
: "${TP:=4}"
: "${PP:=1}"
: "${SEQ_LENGTH:=16384}"        # tokens per packed row; the longest trace must fit
: "${MICRO_BATCH:=1}"           # rows per forward pass
: "${SHARD_TRACES:=1024}"       # traces per resumable shard, dealt to the DP replicas in turn
: "${EXTRA_ARGS:=}"

read -r -a data_paths <<<"${DATA_PATH}"
read -r -a extra_args <<<"${EXTRA_ARGS}"
SCORE_ARGS=(
    --hf-config "${TEACHER}"
    --load "${TEACHER_CKPT}"
    --data-path "${data_paths[@]}"
    --as "${AS}"
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
    --seq-length "${SEQ_LENGTH}"
    --micro-batch-size "${MICRO_BATCH}"
    --shard-traces "${SHARD_TRACES}"
    --bf16
)
if [[ "${AS}" == teacher && "${TOPK}" != 0 ]]; then
    SCORE_ARGS+=(--topk "${TOPK}")
fi
if [[ "${OVERWRITE}" == 1 ]]; then
    SCORE_ARGS+=(--overwrite)
fi
SCORE_ARGS+=("${extra_args[@]}")

log "score ${#data_paths[@]} dataset(s) as ${AS} with ${TEACHER_CKPT}: TP ${TP} × PP ${PP} on ${NNODES} × ${GPUS_PER_NODE} GPUs"
status=0
launch_torchrun -m megatron_dcod.score "${SCORE_ARGS[@]}" || status=$?
if [[ "${STOP_REQUESTED}" == 1 && "${status}" != 0 ]]; then # the time limit: shards are kept
    log "stopped before the end: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
exit "${status}"
