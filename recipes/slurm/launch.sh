#!/usr/bin/env bash
# The job step of recipes/slurm/*.sbatch: one torchrun per node of the allocation, meeting at the first node.
#   recipes/slurm/launch.sh CONFIG [section.key=value ...]
# Reads SLURM_JOB_ID, SLURM_JOB_NODELIST and SLURM_NNODES from the allocation; RUN_DIR (the run folder:
# resumed when it holds a checkpoint, so a requeued job continues), GPUS_PER_NODE (default: all visible),
# MASTER_PORT (default 29500), PYTHON (default python) from the environment. DRY_RUN=1 prints the
# command instead of running it.
#
# Preemption (docs/reliability.md): the sbatch scripts ask slurm for SIGUSR1 (B:USR1@600) ten minutes before
# the time limit. This script passes it on to the trainer processes, which finish their step, save a
# checkpoint, write RUN_DIR/stopped_on_signal.json and exit 0; the script then requeues the job, and the
# requeued job resumes from that checkpoint. A run that finishes, fails or is cancelled is not requeued.
set -euo pipefail

config=${1:?usage: launch.sh CONFIG [section.key=value ...]}
shift
: "${SLURM_JOB_ID:?run inside a slurm allocation (sbatch or salloc)}" "${SLURM_JOB_NODELIST:?}" "${SLURM_NNODES:?}"
run_dir=${RUN_DIR:?set RUN_DIR to the run folder}
python=${PYTHON:-python}
gpus=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
((gpus > 0)) || { echo "launch.sh: no GPUs visible; set GPUS_PER_NODE" >&2; exit 2; }
master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MASTER_PORT:-29500}

resume=()
# A checkpoint: `latest`, or a step_* folder (complete: a run killed before its first `latest` has one).
if [[ -e "$run_dir/checkpoints/latest" ]] || compgen -G "$run_dir/checkpoints/step_*[0-9]" >/dev/null; then
  resume=(--resume)
fi
# c10d rendezvous on the first node: every node's torchrun agrees on ranks without a fixed node rank.
command=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$python" -m torch.distributed.run
  --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus" --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d
  --rdzv_endpoint "$master:$port" -m megapixel.cli train "$config" "train.run_dir=$run_dir"
  ${resume[@]+"${resume[@]}"} "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${command[*]}"
  exit 0
fi

on_warning() {
  echo "launch.sh: SIGUSR1 (time limit near): the trainers save at the end of their step and stop" >&2
  # The trainers are started by torchrun as `python -u -m megapixel.cli train ...`. torchrun itself is not
  # signalled: it would pass a signal on and then kill its workers 30 s later, perhaps in the middle of a save.
  srun --overlap --ntasks-per-node=1 pkill -USR1 -f -- "-u -m megapixel.cli train" || true
}
trap on_warning USR1
# In the background, so that the trap runs while the step is still going. The step's exit status goes through
# a file: when the step ends while the trap runs, bash's `wait` can report -1 instead of it.
status_file=$(mktemp)
trap 'rm -f "$status_file"' EXIT
{
  status=0
  "${command[@]}" || status=$?
  echo "$status" >"$status_file"
} &
step=$!
# `wait` returns early when a trapped signal arrives; wait again while the step runs.
while kill -0 "$step" 2>/dev/null; do
  wait "$step" || true
done
status=$(<"$status_file")

if ((status == 0)) && [[ -e "$run_dir/stopped_on_signal.json" ]]; then
  echo "launch.sh: the trainers saved and stopped on a signal: requeueing job $SLURM_JOB_ID to continue" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
