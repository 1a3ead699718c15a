#!/usr/bin/env bash
# Memcheck without a GPU: the emulated CUDA op tests (csrc/cuda compiled as C++, see
# torchcnn/testing.py) once more, with that library built under AddressSanitizer and
# UndefinedBehaviorSanitizer. An out-of-bounds read or write, a misaligned vector load or an
# integer overflow in a kernel aborts the run with the sanitizer's report.
#
#   scripts/sanitize_emulated.sh [pytest arguments]
#
# Environment: PYTHON (default: python3 from PATH), CXX (the compiler whose ASan runtime to load).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/sanitizers.sh

# The extension itself is compiled (if it is not yet) outside the sanitizer: nvcc does not run
# under a preloaded ASan runtime.
"$PYTHON" -c "import torchcnn; torchcnn.load()"

export TORCHCNN_EMULATION_SANITIZE=1
LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys -k emulated \
  tests/test_conv2d.py tests/test_max_pool2d.py tests/test_errors.py tests/test_layers.py tests/test_emulation.py \
  tests/test_memory_format.py tests/test_higher_order.py tests/test_func.py tests/test_autocast.py \
  tests/test_properties.py tests/test_ops.py tests/test_fused.py tests/test_cross_entropy.py tests/test_cuda_routes.py \
  "$@"
