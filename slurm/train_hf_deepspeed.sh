#!/bin/bash
# Distill teacher traces into a Qwen2.5-7B-class Hugging Face student with DCOD and DeepSpeed
# ZeRO-3 on 2 nodes × 8 GPUs (python -m megatron_dcod.train_hf: no conversion, HF dir in and out).
#
#   sbatch slurm/train_hf_deepspeed.sh                                  # from the checkout's root
#   HF_MODEL=models/student GLOBAL_BATCH=256 sbatch slurm/train_hf_deepspeed.sh   # any setting
#   DRY_RUN=1 bash slurm/train_hf_deepspeed.sh    # print the command and check every flag with
#                                                 # the trainer's parser; no GPU, no data needed
#   NNODES=1 GPUS_PER_NODE=2 bash slurm/train_hf_deepspeed.sh   # no Slurm: torchrun here
#
# Stopped by its time limit, the job checkpoints and requeues itself (slurm/common.sh); a
# preempted one is requeued by Slurm (--requeue). Either resumes from its last checkpoint.
#
# ---- resources: one torchrun per node, which starts one trainer process per GPU ---------------
#SBATCH --job-name=dcod-hf-7b
#SBATCH --nodes=2
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
# ZeRO-3 overlaps its parameter all-gathers and gradient reduce-scatters with compute on other
# CUDA streams; common.sh's default of one hardware queue (Megatron's TP needs it) would
# serialize them. No tensor parallelism here: CUDA's default of 8 queues.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-8}"
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

# ---- inputs and outputs ----------------------------------------------------------------------
# HF_MODEL: the student's HF dir (config.json, weights, tokenizer), e.g. models/student. The
# default is a config-only preset, enough for DRY_RUN=1; a real run needs the full dir.
: "${HF_MODEL:=${REPO_ROOT}/examples/presets/qwen2.5-7b}"
: "${TOKENIZER:=}"              # tokenizer the datasets were made with, if not HF_MODEL's
: "${DATA_PATH:=${REPO_ROOT}/data/traces}" # trace dataset prefixes, weighted: "0.7 a 0.3 b"
: "${SPLIT:=98,2,0}"            # train / validation / test shares of the traces
: "${RUN_DIR:=${REPO_ROOT}/runs/dcod-hf-7b}"
: "${SAVE_DIR:=${RUN_DIR}/checkpoints}"
: "${SAVE_HF:=}"                # the final HF export; empty: SAVE_DIR/hf
: "${SAVE_HF_INTERVAL:=}"       # also export every this many steps, to {SAVE_HF}_iter_NNNNNNN
: "${TENSORBOARD_DIR:=${RUN_DIR}/tensorboard}"
: "${DEEPSPEED_CONFIG:=}"       # DeepSpeed JSON whose entries override the generated config

