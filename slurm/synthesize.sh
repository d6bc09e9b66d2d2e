#!/bin/bash
# Training traces from prompts (tools/synthesize_traces.py): teacher, MOTAB or SKD, as a job
# array over prompt shards, then a merge.
#
#   PROMPTS="prompts/*.jsonl" TEACHER=models/Qwen3-32B STUDENT=models/Qwen3-4B METHOD=motab \
#       sbatch --array=0-15 slurm/synthesize.sh          # shard I of 16 per array task
#   MODE=merge SHARDS=16 sbatch --gpus-per-node=0 --time=00:30:00 slurm/synthesize.sh
#                                                       # after all tasks: one file, no GPU
#   DRY_RUN=1 bash slurm/synthesize.sh                   # print the command
#
# Each task writes ${OUT_DIR}/part-I-of-N.jsonl; a requeued or rerun task resumes it (finished
# prompts are kept). vLLM runs the student and the teacher in one process on the task's GPUs:
# the teacher with TEACHER_TP GPUs, the student with STUDENT_TP (both from GPU 0 on), so the
# memory fractions split the GPUs they share; set TEACHER_TP to the GPUs a task has.
#
#SBATCH --job-name=dcod-synthesize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.log
#SBATCH --open-mode=append
#SBATCH --requeue

set -euo pipefail

if [[ -z "${REPO_ROOT:-}" ]]; then
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -f "${REPO_ROOT}/slurm/common.sh" ]] || REPO_ROOT="${SLURM_SUBMIT_DIR:-${PWD}}"
fi
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

: "${MODE:=synthesize}"                            # or merge
: "${METHOD:=motab}"                               # teacher | motab | skd
: "${PROMPTS:=${REPO_ROOT}/data/prompts.jsonl}"    # files or HF dataset dirs; globs expand
: "${TEACHER:=${REPO_ROOT}/models/teacher}"
: "${STUDENT:=${REPO_ROOT}/models/student}"
: "${OUT_DIR:=${REPO_ROOT}/data/synthesized}"
: "${SHARD:=${SLURM_ARRAY_TASK_ID:-0}}"
: "${SHARDS:=${SLURM_ARRAY_TASK_COUNT:-1}}"
: "${TEACHER_TP:=4}"                               # GPUs of the teacher
: "${STUDENT_TP:=1}"
: "${TEACHER_MEMORY:=0.55}"                        # GPU memory fractions when they share GPUs
: "${STUDENT_MEMORY:=0.3}"
: "${RESPONSES:=5}"
: "${LIVE:=1024}"                                  # trajectories advanced together
: "${EXTRA_ARGS:=}"                                # e.g. "--answer-field answer --keep correct"

if [[ "${MODE}" == merge ]]; then
    merged="${OUT_DIR}/${METHOD}.jsonl"
    parts=()
    for ((i = 0; i < SHARDS; i++)); do
        part="${OUT_DIR}/part-${i}-of-${SHARDS}.jsonl"
        parts+=("${part}")
        if [[ "${DRY_RUN}" != 1 ]] && ! grep -q '"complete": true' "${part}.summary.json"; then
            echo "error: ${part} is not complete; rerun its array task first" >&2
            exit 1
        fi
    done
    log "merge ${SHARDS} parts → ${merged}"
    if [[ "${DRY_RUN}" == 1 ]]; then
        echo "cat ${parts[*]} > ${merged}"
    else
        cat "${parts[@]}" >"${merged}.tmp" && mv "${merged}.tmp" "${merged}"
    fi
    exit 0
fi
[[ "${MODE}" == synthesize ]] || { echo "error: MODE must be synthesize or merge" >&2; exit 1; }

expand_paths prompts "${PROMPTS}"
read -r -a extra_args <<<"${EXTRA_ARGS}"
student_args=()
[[ "${METHOD}" == teacher ]] || student_args=(--student "${STUDENT}"
    --student-tensor-parallel-size "${STUDENT_TP}" --student-gpu-memory-utilization "${STUDENT_MEMORY}")

SYNTHESIS_ARGS=(
    --method "${METHOD}"
    --prompts "${prompts[@]}"
    --teacher "${TEACHER}"
    "${student_args[@]}"
    --out "${OUT_DIR}/part-${SHARD}-of-${SHARDS}.jsonl"
    --shard "${SHARD}/${SHARDS}"
    --responses-per-prompt "${RESPONSES}"
    --backend vllm
    --teacher-tensor-parallel-size "${TEACHER_TP}"
    --teacher-gpu-memory-utilization "${TEACHER_MEMORY}"
    --max-live-trajectories "${LIVE}"
    "${extra_args[@]}"
)

[[ "${DRY_RUN}" == 1 ]] || mkdir -p "${OUT_DIR}"
log "synthesize ${METHOD}: shard ${SHARD}/${SHARDS} of ${#prompts[@]} prompt input(s)"
run_or_print "${PYTHON}" tools/synthesize_traces.py "${SYNTHESIS_ARGS[@]}"
