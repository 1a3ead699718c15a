#!/usr/bin/env bash
# Compiles the C++ translation units of csrc/ (the CPU kernels and the autograd kernels; not the
# .cu files, nor the Python module's few lines) with another compiler against torch's headers: code that only one
# compiler or one CPU accepts fails here. CI runs it with aarch64-linux-gnu-g++ (ARM, cross) and
# clang++ (x86-64); the objects are checked, not linked.
#
#   scripts/compile_check.sh COMPILER [flags...]
#
# Environment: PYTHON (default: python3 from PATH), with the torch whose headers to use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
  echo "usage: scripts/compile_check.sh COMPILER [flags...]" >&2
  exit 2
fi
compiler="$1"
shift
if ! command -v "$compiler" > /dev/null; then
  echo "compile_check: compiler '$compiler' not found" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
torch_dir="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# -O1: the code generator runs (target attributes and intrinsics are checked there), at a fraction
# of -O3's time. -fopenmp-simd and not -fopenmp: the build without OpenMP (Apple's clang).
flags=(-std=c++20 -O1 -fPIC -fopenmp-simd -Wall -Werror -Icsrc -isystem "$torch_dir/include"
       -isystem "$torch_dir/include/torch/csrc/api/include" "$@")
# Not module.cpp: its Python.h is this machine's Python's, which another CPU's compiler cannot use.
sources=(csrc/autograd/*.cpp csrc/cpu/*.cpp csrc/cpu/algorithms/*.cpp)
echo "compile_check: ${#sources[@]} files with $compiler ($("$compiler" -dumpmachine))"
for src in "${sources[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do
    sleep 0.2
  done
  ( "$compiler" "${flags[@]}" -c "$src" -o "$out/$(echo "$src" | tr / _).o" || echo "$src" >> "$out/failed" ) &
done
wait
if [ -s "$out/failed" ]; then
  echo "compile_check: $compiler failed on:" >&2
  sed 's/^/  /' "$out/failed" >&2
  exit 1
fi
echo "compile_check: all ${#sources[@]} compiled"
