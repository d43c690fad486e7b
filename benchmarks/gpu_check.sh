#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one device call (../shared/gpu/README.md): the Triton
# kernels against cuDNN/flash SDPA and torch's norms, then training steps against plain PyTorch (eager and
# compiled) and HF ImageGPT. Each part has its own time limit, so a slow one cannot take the others' time;
# the limits add up to 9 minutes. Results and logs go to $OUT (the device tool's folder) or ./gpu-results.
#
#   run: bash benchmarks/gpu_check.sh          (carry .device-wheels, made by ../shared/gpu/prepare.sh)
#
# Limits in seconds can be changed: ATTENTION_S, NORM_S, TRAIN_STEP_S; TRAIN_MODELS picks the train_step
# models (default s,l: the issue's two targets); PYTHON the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device here: run it on the GPU machine" >&2
    exit 2
fi
out=${OUT:-gpu-results}
mkdir -p "$out"
if [ -d .device-wheels ]; then
    # The GPU machine has no DeepSpeed or webdataset; their wheels travel with the checkout.
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
# The machine reports its arch as 9.0a, which DeepSpeed's op builder cannot parse.
export TORCH_CUDA_ARCH_LIST=9.0
unset TRITON_INTERPRET

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run it, keep its output, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    local how="exit $status"
    [ $status -eq 124 ] && how="stopped at the ${limit} s limit"
    echo "$name: $how after $((SECONDS - start)) s (log: $out/$name.log)"
}

cat "$out/device.txt"
part attention "${ATTENTION_S:-210}" "$python" -m benchmarks.attention --out "$out/attention.json"
part norm "${NORM_S:-60}" "$python" -m benchmarks.norm --out "$out/norm.json"
part train_step "${TRAIN_STEP_S:-270}" "$python" -m benchmarks.train_step --models "${TRAIN_MODELS:-s,l}" \
    --out "$out/train_step.json"
# The tables, for the device tool's output tail.
tail -n 30 "$out/attention.log" "$out/norm.log" "$out/train_step.log"