# ---- parallelism and batch -------------------------------------------------------------------
# world        = NNODES × GPUS_PER_NODE                = 2 × 8          = 16 GPUs
# DP           = world (ZeRO shards the model, no TP/PP) = 16 ranks
# accumulation = GLOBAL_BATCH / (MICRO_BATCH × DP)     = 128 / (1 × 16) = 8 micro-batches a step
# tokens/step  = GLOBAL_BATCH × SEQ_LENGTH             = 128 × 16384    ≈ 2.1 M (packed traces)
# The trainer checks these divisions at start-up; DRY_RUN=1 runs the same check here.
# Memory per GPU at ZeRO-3 over 16 ranks, roughly, for 7.6 B params: bf16 weights 2 B/param and
# fp32 gradients, master weights and Adam moments 16 B/param, all sharded: 18 B × 7.6 B / 16
# ≈ 8.6 GB; the layers being gathered (one or two of 0.23 B params, the 0.55 B embedding or
# output layer) ≈ 1–2 GB in bf16; with gradient checkpointing, each of the 28 layers keeps its
# bf16 input, 16384 × 3584 × 2 B ≈ 0.12 GB, ≈ 3.3 GB, and the one layer recomputed in the
# backward pass (MLP 16384 × 18944 per tensor, flash attention) ≈ 4 GB; fp32 logits in chunks of
# 2048 tokens, 2048 × 152064 × 4 B ≈ 1.2 GB, and their gradient. About 20 GB in all, plus
# DeepSpeed's communication buckets: headroom on an 80 GB GPU. Without gradient checkpointing
# the 28 layers' activations (≈ 3–4 GB each) do not fit. OFFLOAD_OPTIMIZER=cpu
# moves the fp32 gradients, master weights and Adam state (16 B/param / 16 ≈ 7.6 GB per GPU,
# ≈ 61 GB per node) to host memory and the Adam step to the CPUs.
: "${NNODES:=${SLURM_JOB_NUM_NODES:-2}}"
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"
: "${ZERO_STAGE:=3}"            # 0 (plain DP), 1 (optimizer), 2 (+ gradients), 3 (+ weights)
: "${OFFLOAD_OPTIMIZER:=}"      # cpu: optimizer state and step on the host (ZeRO 1–3)
: "${GRADIENT_CHECKPOINTING:=1}" # recompute each decoder layer's activations in the backward
: "${MICRO_BATCH:=1}"           # packed sequences per GPU per forward pass
: "${GLOBAL_BATCH:=128}"
: "${SEQ_LENGTH:=16384}"        # traces are packed into rows of this many tokens
: "${LOGITS_CHUNK_TOKENS:=2048}" # tokens per chunk of the output layer and log-softmax

# ---- schedule, precision, correction ---------------------------------------------------------
: "${TRAIN_ITERS:=2000}"        # 2000 steps × 2.1 M tokens ≈ 4.2 B tokens
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_ITERS:=50}"
: "${SAVE_INTERVAL:=200}"       # a checkpoint (bf16 weights + fp32 optimizer ≈ 14 B/param ≈ 106 GB)
: "${EVAL_INTERVAL:=200}"
: "${EVAL_ITERS:=10}"
: "${LOG_INTERVAL:=10}"
: "${PRECISION:=bf16}"          # bf16 or fp32 (fp32: CPU runs)
: "${WEIGHTING:=dcod}"          # sft, dft, iw_sft, dcod (README, docs/method.md)
: "${DCOD_SCOPE:=token}"
: "${DCOD_TEMPERATURE:=4}"
: "${DCOD_OFFSET:=0}"
: "${DCOD_SCALE:=2}"            # w = scale · σ((Δ − offset) / temperature), 1 where Δ = offset
: "${EXTRA_ARGS:=}"             # more trainer flags, appended last (so they override)

# ---- the trainer's flags ---------------------------------------------------------------------
read -r -a data_paths <<<"${DATA_PATH}"
read -r -a extra_args <<<"${EXTRA_ARGS}"

# Architecture, weights and tokenizer come from the HF dir (AutoModelForCausalLM).
MODEL_ARGS=(--hf-model "${HF_MODEL}")
if [[ -n "${TOKENIZER}" ]]; then
    MODEL_ARGS+=(--dcod-tokenizer "${TOKENIZER}")
fi

# Traces are packed greedily into SEQ_LENGTH rows, attention kept inside each trace; the same
# datasets, blend, split and sample order as the Megatron engine.
DATA_ARGS=(--data-path "${data_paths[@]}" --split "${SPLIT}" --seq-length "${SEQ_LENGTH}")

DEEPSPEED_ARGS=(--zero-stage "${ZERO_STAGE}" --logits-chunk-tokens "${LOGITS_CHUNK_TOKENS}")
if [[ -n "${OFFLOAD_OPTIMIZER}" ]]; then
    DEEPSPEED_ARGS+=(--offload-optimizer "${OFFLOAD_OPTIMIZER}")
fi
if [[ "${GRADIENT_CHECKPOINTING}" == 1 ]]; then
    DEEPSPEED_ARGS+=(--gradient-checkpointing)
