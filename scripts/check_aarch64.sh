#!/usr/bin/env bash
# The CPU kernels on aarch64, from this x86-64 machine: builds torchcnn._C for aarch64 (Debian's
# cross compiler, against the aarch64 wheel of torch) and runs CPU op tests under qemu-user with an
# arm64 Python. Run it before landing anything that touches csrc/cpu.
#
#   scripts/check_aarch64.sh [test files]     (default: the conv, pool, fused and loss op tests)
#
# Everything it fetches comes from Debian's archive and PyPI and is kept under build/aarch64/
# (about 700 MB; delete it to start over). It adds arm64 to dpkg's foreign architectures (for
# `apt-get download`; nothing arm64 is installed into the system). torch 2.9.1 is the newest torch with aarch64 CPU wheels
# for Python 3.11. Needs root for apt-get the first time. Under qemu everything runs 10–50× slower
# than natively: op tests, not benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.9.1
work="$PWD/build/aarch64"
root="$work/root"        # the arm64 libraries and Python
site="$work/site"        # torch and the test dependencies, unpacked wheels
stage="$work/stage"      # torchcnn, its aarch64 _C and its tests, as the arm64 Python imports them
mkdir -p "$work"

step() { echo "== aarch64: $*"; }

if ! command -v qemu-aarch64 > /dev/null || ! command -v aarch64-linux-gnu-g++ > /dev/null; then
  step "installing qemu-user and g++-aarch64-linux-gnu"
  apt-get update -qq && apt-get install -y -qq qemu-user g++-aarch64-linux-gnu > /dev/null
fi

# The arm64 Python and the libraries it and torch load. apt cannot install python3.11:arm64 beside
# the x86-64 one; the packages are unpacked into a folder of their own instead.
if [ ! -f "$root/.done" ]; then
  step "arm64 Python and libraries into $root"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  apt-get update -qq
  rm -rf "$work/debs" "$root"
  mkdir -p "$work/debs" "$root"
  (cd "$work/debs" && apt-get download -qq \
    libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 libgomp1:arm64 python3.11-minimal:arm64 \
    libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libpython3.11-dev:arm64 python3.11-dev:arm64 \
    zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 \
    libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libuuid1:arm64 libcrypt1:arm64 libnsl2:arm64 \
    libtirpc3:arm64 libdb5.3:arm64 libreadline8:arm64)
  for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$root"
  done
  touch "$root/.done"
fi

# torch for aarch64 and what the tests import: pip will not install another platform's wheels, so
# each wheel (a zip) is unpacked into one folder.
wheels=("torch==$TORCH_VERSION" typing_extensions sympy mpmath filelock jinja2 markupsafe networkx fsspec numpy
        pytest pluggy iniconfig packaging pygments hypothesis attrs sortedcontainers expecttest)
if [ "$(cat "$site/.done" 2> /dev/null)" != "${wheels[*]}" ]; then
  step "torch $TORCH_VERSION (aarch64) and the test dependencies into $site"
  rm -rf "$work/wheels" "$site"
  mkdir -p "$work/wheels" "$site"
  python3 -m pip download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --platform any --python-version 3.11 --no-deps -d "$work/wheels" "${wheels[@]}"
  for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$site/"
  done
  echo "${wheels[*]}" > "$site/.done"
fi

python_include="$root/usr/include/python3.11"
torch_dir="$site/torch"
suffix=".cpython-311-aarch64-linux-gnu.so"

# The package and its tests, and torchcnn._C compiled for aarch64 as setup.py compiles it for this
# machine (the CPU kernels; no CUDA).
step "building torchcnn._C for aarch64"
rm -rf "$stage/torchcnn" "$stage/tests"
mkdir -p "$stage/obj"
cp -r torchcnn tests "$stage/"
rm -f "$stage"/torchcnn/_C*.so
sources=(csrc/module.cpp csrc/autograd/*.cpp csrc/cpu/*.cpp csrc/cpu/algorithms/*.cpp)
# The torch the library is built for, as _build.py's flags record it (csrc/module.cpp).
torch_tag="$(python3 -c "import runpy, sys; build = runpy.run_path('torchcnn/_build.py')
print(build['torch_build_tag'](runpy.run_path(sys.argv[1])['__version__']))" "$torch_dir/version.py")"
flags=(-std=c++20 -O3 -fPIC -fopenmp -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C
       "-DTORCHCNN_TORCH_BUILD=$torch_tag" -Icsrc
       -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
       -isystem "$python_include" -isystem "$root/usr/include/aarch64-linux-gnu/python3.11" -isystem "$root/usr/include")
objects=()
rm -f "$stage/obj/failed"
# Objects built with other flags or against another torch are built again.
if [ "$(cat "$stage/obj/stamp" 2> /dev/null)" != "$TORCH_VERSION ${flags[*]}" ]; then
  rm -f "$stage"/obj/*.o
  echo "$TORCH_VERSION ${flags[*]}" > "$stage/obj/stamp"
fi
for src in "${sources[@]}"; do
  obj="$stage/obj/$(echo "$src" | tr / _).o"
  objects+=("$obj")
  # Rebuilt when the source or any header of csrc is newer than the object.
  if [ -f "$obj" ] && [ -z "$(find csrc -newer "$obj" -type f -print -quit)" ]; then
    continue
  fi
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do
    sleep 0.2
  done
  ( aarch64-linux-gnu-g++ "${flags[@]}" -c "$src" -o "$obj" || { rm -f "$obj"; echo "$src" >> "$stage/obj/failed"; } ) &
done
wait
if [ -s "$stage/obj/failed" ]; then
  echo "check_aarch64: the aarch64 compiler failed on:" >&2
  sed 's/^/  /' "$stage/obj/failed" >&2
  exit 1
fi
aarch64-linux-gnu-g++ -shared -fopenmp "${objects[@]}" -o "$stage/torchcnn/_C$suffix" \
  -L"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib"

# qemu runs the arm64 loader with $root as the filesystem root for the libraries it looks up.
step "CPU op tests under qemu-aarch64 (torch $TORCH_VERSION)"
export QEMU_LD_PREFIX="$root"
run=(qemu-aarch64 -E "PYTHONPATH=$stage:$site" -E "HOME=$work" -E "TORCHCNN_JIT=0" "$root/usr/bin/python3.11")
cd "$stage"
"${run[@]}" -c "import torch, torchcnn; from torchcnn.testing import cpu_capability
print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability(), '| torchcnn', torchcnn.load(), 'at', cpu_capability())"
# Every op, forward and backward, against torch on aarch64; then the op tests.
"${run[@]}" tests/tier_check.py default
if [ $# -eq 0 ]; then
  set -- tests/test_conv2d.py tests/test_max_pool2d.py tests/test_fused.py tests/test_cross_entropy.py
fi
"${run[@]}" -m pytest -q -p no:cacheprovider -k "not emulated and not cuda" "$@"
