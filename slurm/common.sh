# shellcheck shell=bash
# Sourced by the slurm/*.sh job scripts: environment, logging, launching, requeue.
#
# Every setting of a job is an environment variable with a default (`: "${NAME:=default}"`),
# so a job is configured from the command line without editing it:
#   TP=4 TRAIN_ITERS=500 sbatch slurm/train_7b.sh
# DRY_RUN=1 prints each command (shell-quoted, copy-pastable) instead of running it.
# Without SLURM_* variables the scripts run on this machine (torchrun --standalone for training).

set -euo pipefail

: "${REPO_ROOT:?set by the job script before sourcing common.sh}"
: "${PYTHON:=python}" # the interpreter with megatron-dcod installed (container or venv)
: "${DRY_RUN:=0}"
cd "${REPO_ROOT}" # tools/ and `-m megatron_dcod` resolve from here, installed or not

# One OpenMP thread per process unless told otherwise: torchrun starts one process per GPU and
# their CPU-side threads would only compete for the node's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# With TP > 1 Megatron overlaps the tensor-parallel all-reduce with the next GEMM; that needs
# kernels issued in order on a single hardware queue (Megatron checks it before Blackwell).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# NCCL: a dead peer fails the job instead of hanging until the time limit. Site settings
# (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, NCCL_DEBUG, ...) pass through from the environment.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# On SIGTERM torchrun forwards the signal to its workers and kills them this many seconds later:
# long enough for Megatron to finish the step and write a checkpoint (--exit-signal-handler),
# and shorter than the job's --signal lead time (300 s), so the job still ends by itself.
# (Older torchrun versions ignore the variable and wait 30 s: raise the lead time there.)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"

in_slurm() { [[ -n "${SLURM_JOB_ID:-}" ]]; }

# Task 0 of the job (the batch shell is task 0), or the launching shell outside Slurm.
is_rank_zero() { [[ "${SLURM_PROCID:-0}" == 0 ]]; }

