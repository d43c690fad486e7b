#!/usr/bin/env bash
# The job step of recipes/slurm/*.sbatch: one torchrun per node of the allocation, meeting at the first node.
#   recipes/slurm/launch.sh CONFIG [section.key=value ...]
# Reads SLURM_JOB_ID, SLURM_JOB_NODELIST and SLURM_NNODES from the allocation; RUN_DIR (the run folder:
# resumed when it holds a checkpoint, so a requeued job continues), GPUS_PER_NODE (default: all visible),
# MASTER_PORT (default 29500), PYTHON (default python) from the environment. DRY_RUN=1 prints the
# command instead of running it.
#
# Preemption: the sbatch scripts ask slurm for SIGUSR1 (B:USR1@600) ten minutes before the time limit.
# This script then requeues the job and passes SIGUSR1 on to the trainer processes; the requeued job
# resumes from the run's latest checkpoint. (Saving a checkpoint on that signal is the trainer's part.)
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
[[ -e "$run_dir/checkpoints/latest" ]] && resume=(--resume)
# c10d rendezvous on the first node: every node's torchrun agrees on ranks without a fixed node rank.
command=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$python" -m torch.distributed.run
  --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus" --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d
  --rdzv_endpoint "$master:$port" -m megapixel.cli train "$config" "train.run_dir=$run_dir"
  ${resume[@]+"${resume[@]}"} "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${command[*]}"
  exit 0
fi

on_preempt() {
  echo "launch.sh: SIGUSR1 (time limit near): requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  # The trainers are started by torchrun as `python -u -m megapixel.cli train ...`; torchrun itself is not.
  srun --overlap --ntasks-per-node=1 pkill -USR1 -f -- "-u -m megapixel.cli train" || true
}
trap on_preempt USR1
# In the background, so that the trap runs while the step is still going.
"${command[@]}" &
step=$!
# `wait` returns early when a trapped signal arrives; wait again for the step to end.
while ! wait "$step"; do
  kill -0 "$step" 2>/dev/null || break
done
