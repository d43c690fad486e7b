#!/usr/bin/env bash
# iGPT-XL (6.8B, 64x64) under the deepspeed launcher, laid out as recipes/igpt_xl.yaml says. Either line starts it:
#   recipes/igpt_xl.sh [--gpus N] [--hostfile FILE] [--dry-run] [--config YAML] [--resume] [section.key=value ...]
#   deepspeed [--num_gpus N] [--hostfile FILE] recipes/igpt_xl.sh [--dry-run] [--config YAML] [--resume] [...]
# One node: recipes/igpt_xl.sh --gpus 8, or deepspeed --num_gpus 8 recipes/igpt_xl.sh
# Several:  recipes/igpt_xl.sh --hostfile hosts.txt (lines "node1 slots=8"; run on the first node, which reaches
#           the others over passwordless ssh, the deepspeed launcher's way), or deepspeed --hostfile hosts.txt ...
# Overrides pass through to `megapixel train`. --dry-run prints the command instead of running it: the deepspeed
# line when run from a shell, each rank's `megapixel train` line under the launcher.
#
# This file is a bash script and a Python program at once. Run from a shell, bash starts the deepspeed launcher on
# this file; the launcher runs it with Python on every rank (adding --local_rank=N), and the Python part at the
# end trains. For bash the next line is the no-op `:`; for Python it opens a string that holds the bash part.
""":"
set -euo pipefail

gpus=8
hostfile=
dry=
rest=()
while (($#)); do
  case "$1" in
    --gpus) gpus=$2; shift 2 ;;
    --hostfile) hostfile=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) rest+=("$1"); shift ;;
  esac
done

launcher=(deepspeed)
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || { echo "igpt_xl.sh: no hostfile at $hostfile" >&2; exit 2; }
  launcher+=(--hostfile "$hostfile")
fi
command=("${launcher[@]}" --num_gpus "$gpus" "$0" ${rest[@]+"${rest[@]}"})
if [[ -n "$dry" ]]; then
  echo "${command[*]}"
  exit 0
fi
exec "${command[@]}"
":"""

# Python: one rank of `deepspeed ... recipes/igpt_xl.sh [options]`.
import shlex
import sys
from pathlib import Path

from megapixel.cli import main


def train_arguments(argv: list[str]) -> tuple[list[str], bool]:
    """`megapixel train` arguments from this file's options on a rank, and whether it is a dry run."""
    config, resume, dry, overrides = str(Path(__file__).resolve().parent / "igpt_xl.yaml"), [], False, []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--local_rank"):
            # The launcher's --local_rank=N: the trainer reads LOCAL_RANK from the environment.
            if arg == "--local_rank":
                next(args, None)
        elif arg == "--config":
            config = next(args, config)
        elif arg == "--resume":
            resume = ["--resume"]
        elif arg == "--dry-run":
            dry = True
        elif arg in ("--gpus", "--hostfile"):
            print(f"igpt_xl.sh: {arg} belongs to the deepspeed launcher's line (--num_gpus, --hostfile)", file=sys.stderr)
            sys.exit(2)
        else:
            overrides.append(arg)
    return ["train", config, *resume, *overrides], dry


if __name__ == "__main__":
    arguments, dry_run = train_arguments(sys.argv[1:])
    if dry_run:
        print(shlex.join(["megapixel", *arguments]))
        sys.exit(0)
    sys.exit(main(arguments))
