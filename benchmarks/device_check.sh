#!/usr/bin/env bash
# The GPU checks of issue 17 in one call of the device tool (a session is lent an accelerator for
# minutes): a Llama-7B-shaped compression with blocks streamed to the GPU (`device_compression.py`)
# and the CUDA inference table (`inference.py`). Every result lands in $OUT; render them here with
#   python benchmarks/device_compression.py --render <files_at>/device_compression.json
#   python benchmarks/inference.py --rewrite <files_at>/inference-cuda-bfloat16.json
# Run from the repository root, e.g. with the device tool's run:  OUT=$OUT bash benchmarks/device_check.sh
# CHECK_DEVICE=cpu CHECK_QUICK=1 OUT=/tmp/x bash benchmarks/device_check.sh  checks the script on a CPU machine.
set -uo pipefail
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEVICE=${CHECK_DEVICE:-cuda}
if [ -n "${CHECK_QUICK:-}" ]; then
  SIZE=(--hidden 256 --blocks 2 --samples 8 --seq-len 128)
  INFER=(--hidden 256 --intermediate 704 --layers 2 --heads 4 --kv-heads 4 --batches 1 --seq-lens 64 --repeats 2
         --min-seconds 0.1 --ratios 0.4)
else
  SIZE=(--hidden 4096 --blocks 4 --samples 32 --seq-len 2048)
  INFER=(--hidden 4096 --intermediate 11008 --layers 4 --heads 32 --kv-heads 32 --vocab 32000)
fi
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers as t; print('torch', torch.__version__, 'cuda', torch.version.cuda,
             'transformers', t.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
timeout 420 "$PY" benchmarks/device_compression.py --device "$DEVICE" "${SIZE[@]}" \
  --out "$OUT/device_compression.json" 2>&1 | tee "$OUT/device_compression.log" || status=1
DTYPE=bfloat16
[ "$DEVICE" = cpu ] && DTYPE=float32
suffix=$([ "$DEVICE" = cpu ] || echo "-${DEVICE%%:*}")$([ "$DTYPE" = float32 ] || echo "-$DTYPE")
timeout 150 "$PY" benchmarks/inference.py --device "$DEVICE" --dtype "$DTYPE" "${INFER[@]}" --no-write \
  --out "$OUT/inference${suffix}.json" 2>&1 | tee "$OUT/inference.log" || status=1
exit $status
