#!/usr/bin/env bash
# Sets megapixel up in a virtual environment (default .venv; VENV=path to choose another).
#   ./install.sh          the package and its command, `megapixel`
#   ./install.sh --test   the same plus the test tools (pytest, ruff)
# torch goes in first and is kept if the environment already has one (a cluster's CUDA build, say):
# asking pip for plain "torch" on a machine without it would pull a multi-GB CUDA build.
# DeepSpeed is built from its sdist against that torch, without build isolation.
set -euo pipefail
cd "$(dirname "$0")"
venv=${VENV:-.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)
"$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"$py" -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation deepspeed
"${pip[@]}" -e ".$extras"
echo "megapixel is installed in $venv: run $venv/bin/megapixel --help"
