#!/usr/bin/env bash
# One script a GPU machine runs start to finish: the GPU-marked tests, then the GPU benchmark.
#   bench/gpu/run.sh [bench.py options]      e.g. bench/gpu/run.sh --models resnet50 --batches 8
# Needs a CUDA build of torch and `pip install -e '.[onnx,tensorrt]'` (onnxruntime-gpu for the ORT anchor).
# Writes bench/gpu/results.json; copy the printed table into bench/README.md with the GPU named.
set -euo pipefail
cd "$(dirname "$0")/../.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"bench/gpu/run.sh needs a CUDA GPU: torch {torch.__version__} sees none")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
try:
    import tensorrt
    print("TensorRT", tensorrt.__version__)
except ImportError:
    print("TensorRT not installed: the trt-* tests skip and the bench marks trt-* missing")
PY
python -m pytest -p no:cacheprovider -m gpu -q -rs tests/backends/test_gpu_run.py
python bench/gpu/bench.py --json bench/gpu/results.json "$@"
