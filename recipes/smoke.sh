#!/usr/bin/env bash
# Smoke test of a parallel layout: a tiny iGPT, 20 steps, on the built-in digits.
#   recipes/smoke.sh [--launcher torchrun|deepspeed] [--nproc N] [--out DIR] [section.key=value ...]
# CPU processes talk over gloo, GPUs over nccl (the trainer picks). Examples:
#   recipes/smoke.sh --nproc 2 parallel.tensor=2          # two tensor shards
#   recipes/smoke.sh --launcher deepspeed --nproc 2        # two data-parallel replicas, deepspeed launcher
# The digits' shards are made once in DIR/shards (default runs/smoke); each run trains into a new folder,
# DIR/run-LAUNCHER-N (the first free N), and says which.
set -euo pipefail

launcher=torchrun
nproc=2
out=runs/smoke
overrides=()
while (($#)); do
  case "$1" in
    --launcher) launcher=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
case "$launcher" in
  torchrun|deepspeed) ;;
  *) echo "smoke.sh: --launcher must be torchrun or deepspeed, got $launcher" >&2; exit 2 ;;
esac
python=${PYTHON:-python}
# torchrun sets this itself; the deepspeed launcher does not, and N processes x all cores oversubscribe a CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

shards="$out/shards"
if [[ ! -f "$shards/manifest.json" ]]; then
  # 8x8 digits over a 16-colour palette (the digits have 17 grey levels).
  "$python" -m megapixel.cli shards digits "$shards" --n-px 8 --palette-size 16 --shard-size 500
fi

# A new folder per run: a second smoke test never meets the first one's checkpoints.
mkdir -p "$out"
n=1
until mkdir "$out/run-$launcher-$n" 2>/dev/null; do
  [[ -e "$out/run-$launcher-$n" ]] || { echo "smoke.sh: cannot make a run folder in $out" >&2; exit 2; }
  n=$((n + 1))
done
run="$out/run-$launcher-$n"
echo "smoke.sh: training into $run"

args=(train tiny "model.n_px=8" "model.n_vocab=16" "model.n_head=4" "data.shards=$shards" "data.shuffle_buffer=100"
  "train.run_dir=$run" "train.steps=20" "train.batch_size=16" "train.warmup_steps=2"
  "train.log_every=5" "train.eval_every=10" "train.eval_batches=2" "train.save_every=10" "train.progress=false"
  ${overrides[@]+"${overrides[@]}"})

case "$launcher" in
  torchrun)
    exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m megapixel.cli "${args[@]}" ;;
  deepspeed)
    # --no_local_rank: the trainer reads LOCAL_RANK from the environment, not a --local_rank argument.
    exec "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --no_local_rank --module megapixel.cli "${args[@]}" ;;
esac
