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

PYTHON="${PYTHON:-python3}"
asan="$("${CXX:-c++}" -print-file-name=libasan.so)"
if [ ! -f "$asan" ]; then
  echo "sanitize_emulated.sh: ${CXX:-c++} has no AddressSanitizer runtime (libasan.so)" >&2
  exit 2
fi
# Python itself does not link the C++ runtime; ASan must find __cxa_throw when it starts, or the
# first C++ exception (torch's errors, or triton's import) stops the process.
cxxrt="$("${CXX:-c++}" -print-file-name=libstdc++.so)"

# The extension itself is compiled (if it is not yet) outside the sanitizer: nvcc does not run
# under a preloaded ASan runtime.
"$PYTHON" -c "import torchcnn; torchcnn.load()"

export TORCHCNN_EMULATION_SANITIZE=1
# Python and torch keep memory until exit, by design: leaks are not what this run looks for.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
LD_PRELOAD="$asan $cxxrt" "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys -k emulated \
  tests/test_conv2d.py tests/test_max_pool2d.py tests/test_errors.py tests/test_layers.py tests/test_emulation.py \
  tests/test_memory_format.py tests/test_higher_order.py tests/test_func.py tests/test_autocast.py \
  tests/test_properties.py tests/test_ops.py \
  "$@"
