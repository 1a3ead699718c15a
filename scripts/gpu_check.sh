#!/usr/bin/env bash
# The GPU verification run: on a machine with a CUDA GPU and torch installed (no network needed),
#   1. builds the extension from this checkout (CUDA kernels for the GPU present),
#   2. runs the whole test suite (every op test runs on CUDA too),
#   3. benchmarks the ops against cuDNN (MNIST shapes and the fused conv–ReLU–pool, then
#      bench_conv.py's ResNet/depthwise table) and a training step of the MNIST model (fused and not)
#      against torch.nn,
#   4. with the MNIST files: the time to 99 % test accuracy (--recipe fast) for both backends, and
#      one epoch of `train.py --device cuda`, without and with --cuda-graphs,
#   5. with --sanitize, runs the CUDA op tests under compute-sanitizer (memcheck and racecheck),
# and prints a summary table last (also written to $OUT_DIR/summary.md).
#
#   scripts/gpu_check.sh [--sanitize | --sanitize-only]
#
# Without --sanitize it takes a few minutes on an H100; --sanitize-only builds and runs only step 5
# (for machines that limit one command's time).
# Environment: OUT_DIR (default gpu_check/), TORCH_CUDA_ARCH_LIST (default: this GPU's arch only;
# CI compiles all of 8.0, 8.6, 8.9 and 9.0), TORCHCNN_DATA_DIR (MNIST; default ./data).
set -uo pipefail
cd "$(dirname "$0")/.."

sanitize=0
main=1
for arg in "$@"; do
  case "$arg" in
    --sanitize) sanitize=1 ;;
    --sanitize-only) sanitize=1; main=0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
OUT_DIR="${OUT_DIR:-gpu_check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
summary=()
status=0
note() { summary+=("$1|$2"); }
stage() { echo; echo "== $*"; }
print_summary() {
  echo
  echo "== summary"
  {
    echo "| check | result |"
    echo "|---|---|"
    for row in "${summary[@]}"; do echo "| ${row%%|*} | ${row#*|} |"; done
  } | tee "$OUT_DIR/summary.md"
}

