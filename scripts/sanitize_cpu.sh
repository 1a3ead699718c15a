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

PYTHON="${PYTHON:-python3}"
asan="$("${CXX:-c++}" -print-file-name=libasan.so)"
if [ ! -f "$asan" ]; then
  echo "sanitize_cpu.sh: ${CXX:-c++} has no AddressSanitizer runtime (libasan.so)" >&2
  exit 2
fi
# Python itself does not link the C++ runtime; ASan must find __cxa_throw when it starts.
cxxrt="$("${CXX:-c++}" -print-file-name=libstdc++.so)"

export TORCHCNN_SANITIZE=1
# Python and torch keep memory until exit, by design: leaks are not what this run looks for.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
# Built (if need be) under the preloaded runtime: the library must load into a sanitized process.
LD_PRELOAD="$asan $cxxrt" "$PYTHON" -c "import torchcnn; torchcnn.load()"
LD_PRELOAD="$asan $cxxrt" "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys -k "not emulated and not cuda" \
  tests/test_conv_strategies.py tests/test_conv2d.py tests/test_max_pool2d.py tests/test_ops.py \
  tests/test_properties.py tests/test_layers.py tests/test_memory_format.py tests/test_higher_order.py \
  "$@"
