#!/bin/bash
# Teacher traces → a trace dataset (tools/preprocess_traces.py), on one CPU node.
#
#   INPUT="traces/part-*.jsonl more.parquet" TOKENIZER=models/Qwen2.5-7B \
#       OUTPUT_PREFIX=data/traces sbatch slurm/preprocess.sh
#   DRY_RUN=1 bash slurm/preprocess.sh             # print the command
#
# The records carry the teacher's log-probs already (`teacher_logprobs` + `teacher_token_ids`,
# e.g. from vLLM); slurm/score_teacher.sh computes them with the teacher on a GPU instead.
# Resumable: the tool writes shards of SHARD_RECORDS records, and the same command (a rerun, or
# the job requeued after a preemption) continues after the last finished shard.
#
# ---- resources: one process reads and renders chat templates, WORKERS processes tokenize ----
#SBATCH --job-name=dcod-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --mem=128G
#SBATCH --time=08:00:00
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
: "${OUTPUT_PREFIX:=${REPO_ROOT}/data/traces}"   # train_7b.sh's default DATA_PATH
: "${TOKENIZER:=${REPO_ROOT}/models/student}"    # the STUDENT's HF tokenizer dir
: "${MAX_SEQ_LENGTH:=16384}"    # train_7b.sh's SEQ_LENGTH: longer traces could never fit a row
: "${OVERLONG:=truncate}"       # or drop
: "${SHARD_RECORDS:=10000}"
: "${CPUS:=${SLURM_CPUS_PER_TASK:-$(nproc)}}"
: "${WORKERS:=$((CPUS > 1 ? CPUS - 1 : 1))}" # one core stays with the reading process
: "${EXTRA_ARGS:=}"             # e.g. "--skip-bad --prompt-field question"

expand_paths inputs "${INPUT}"
read -r -a extra_args <<<"${EXTRA_ARGS}"

PREPROCESS_ARGS=(
    --input "${inputs[@]}"
    --output-prefix "${OUTPUT_PREFIX}"
    --tokenizer "${TOKENIZER}"
    --max-seq-length "${MAX_SEQ_LENGTH}"
    --overlong "${OVERLONG}"
    --workers "${WORKERS}"
    --shard-records "${SHARD_RECORDS}"
    "${extra_args[@]}"
)

log "preprocess ${#inputs[@]} input(s) → ${OUTPUT_PREFIX} with ${WORKERS} tokenizer workers"
run_or_print "${PYTHON}" tools/preprocess_traces.py "${PREPROCESS_ARGS[@]}"
