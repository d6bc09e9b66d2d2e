#!/bin/bash
# Math evaluation of an HF checkpoint (tools/eval_math.py) over several benchmarks on one
# 8-GPU node, with vLLM.
#
#   MODEL=runs/dcod-7b/hf sbatch slurm/eval.sh
#   BENCHMARKS="aime24 amc23" VLLM_TP=2 sbatch slurm/eval.sh
#   DRY_RUN=1 bash slurm/eval.sh                   # print the commands
#
# GPUs are split into GPUS / VLLM_TP slots of VLLM_TP GPUs each; the benchmarks are dealt out to
# the slots round-robin and each slot runs its share one after another:
#   8 GPUs, VLLM_TP=1 → 8 slots: the 6 default benchmarks run side by side, one per GPU
#   8 GPUs, VLLM_TP=8 → 1 slot: one benchmark after another on all 8 GPUs
# VLLM_TP must divide the attention heads (Qwen2.5-7B: 28 query, 4 key/value → 1, 2 or 4); a
# 7B model in bf16 (15 GB) fits one GPU.
# Data: EVAL_DATA_DIR/<benchmark>/test.jsonl. Results: OUT_DIR/<benchmark>/ (summary.json,
# report.md, generations.jsonl). A rerun (or requeued job) resumes each benchmark from its
# generations. Decoding follows each benchmark's defaults (greedy; AIME, AMC: T 0.6, k samples).
#
# ---- resources ------------------------------------------------------------------------------
#SBATCH --job-name=dcod-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=256G
#SBATCH --time=06:00:00
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

: "${RUN_DIR:=${REPO_ROOT}/runs/dcod-7b}"
: "${MODEL:=${RUN_DIR}/hf}"     # an HF dir (convert_hf.sh MODE=export-hf)
: "${BENCHMARKS:=gsm8k math500 minerva_math olympiadbench aime24 amc23}"
: "${EVAL_DATA_DIR:=${REPO_ROOT}/data/math_eval}"
: "${OUT_DIR:=${RUN_DIR}/eval}"
: "${GPUS:=${SLURM_GPUS_ON_NODE:-8}}"
: "${VLLM_TP:=1}"
: "${BACKEND:=vllm}"            # vllm, or hf (transformers; slower, no vLLM needed)
: "${EXTRA_ARGS:=}"             # e.g. "--max-new-tokens 16384 --limit 100"

read -r -a benchmarks <<<"${BENCHMARKS}"
read -r -a extra_args <<<"${EXTRA_ARGS}"
SLOTS="$((GPUS / VLLM_TP))"
[[ "${SLOTS}" -ge 1 ]] || die "VLLM_TP=${VLLM_TP} needs more than the ${GPUS} GPUs"

# One benchmark on the GPUs of one slot: VLLM_TP consecutive ids from slot × VLLM_TP.
evaluate() {
    local benchmark="$1" slot="$2"
    local devices
    devices="$(seq -s , "$((slot * VLLM_TP))" "$(((slot + 1) * VLLM_TP - 1))")"
    run_or_print env CUDA_VISIBLE_DEVICES="${devices}" "${PYTHON}" tools/eval_math.py \
        --model "${MODEL}" --benchmark "${benchmark}" \
        --data "${EVAL_DATA_DIR}/${benchmark}/test.jsonl" --out "${OUT_DIR}/${benchmark}" \
        --backend "${BACKEND}" --tensor-model-parallel-size "${VLLM_TP}" "${extra_args[@]}"
}

# Benchmarks slot, slot + SLOTS, slot + 2·SLOTS, ... one after another; a failed one is
# reported and the others still run.
run_slot() {
    local slot="$1" index failures=0
    for ((index = slot; index < ${#benchmarks[@]}; index += SLOTS)); do
        evaluate "${benchmarks[index]}" "${slot}" || failures=$((failures + 1))
    done
    return "$((failures > 0))"
}

log "evaluate ${MODEL} on ${#benchmarks[@]} benchmark(s): ${SLOTS} slot(s) of ${VLLM_TP} GPU(s)"
if [[ "${DRY_RUN}" == 1 ]]; then
    for ((slot = 0; slot < SLOTS; slot++)); do
        run_slot "${slot}"
    done
    exit
fi
pids=()
for ((slot = 0; slot < SLOTS && slot < ${#benchmarks[@]}; slot++)); do
    run_slot "${slot}" &
    pids+=("$!")
done
failed=0
for pid in "${pids[@]}"; do
    wait "${pid}" || failed=1
done
[[ "${failed}" == 0 ]] || die "some benchmarks failed: see the log above"
log "results in ${OUT_DIR}/*/report.md"
