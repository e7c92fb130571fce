#!/usr/bin/env bash
# The GPU checks in one go, for a machine with an NVIDIA GPU (target: under 10 minutes):
#   1. parity: CUDA and TensorRT against the CPU and the PyTorch SafeSteer oracle (tests/test_gpu.py, tiny models,
#      every family with images too:
#      device-resident KV cache, TensorRT decode/prefill profiles and engine cache, fp16 export);
#   (GPU runs use --standard-ops artifacts: the default in-place GroupQueryAttention has no float32 CUDA kernel)
#   2. speed: the Generator on CUDA at fp32 / fp16 / int4, safety off / probe / lookahead, on Qwen2.5-Coder-0.5B
#      (or HF_DIR), 128 new tokens after 40- and 256-token prompts; the SafeSteer modes read against "off".
# Needs onnxruntime-gpu *instead of* onnxruntime (the two together lose the CUDA provider):
#   python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -e '.[gpu,export,dev]' torch==2.13.0
#   PY=.venv-gpu/bin/python bash bench/gpu_check.sh [HF_DIR]
# Logs and speed.json land in $OUT (default gpu-check/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF'
import onnxruntime as ort
have = ort.get_available_providers()
print("onnxruntime", ort.__version__, have)
if "CUDAExecutionProvider" not in have:
    raise SystemExit("no CUDAExecutionProvider: install safesteer[gpu] (onnxruntime-gpu) instead of safesteer[cpu] "
                     "and check the CUDA driver")
PYEOF

echo "== 1. parity (CUDA, TensorRT) =="
timeout 420 "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs 2>&1 | tee "$OUT/parity.log"

echo "== 2. speed on CUDA =="
HF=${1:-$("$PY" -c "from safesteer_checkpoints.packaged import QWEN25_CODER_05B, checkpoint; print(checkpoint(QWEN25_CODER_05B))")}
timeout 300 "$PY" bench/speed.py "$HF" --work "$OUT/work" --providers CUDAExecutionProvider --skip-genai \
    --skip-transformers --precisions fp32 fp16 int4 --blocks 0 --runs 2 --rounds 1 --json "$OUT/speed.json" \
    2>&1 | tee "$OUT/speed.log"
