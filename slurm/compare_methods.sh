#!/bin/bash
# The method lab (tools/compare_methods.py) on a cluster: one job per run, each on one node,
# then a report job once they have all ended. This script only submits; it needs no GPU.
#
#   SPEC=lab.yaml OUT=runs/lab sbatch slurm/compare_methods.sh    # a short submitter job
#   SPEC=lab.yaml OUT=runs/lab bash slurm/compare_methods.sh      # or from a login node
#   ONLY="dcod.seed1 dcod.seed2" SPEC=lab.yaml OUT=runs/lab bash slurm/compare_methods.sh
#   DRY_RUN=1 SPEC=lab.yaml bash slurm/compare_methods.sh         # print the sbatch commands
#
# The runs are the spec's methods × seeds and `initial` (the student before training), as
# `--list-runs` prints them; each job runs `--only RUN --no-report` with training under torchrun
# on the node's GPUS_PER_NODE GPUs. The report job (`--report-only`) waits for all of them
# (afterany), so a failed run still gets a report and is marked failed there. Resubmitting after
# a partial run (a failure, a time limit, a preemption) is fine: the lab skips the stages that
# finished and training resumes from its last checkpoint, so finished runs end at once.
# SPEC and OUT are relative to the checkout's root; job logs go to OUT/slurm/.
#
#SBATCH --job-name=lab-submit
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=%x-%j.log

set -euo pipefail

# The checkout: this file's parent dir, or under sbatch (which runs a copy of this file from its
# spool dir) the dir the job was submitted from.
if [[ -z "${REPO_ROOT:-}" ]]; then
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -f "${REPO_ROOT}/slurm/common.sh" ]] || REPO_ROOT="${SLURM_SUBMIT_DIR:-${PWD}}"
fi
# The runs train with DeepSpeed ZeRO-3, which overlaps communication on several CUDA streams
# (slurm/train_hf_deepspeed.sh); the jobs inherit this environment (sbatch --export=ALL).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-8}"
# shellcheck source=slurm/common.sh
source "${REPO_ROOT}/slurm/common.sh"

: "${SPEC:=}"                   # the lab spec, JSON or YAML (docs/lab.md)
: "${OUT:=${REPO_ROOT}/runs/lab}"
: "${ONLY:=}"                   # submit only these run ids (default: every run of the spec)
: "${GPUS_PER_NODE:=8}"         # GPUs of a run's job: torchrun's --nproc_per_node
: "${CPUS_PER_TASK:=64}"
: "${MEM:=0}"                   # memory of a run's job; 0: all of the node's
: "${TIME:=24:00:00}"           # time limit of a run's job (training, evaluations, drift)
: "${REPORT_TIME:=01:00:00}"    # time limit of the report job (no GPU)
: "${PARTITION:=}"              # empty: the cluster's default
: "${ACCOUNT:=}"
: "${EXTRA_SBATCH_ARGS:=}"      # more sbatch options for every job, e.g. "--qos=high"

[[ -n "${SPEC}" ]] ||
    die "set SPEC to the lab spec: SPEC=lab.yaml OUT=runs/lab sbatch slurm/compare_methods.sh"
[[ -f "${SPEC}" ]] || die "SPEC=${SPEC}: no such file (relative paths: from ${REPO_ROOT})"

LAB=("${PYTHON}" tools/compare_methods.py --spec "${SPEC}" --out "${OUT}")
read -r -a only <<<"${ONLY}"
only_args=()
[[ -z "${ONLY}" ]] || only_args=(--only "${only[@]}")
# The runs, from the lab itself (this also checks the spec and its inputs): cheap, dry run too.
listing="$("${LAB[@]}" --list-runs "${only_args[@]}")" ||
    die "tools/compare_methods.py --list-runs failed on SPEC=${SPEC} (its error is above)"
mapfile -t runs <<<"${listing}"

read -r -a extra_sbatch_args <<<"${EXTRA_SBATCH_ARGS}"
SBATCH_ARGS=(--parsable --output="${OUT}/slurm/%x-%j.log" --open-mode=append)
[[ -z "${PARTITION}" ]] || SBATCH_ARGS+=(--partition="${PARTITION}")
[[ -z "${ACCOUNT}" ]] || SBATCH_ARGS+=(--account="${ACCOUNT}")
SBATCH_ARGS+=("${extra_sbatch_args[@]}")

if [[ "${DRY_RUN}" != 1 ]]; then
    mkdir -p "${OUT}/slurm" # Slurm does not create a log's dir
    # Under sbatch this shell holds the submitter job's SLURM_* variables; jobs submitted from
    # here would inherit them (sbatch --export=ALL) and srun there would read them as options.
    unset "${!SLURM_@}"
fi

# sbatch "$@" --wrap "<the command $WRAP, shell-quoted>": print it, and submit it unless
# DRY_RUN=1; the new job's id (a stand-in under DRY_RUN) is appended to job_ids.
job_ids=()
submit() {
    local wrap job_id
    printf -v wrap '%q ' "${WRAP[@]}"
    printf '%q ' sbatch "${SBATCH_ARGS[@]}" "$@" --wrap "${wrap% }"
    printf '\n'
    if [[ "${DRY_RUN}" == 1 ]]; then
        job_id="JOB_ID_$((${#job_ids[@]} + 1))"
    else
        job_id="$(sbatch "${SBATCH_ARGS[@]}" "$@" --wrap "${wrap% }")"
    fi
    job_ids+=("${job_id%%;*}") # --parsable prints ID or ID;CLUSTER
}

# --standalone: torchrun picks a free port on the node (two jobs may share one).
launcher="${PYTHON} -m torch.distributed.run --standalone --nproc_per_node ${GPUS_PER_NODE} -m"
log "lab ${SPEC}: ${#runs[@]} run job(s) of ${GPUS_PER_NODE} GPU(s), then a report → ${OUT}"
for run in "${runs[@]}"; do
    gpus="${GPUS_PER_NODE}"
    [[ "${run}" != initial ]] || gpus=1 # the student before training: evaluation only
    WRAP=(srun --ntasks=1 "${LAB[@]}" --only "${run}" --no-report --train-launcher "${launcher}")
    submit --job-name="lab-${run}" --nodes=1 --ntasks=1 --gpus-per-node="${gpus}" \
        --cpus-per-task="${CPUS_PER_TASK}" --mem="${MEM}" --time="${TIME}" --requeue
done
dependency="afterany$(printf ':%s' "${job_ids[@]}")"
WRAP=("${LAB[@]}" --report-only)
submit --job-name=lab-report --ntasks=1 --time="${REPORT_TIME}" --dependency="${dependency}"
log "report job ${job_ids[-1]}: ${OUT}/results.md once the runs have ended"
