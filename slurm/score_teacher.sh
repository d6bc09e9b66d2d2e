#!/bin/bash
# Teacher traces without log-probs → a trace dataset whose teacher log-probs (and top-k) the
# teacher computes on a GPU (tools/preprocess_traces.py --score-with).
#
#   INPUT=traces.jsonl TEACHER=models/Qwen2.5-32B-Instruct TOKENIZER=models/Qwen2.5-7B \
#       OUTPUT_PREFIX=data/traces sbatch slurm/score_teacher.sh
#   DRY_RUN=1 bash slurm/score_teacher.sh          # print the command
#
# The teacher must share the student's vocabulary. HF transformers holds it on one GPU in bf16
# (2 bytes/param: a 32B teacher takes 64 GB of an 80 GB H100); a larger teacher is scored
# elsewhere (e.g. vLLM with prompt log-probs) and its records go through slurm/preprocess.sh.
# Resumable like preprocess.sh: a requeued job continues after the last finished shard.
#
# ---- resources: the teacher on one GPU, tokenizer workers on the CPUs ----------------------
#SBATCH --job-name=dcod-score
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue

set -euo pipefail

# The checkout: this file's parent dir, or under sbatch (which runs a copy of this file from its
# spool dir) the dir the job was submitted from.
if [[ -z "${REPO_ROOT:-}" ]]; then
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -f "${REPO_ROOT}/slurm/common.sh" ]] || REPO_ROOT="${SLURM_SUBMIT_DIR:-${PWD}}"
fi
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

: "${INPUT:=${REPO_ROOT}/data/raw/traces.jsonl}" # files or HF dataset dirs; globs expand
: "${OUTPUT_PREFIX:=${REPO_ROOT}/data/traces}"
: "${TOKENIZER:=${REPO_ROOT}/models/student}"    # the STUDENT's HF tokenizer dir
: "${TEACHER:=${REPO_ROOT}/models/teacher}"      # HF model dir of the teacher
: "${REF_MODEL:=}"              # the initial student's HF dir: also store ref_logprobs (iw-SFT)
: "${TOPK:=8}"                  # teacher top-k per token (--dcod-base-loss kl / todi)
: "${SCORE_DTYPE:=bf16}"
: "${SCORE_BATCH_TOKENS:=65536}" # padded tokens per forward pass; lower it on out-of-memory
: "${MAX_SEQ_LENGTH:=16384}"
: "${CPUS:=${SLURM_CPUS_PER_TASK:-$(nproc)}}"
: "${WORKERS:=$((CPUS > 1 ? CPUS - 1 : 1))}"
: "${EXTRA_ARGS:=}"

expand_paths inputs "${INPUT}"
read -r -a extra_args <<<"${EXTRA_ARGS}"

SCORE_ARGS=(
    --input "${inputs[@]}"
    --output-prefix "${OUTPUT_PREFIX}"
    --tokenizer "${TOKENIZER}"
    --max-seq-length "${MAX_SEQ_LENGTH}"
    --workers "${WORKERS}"
    --score-with "${TEACHER}"
    --score-topk "${TOPK}"
    --score-device cuda
    --score-dtype "${SCORE_DTYPE}"
    --score-batch-tokens "${SCORE_BATCH_TOKENS}"
)
if [[ -n "${REF_MODEL}" ]]; then
    SCORE_ARGS+=(--ref-model "${REF_MODEL}")
fi
SCORE_ARGS+=("${extra_args[@]}")

log "score ${#inputs[@]} input(s) with ${TEACHER} (top-${TOPK}) → ${OUTPUT_PREFIX}"
run_or_print "${PYTHON}" tools/preprocess_traces.py "${SCORE_ARGS[@]}"
