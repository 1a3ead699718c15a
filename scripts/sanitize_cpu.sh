#!/usr/bin/env bash
# Memcheck of the CPU kernels: the CPU op tests once more, with csrc/cpu built (just in time, as
# torchcnn_C_cpu_sanitized, beside the normal build) under AddressSanitizer and
# UndefinedBehaviorSanitizer. An out-of-bounds read or write — the hand-vectorised GEMM, Winograd
# and depthwise code reads and writes whole vectors — or an integer overflow aborts the run with
# the sanitizer's report.
#
#   scripts/sanitize_cpu.sh [pytest arguments]
#
# Environment: PYTHON (default: python3 from PATH), CXX (the compiler whose ASan runtime to load).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/sanitizers.sh

export TORCHCNN_SANITIZE=1
# Built (if need be) under the preloaded runtime: the library must load into a sanitized process.
LD_PRELOAD="$PRELOAD" "$PYTHON" -c "import torchcnn; torchcnn.load()"
LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys -k "not emulated and not cuda" \
  tests/test_conv_strategies.py tests/test_conv2d.py tests/test_max_pool2d.py tests/test_ops.py \
  tests/test_properties.py tests/test_layers.py tests/test_memory_format.py tests/test_higher_order.py \
  tests/test_fused.py tests/test_cross_entropy.py tests/test_autograd_kernels.py \
  "$@"