fi
if [[ -n "${DEEPSPEED_CONFIG}" ]]; then
    DEEPSPEED_ARGS+=(--deepspeed-config "${DEEPSPEED_CONFIG}")
fi

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
)

# bf16 weights and activations; fp32 master weights, gradients and Adam state.
PRECISION_ARGS=()
case "${PRECISION}" in
    bf16) PRECISION_ARGS+=(--bf16) ;;
    fp32) ;;
    *) die "PRECISION must be bf16 or fp32, not ${PRECISION}" ;;
esac

DCOD_ARGS=(
    --dcod-weighting "${WEIGHTING}"
    --dcod-scope "${DCOD_SCOPE}"
    --dcod-temperature "${DCOD_TEMPERATURE}"
    --dcod-offset "${DCOD_OFFSET}"
    --dcod-scale "${DCOD_SCALE}"
)

# --load is the --save dir: a requeued job resumes from its last DeepSpeed checkpoint (model,
# optimizer and ZeRO partitions, LR schedule, RNG and data position; `latest` names it). The
# first run, with none there, starts from HF_MODEL's weights.
# --exit-signal-handler: on SIGTERM finish the step, save, exit (slurm/common.sh).
CHECKPOINT_ARGS=(
    --save "${SAVE_DIR}"
    --load "${SAVE_DIR}"
    --save-interval "${SAVE_INTERVAL}"
    --exit-signal-handler
)
if [[ -n "${SAVE_HF}" ]]; then
    CHECKPOINT_ARGS+=(--save-hf "${SAVE_HF}")
fi
if [[ -n "${SAVE_HF_INTERVAL}" ]]; then
    CHECKPOINT_ARGS+=(--save-hf-interval "${SAVE_HF_INTERVAL}")
fi

LOGGING_ARGS=(
    --log-interval "${LOG_INTERVAL}"
    --eval-interval "${EVAL_INTERVAL}"
    --eval-iters "${EVAL_ITERS}"
    --tensorboard-dir "${TENSORBOARD_DIR}"
)

TRAIN_ARGS=(
    "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${DEEPSPEED_ARGS[@]}" "${TRAINING_ARGS[@]}"
    "${PRECISION_ARGS[@]}" "${DCOD_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}"
    "${extra_args[@]}"
)

# ---- launch ----------------------------------------------------------------------------------
world_size="$((NNODES * GPUS_PER_NODE))" # not WORLD_SIZE: torchrun sets that
log "dcod-hf-7b: ${NNODES} nodes × ${GPUS_PER_NODE} GPUs = ${world_size}, ZeRO-${ZERO_STAGE}," \
    "global batch ${GLOBAL_BATCH} × ${SEQ_LENGTH} tokens; checkpoints in ${SAVE_DIR}"

if [[ "${DRY_RUN}" == 1 ]]; then
    launch_torchrun -m megatron_dcod.train_hf "${TRAIN_ARGS[@]}"
    # The trainer's parser and checks of a world_size-process run: batch geometry, the model's
    # config.json, the DeepSpeed config.
    "${PYTHON}" -m megatron_dcod.train_hf --dcod-dry-run "${world_size}" "${TRAIN_ARGS[@]}"
    exit
fi

# The model is built from HF_MODEL on every start, a resumed one too (then loaded over).
if ! compgen -G "${HF_MODEL}/*.safetensors" >/dev/null &&
    ! compgen -G "${HF_MODEL}/*.bin" >/dev/null; then
    die "HF_MODEL=${HF_MODEL} holds no weights: set it to the student's HF dir (weights, tokenizer)"
fi
if [[ -f "${SAVE_DIR}/latest" ]]; then
    log "resuming from $(<"${SAVE_DIR}/latest") in ${SAVE_DIR}"
fi

mkdir -p "${SAVE_DIR}" "${TENSORBOARD_DIR}"
status=0
launch_torchrun -m megatron_dcod.train_hf "${TRAIN_ARGS[@]}" || status=$?
finish_or_requeue "${status}" "${SAVE_DIR}" "${TRAIN_ITERS}"
