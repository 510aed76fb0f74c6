#!/bin/bash
# The GPU measurements as one run on a lent GPU: ViT-S/16 2x224 + 10x96 in bf16 against the torch reference (MFU
# and ratio_jax_over_torch), a larger batch, einsum attention, TF32 against TF32, where the time goes (profiler), and
# whether the loop waits for the input copy. About 8 minutes on an H100/H200. Run from the repository root.
#
# A GPU image without ml-collections gets it as a wheel in .whl/, downloaded on a machine with network access:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl ml-collections
# Then, on the GPU machine with .whl/ copied along, allowing 600 s (the runs' own limits add up to 590 s):
#   bash benchmarks/gpu_session.sh
# Each run's full output lands in $OUT (6 files); the table rows that matter are echoed.
# A CPU smoke test of the script itself: CONFIG=configs/vitt16.py B=8 B2=8 STEPS=1 REPEATS=1 OUT_DIM=4096 \
#   PREFETCH_BATCH=4 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_session}
CONFIG=${CONFIG:-configs/vits16.py}
B=${B:-128}
B2=${B2:-256}
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-3}
OUT_DIM=${OUT_DIM:-}
PREFETCH_BATCH=${PREFETCH_BATCH:-128}
STEP_TIMEOUT=${STEP_TIMEOUT:-110}  # per run; the headline (torch + profile) gets 60 s more
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi 2>&1 || true; "$PYTHON" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"; } \
    > "$OUT/device.txt" 2>&1
head -15 "$OUT/device.txt"

common=(--config="$CONFIG" --config.local_crops_number=10 --steps="$STEPS" --repeats="$REPEATS")
[ -n "$OUT_DIM" ] && common+=(--config.out_dim="$OUT_DIM")

bench() {  # name, timeout in seconds, then benchmarks.train_step arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" -m benchmarks.train_step "${common[@]}" "$@" > "$OUT/$name.txt" 2>&1
    echo "== $name (exit $?): $*"
    grep -E "^\| (device|compile|step \(median\)|images/s|peak memory|MFU|torch step \(median\)|torch images/s) |^ratio_jax_over_torch|^Traceback|Error" \
        "$OUT/$name.txt"
}

bf16=(--config.dtype=bfloat16 --config.attention=dot_product_attention)
bench headline $((STEP_TIMEOUT + 60)) "${bf16[@]}" --config.batch_size="$B" --compare_torch --profile_steps=3
grep -A 18 "^top traced ops" "$OUT/headline.txt"
bench batch2 "$STEP_TIMEOUT" "${bf16[@]}" --config.batch_size="$B2"
bench einsum "$STEP_TIMEOUT" --config.dtype=bfloat16 --config.attention=einsum --config.batch_size="$B"
bench tf32 "$STEP_TIMEOUT" --config.dtype=float32 --config.batch_size="$B" --compare_torch

timeout 90 "$PYTHON" benchmarks/device_prefetch.py --batch "$PREFETCH_BATCH" --step_ms 300 --steps 20 > "$OUT/prefetch.txt" 2>&1
echo "== device_prefetch (exit $?)"
cat "$OUT/prefetch.txt"