log() {
    if is_rank_zero; then
        printf '[%s] %s\n' "$(date '+%F %T')" "$*" >&2
    fi
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The words of a whitespace-separated list of paths into the array named $1, each word with a
# glob character (*, ?, [) replaced by the paths it matches, sorted:
#   expand_paths inputs "traces/part-*.jsonl extra.parquet"
# A pattern that matches nothing is an error (a typo must not silently drop inputs).
expand_paths() {
    local -n _expand_paths_into="$1"
    local _words=() _word _matches=()
    read -r -a _words <<<"${2:-}"
    _expand_paths_into=()
    for _word in "${_words[@]}"; do
        if [[ "${_word}" == *[*?[]* ]]; then
            mapfile -t _matches < <(compgen -G "${_word}" | sort)
            [[ ${#_matches[@]} -gt 0 ]] || die "no file matches ${_word}"
            _expand_paths_into+=("${_matches[@]}")
        else
            _expand_paths_into+=("${_word}")
        fi
    done
}

# Print the command (shell-quoted, copy-pastable); run it unless DRY_RUN=1.
run_or_print() {
    printf '%q ' "$@"
    printf '\n'
    if [[ "${DRY_RUN}" != 1 ]]; then
        "$@"
    fi
}

# Rendezvous of a multi-node job: the first node of the allocation, and a port derived from the
# job id, so that two jobs sharing a node do not collide and every node computes the same value.
set_rendezvous() {
    if in_slurm; then
        MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
        MASTER_PORT="$((10000 + SLURM_JOB_ID % 50000))"
    else # a dry run prints the Slurm command with these stand-ins
        MASTER_ADDR="${MASTER_ADDR:-FIRST_NODE}"
        MASTER_PORT="${MASTER_PORT:-29500}"
    fi
    export MASTER_ADDR MASTER_PORT
}

# `torchrun --nproc_per_node=GPUS_PER_NODE <args>` on each of NNODES nodes: through srun, one
# torchrun per node, inside an allocation; directly on this machine (one node) outside one.
launch_torchrun() {
    local torchrun=("${PYTHON}" -m torch.distributed.run --nproc_per_node="${GPUS_PER_NODE}")
    if ! in_slurm && [[ "${NNODES}" == 1 ]]; then
        run_or_print "${torchrun[@]}" --standalone "$@"
        return
    fi
    if ! in_slurm && [[ "${DRY_RUN}" != 1 ]]; then
        die "NNODES=${NNODES} needs a Slurm allocation (sbatch $0); NNODES=1 runs here"
    fi
    set_rendezvous
    # c10d rendezvous: the node ranks are agreed on at start-up, so one command fits every node.
    torchrun+=(--nnodes="${NNODES}" --rdzv_backend=c10d
        --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="${SLURM_JOB_ID:-JOB_ID}")
    local srun=(srun --nodes="${NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1)
    if [[ "${DRY_RUN}" == 1 ]]; then
        run_or_print "${srun[@]}" "${torchrun[@]}" "$@"
    else
        run_supervised "${srun[@]}" "${torchrun[@]}" "$@"
    fi
}

# ---- time limit, preemption, requeue ---------------------------------------------------------
# The job header asks Slurm for USR1 to this batch shell 300 s before the time limit
# (`#SBATCH --signal=B:USR1@300`). The trap below passes it on as SIGTERM to the job's steps
# (`scancel --signal` never signals the batch shell itself): torchrun forwards it to the
# workers, Megatron's --exit-signal-handler finishes the step, saves a checkpoint and exits.
# The batch shell then puts the job back in the queue (`#SBATCH --requeue`); the next run
# resumes from that checkpoint because --load is the --save dir.
STOP_REQUESTED=0
LAUNCH_PID=""

request_stop() {
    STOP_REQUESTED=1
    log "time limit in sight: asking the trainer to checkpoint and stop"
    scancel --signal=TERM "${SLURM_JOB_ID}"
}

# A SIGTERM to the batch shell (preemption, scancel) reached the job steps too; keep waiting so
# they can checkpoint instead of ending the job under them. Slurm requeues preempted jobs itself.
note_sigterm() {
    log "SIGTERM: waiting for the trainer to checkpoint and exit"
}

# Run the launch command in the background and wait for it: bash runs a trap only between
# commands, but interrupts `wait` for one, so the signals above are acted on at once.
run_supervised() {
    trap request_stop USR1
    trap note_sigterm TERM
    printf '%q ' "$@"
    printf '\n'
    "$@" &
    LAUNCH_PID=$!
    local status=0
    wait "${LAUNCH_PID}" || status=$?
    while kill -0 "${LAUNCH_PID}" 2>/dev/null; do # a trap interrupted `wait`; it still runs
        status=0
        wait "${LAUNCH_PID}" || status=$?
    done
    trap - USR1 TERM
    return "${status}"
}

# After the trainer exits: requeue the job when it was stopped for the time limit before
# TRAIN_ITERS; otherwise end with the trainer's exit status (a crash is not retried forever).
# The last checkpoint's iteration comes from Megatron's tracker file or, without one, from
# DeepSpeed's `latest` (the newest tag, iter_NNNNNNN: python -m megatron_dcod.train_hf).
finish_or_requeue() {
    local status="$1" save_dir="$2" train_iters="$3" done_iters=0 latest
    local tracker="${save_dir}/latest_checkpointed_iteration.txt"
    if [[ -f "${tracker}" ]]; then
        done_iters="$(<"${tracker}")"
    elif [[ -f "${save_dir}/latest" ]]; then
        latest="$(<"${save_dir}/latest")"
        done_iters="${latest}"
        if [[ "${latest}" =~ ^iter_0*([0-9]+)$ ]]; then
            done_iters="${BASH_REMATCH[1]}"
        fi
    fi
    if [[ "${STOP_REQUESTED}" == 1 && "${done_iters}" != "${train_iters}" ]]; then
        log "stopped at iteration ${done_iters} of ${train_iters}: requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
        return 0
    fi
    log "trainer exited with status ${status}; last checkpoint: iteration ${done_iters}"
    return "${status}"
}