# Wheels carried to a machine without network (the device tool's way): installed into a folder of
# their own, used for this run only.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT_DIR/site" \
    .whl/*.whl && export PYTHONPATH="$OUT_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: $PYTHON cannot import torch (set PYTHON to the interpreter that has it)" >&2
  exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA GPU here" >&2
  exit 2
fi
# The suite needs these besides torch (torch.library.opcheck imports expecttest); say which are missing.
missing=$("$PYTHON" - <<'EOF'
import importlib.util
names = {"pytest": "pytest", "expecttest": "expecttest", "hypothesis": "hypothesis", "torchvision": "torchvision",
         "tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "pillow", "numpy": "numpy", "ninja": "ninja"}
print(" ".join(pip for mod, pip in names.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check.sh: missing Python packages: $missing (pip install them, or carry their wheels in .whl/);" \
       "the tests that need them are skipped" >&2
fi
device=$("$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}')")
versions=$("$PYTHON" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}')")
note "device" "$device ($versions)"
[ -z "$missing" ] || note "missing packages" "$missing: the tests that need them are skipped"

stage "build (just in time, from this checkout)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
export TORCH_EXTENSIONS_DIR="$OUT_DIR/torch_extensions"
export TORCHCNN_JIT=1
start=$SECONDS
if "$PYTHON" -c "import torchcnn, sys; ext = torchcnn.load(); print('CUDA kernels:', ext.with_cuda); sys.exit(0 if ext.with_cuda else 1)" \
    2>&1 | tee "$OUT_DIR/build.log"; then
  note "build" "ok, arch $TORCH_CUDA_ARCH_LIST, $((SECONDS - start)) s"
else
  note "build" "FAILED (see $OUT_DIR/build.log)"
  print_summary
  exit 1
fi

if [ -z "${TORCHCNN_DATA_DIR:-}" ] && [ -d data ]; then
  TORCHCNN_DATA_DIR="$(cd data && pwd)"
  export TORCHCNN_DATA_DIR
fi

if [ "$main" -eq 1 ]; then
stage "tests (the whole suite; CUDA cases included)"
start=$SECONDS
"$PYTHON" -m pytest -q -rfEs --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
counts=$("$PYTHON" - "$OUT_DIR/tests.xml" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
def outcome(case):
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"
def count(selected):
    outcomes = [outcome(c) for c in selected]
    return {k: outcomes.count(k) for k in ("passed", "failure", "error", "skipped")}
every = count(cases)
cuda = count([c for c in cases if re.search(r"[\[-]cuda[-\]]", c.get("name", ""))
              or c.get("classname", "").endswith("test_cuda")])
print(f"{every['passed']} passed, {every['failure']} failed, {every['error']} errors, {every['skipped']} skipped "
      f"(CUDA cases: {cuda['passed']} passed, {cuda['failure'] + cuda['error']} failed, {cuda['skipped']} skipped)")
EOF
)
note "tests" "$counts; rc $tests_rc, $((SECONDS - start)) s"
[ "$tests_rc" -eq 0 ] || status=1

stage "op benchmarks vs cuDNN (float32, TF32 off for both)"
if "$PYTHON" benchmarks/bench_ops.py --device cuda --min-run-time 0.5 --json "$OUT_DIR/bench_ops.json" \
    2>&1 | tee "$OUT_DIR/bench_ops.log"; then
  note "ops vs cuDNN" "$("$PYTHON" - "$OUT_DIR/bench_ops.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ratios = [r[f"torchcnn_{p}"] / r[f"torch_{p}"] for r in d["rows"] for p in ("fwd", "bwd")]
over = sum(x > 2 for x in ratios)
print(f"ratios {min(ratios):.2f}x..{max(ratios):.2f}x, {over} of {len(ratios)} over 2x (target <= 2x)")
EOF
)"
else
  note "ops vs cuDNN" "FAILED (see $OUT_DIR/bench_ops.log)"; status=1
fi

stage "conv2d on ResNet/depthwise/MNIST shapes vs cuDNN (and a ResNet-18 step where torchvision is found)"
resnet_flag=$("$PYTHON" -c "import torchvision" 2>/dev/null || echo --skip-resnet)
if "$PYTHON" benchmarks/bench_conv.py --device cuda --min-run-time 1 --rounds 3 $resnet_flag \
    --json "$OUT_DIR/bench_conv.json" 2>&1 | tee "$OUT_DIR/bench_conv.log"; then
  note "conv2d vs cuDNN" "$("$PYTHON" - "$OUT_DIR/bench_conv.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
step = f", ResNet-18 step {d['resnet18_step']:.2f}x" if "resnet18_step" in d else ""
print(f"geometric mean {d['geomean']:.2f}x, worst {d['worst']:.2f}x{step} (table in bench_conv.log)")
EOF
)"
else
  note "conv2d vs cuDNN" "FAILED (see $OUT_DIR/bench_conv.log)"; status=1
fi

stage "MNIST training step: torchcnn layers vs torch.nn layers"
if "$PYTHON" benchmarks/bench_train_step.py --device cuda --min-run-time 0.5 --json "$OUT_DIR/bench_train_step.json" \
    2>&1 | tee "$OUT_DIR/bench_train_step.log"; then
  note "train step" "$("$PYTHON" - "$OUT_DIR/bench_train_step.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(", ".join(f"batch {r['batch']}: {r['torchcnn_ms']:.2f} ms vs {r['torch_ms']:.2f} ms "
                f"({r['ratio']:.2f}x; --no-fuse {r['unfused_ratio']:.2f}x; CUDA graph "
                f"{r['torchcnn_graph_ms']:.2f} vs {r['torch_graph_ms']:.2f} ms, {r['graph_ratio']:.2f}x)"
                for r in d["rows"]))
EOF
)"
else
  note "train step" "FAILED (see $OUT_DIR/bench_train_step.log)"; status=1
fi

stage "time to 99 % test accuracy, --recipe fast, steps from CUDA graphs: torchcnn vs torch"
if "$PYTHON" -c "import sys; from torchcnn.mnist import data; sys.exit(0 if data.find_files(data.default_data_dir()) else 1)"; then
  for backend in torchcnn torch; do
    "$PYTHON" benchmarks/time_to_accuracy.py --device cuda --backend "$backend" --cuda-graphs \
      --json "$OUT_DIR/tta_$backend.json" 2>&1 | tee "$OUT_DIR/tta_$backend.log"
  done
  note "time to 99%" "$("$PYTHON" - "$OUT_DIR" <<'EOF'
import json, os, sys
parts = []
for backend in ("torchcnn", "torch"):
    path = os.path.join(sys.argv[1], f"tta_{backend}.json")
    if not os.path.exists(path):
        parts.append(f"{backend}: FAILED"); continue
    d = json.load(open(path))
    parts.append(f"{backend}: {d['seconds_to_target']:.1f} s" if d["reached"] else
                 f"{backend}: not reached ({d['test_accuracy']:.2%} in {d['training_seconds']:.1f} s)")
print(", ".join(parts))
EOF
)"
else
  note "time to 99%" "skipped: no MNIST files (set TORCHCNN_DATA_DIR)"
fi

stage "train.py --device cuda --epochs 1"
if "$PYTHON" -c "import sys; from torchcnn.mnist import data; sys.exit(0 if data.find_files(data.default_data_dir()) else 1)"; then
  if "$PYTHON" train.py --device cuda --epochs 1 --no-download --quiet --out "$OUT_DIR/train_run" \
      2>&1 | tee "$OUT_DIR/train.log"; then
    note "train.py cuda" "$("$PYTHON" -c "
import json; m = json.load(open('$OUT_DIR/train_run/metrics.json'))
print(f\"1 epoch: test accuracy {m['test_accuracy']:.2%}, {m['train_seconds']:.1f} s, {m['images_per_second']:,.0f} img/s\")")"
  else
    note "train.py cuda" "FAILED (see $OUT_DIR/train.log)"; status=1
  fi
  if "$PYTHON" train.py --device cuda --epochs 1 --cuda-graphs --no-download --quiet --out "$OUT_DIR/train_graphs" \
      2>&1 | tee "$OUT_DIR/train_graphs.log"; then
    note "train.py cuda --cuda-graphs" "$("$PYTHON" -c "
import json; m = json.load(open('$OUT_DIR/train_graphs/metrics.json'))
print(f\"1 epoch: test accuracy {m['test_accuracy']:.2%}, {m['train_seconds']:.1f} s, {m['images_per_second']:,.0f} img/s\")")"
  else
    note "train.py cuda --cuda-graphs" "FAILED (see $OUT_DIR/train_graphs.log)"; status=1
  fi
else
  note "train.py cuda" "skipped: no MNIST files (set TORCHCNN_DATA_DIR)"
fi
fi  # main

if [ "$sanitize" -eq 1 ]; then
  sanitizer="$(command -v compute-sanitizer || true)"
  for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -n "$sanitizer" ] || { [ -x "$candidate" ] && sanitizer="$candidate"; }
  done
  if [ -z "$sanitizer" ]; then
    note "compute-sanitizer" "not found"; status=1
  else
    # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
    for tool in memcheck racecheck; do
      stage "compute-sanitizer --tool $tool (CUDA op tests)"
      start=$SECONDS
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 99 \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_conv2d.py tests/test_max_pool2d.py \
        tests/test_fused.py tests/test_cross_entropy.py tests/test_layers.py tests/test_cuda_graph.py \
        -k "cuda and not emulated and not gradcheck" 2>&1 | tee "$OUT_DIR/sanitize_$tool.log"
      rc=${PIPESTATUS[0]}
      errors=$(grep -Eo "ERROR SUMMARY: [0-9]+ error" "$OUT_DIR/sanitize_$tool.log" | tail -1)
      note "$tool" "rc $rc, ${errors:-no summary}, $((SECONDS - start)) s"
      [ "$rc" -eq 0 ] || status=1
    done
  fi
fi

print_summary
exit $status
