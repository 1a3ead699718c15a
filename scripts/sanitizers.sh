# Sourced by sanitize_emulated.sh and sanitize_cpu.sh: finds the AddressSanitizer runtime a Python
# process must preload to load a sanitized library, and sets the sanitizers' options.
# Sets PYTHON (default: python3 from PATH) and PRELOAD; CXX picks the compiler whose runtime to use.
PYTHON="${PYTHON:-python3}"
asan="$("${CXX:-c++}" -print-file-name=libasan.so)"
if [ ! -f "$asan" ]; then
  echo "$(basename "$0"): ${CXX:-c++} has no AddressSanitizer runtime (libasan.so)" >&2
  exit 2
fi
# Python itself does not link the C++ runtime; ASan must find __cxa_throw when it starts, or the
# first C++ exception (torch's errors, or triton's import) stops the process.
PRELOAD="$asan $("${CXX:-c++}" -print-file-name=libstdc++.so)"
# Python and torch keep memory until exit, by design: leaks are not what these runs look for.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
