#!/bin/bash
# Checkpoint conversion between HF and Megatron (tools/convert_checkpoint.py), on one CPU node.
#
#   MODE=import-hf HF_DIR=models/Qwen2.5-7B sbatch slurm/convert_hf.sh
#       # HF weights → the student's starting checkpoint (train_7b.sh INIT_CKPT=runs/dcod-7b/init)
#   MODE=export-hf HF_TEMPLATE=models/Qwen2.5-7B sbatch slurm/convert_hf.sh
#       # the trained run (runs/dcod-7b/checkpoints) → runs/dcod-7b/hf, for eval.sh and vLLM
#   DRY_RUN=1 MODE=import-hf bash slurm/convert_hf.sh   # print the command
#
# Both directions stream one layer at a time: memory is about the largest layer (the 7B
# embedding: 152064 × 3584 × 4 B ≈ 2.2 GB in fp32), not the model. Outputs are written under
# OUT.partial and renamed when complete, so a killed job leaves nothing half-written at OUT.
#
# ---- resources ------------------------------------------------------------------------------
#SBATCH --job-name=dcod-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.log

set -euo pipefail

# The checkout: this file's parent dir, or under sbatch (which runs a copy of this file from its
# spool dir) the dir the job was submitted from.
if [[ -z "${REPO_ROOT:-}" ]]; then
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -f "${REPO_ROOT}/slurm/common.sh" ]] || REPO_ROOT="${SLURM_SUBMIT_DIR:-${PWD}}"
fi
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

: "${MODE:=export-hf}"          # export-hf (Megatron → HF) or import-hf (HF → Megatron)
: "${RUN_DIR:=${REPO_ROOT}/runs/dcod-7b}"
: "${DTYPE:=bf16}"
: "${EXTRA_ARGS:=}"             # e.g. "--max-shard-size 2GB"
read -r -a extra_args <<<"${EXTRA_ARGS}"

case "${MODE}" in
    import-hf)
        : "${HF_DIR:=${REPO_ROOT}/models/student}" # HF model dir (safetensors)
        : "${OUT:=${RUN_DIR}/init}"
        # torch_dist stores whole tensors, so the trainer loads this at any TP/PP; the import's
        # TP only sets the vocabulary padding (a multiple of 128 × TP). Use the training TP.
        # (Qwen2.5's 152064 = 128 × 1188 needs no padding at TP 1, 2 or 4.)
        : "${TP:=2}"
        : "${PP:=1}"
        CONVERT_ARGS=(import-hf --hf-dir "${HF_DIR}" --out "${OUT}"
            --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}")
        ;;
    export-hf)
        : "${CKPT:=${RUN_DIR}/checkpoints}" # a --save dir: its latest iteration is exported
        : "${HF_TEMPLATE:=${REPO_ROOT}/models/student}" # config, tokenizer, generation config
        : "${OUT:=${RUN_DIR}/hf}"
        CONVERT_ARGS=(export-hf --ckpt "${CKPT}" --hf-template "${HF_TEMPLATE}" --out "${OUT}")
        ;;
    *) die "MODE must be import-hf or export-hf, not '${MODE}'" ;;
esac

log "${MODE} → ${OUT} (${DTYPE})"
run_or_print "${PYTHON}" tools/convert_checkpoint.py "${CONVERT_ARGS[@]}" --dtype "${DTYPE}" \
    "${extra_args[@]}"
