#!/usr/bin/env bash
# iGPT-XL (6.8B, 64x64) under the deepspeed launcher, laid out as recipes/igpt_xl.yaml says.
#   recipes/igpt_xl.sh [--gpus N] [--hostfile FILE] [--config YAML] [--resume] [--dry-run] [section.key=value ...]
# One node: recipes/igpt_xl.sh --gpus 8
# Several:  recipes/igpt_xl.sh --hostfile hosts.txt   (lines "node1 slots=8"; run on the first node, which
#           reaches the others over passwordless ssh, the deepspeed launcher's way)
# --dry-run prints the command instead of running it. Overrides pass through to `megapixel train`.
set -euo pipefail

gpus=8
hostfile=
config="$(dirname "$0")/igpt_xl.yaml"
resume=()
dry=
overrides=()
while (($#)); do
  case "$1" in
    --gpus) gpus=$2; shift 2 ;;
    --hostfile) hostfile=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --resume) resume=(--resume); shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

launcher=(deepspeed)
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || { echo "igpt_xl.sh: no hostfile at $hostfile" >&2; exit 2; }
  launcher+=(--hostfile "$hostfile")
fi
# --no_local_rank: the trainer reads LOCAL_RANK from the environment, not a --local_rank argument.
command=("${launcher[@]}" --num_gpus "$gpus" --no_local_rank --module megapixel.cli train "$config"
  ${resume[@]+"${resume[@]}"} ${overrides[@]+"${overrides[@]}"})
if [[ -n "$dry" ]]; then
  echo "${command[*]}"
else
  exec "${command[@]}"
fi
