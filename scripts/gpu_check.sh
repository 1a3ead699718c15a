#!/usr/bin/env bash
# The GPU verification run, made for one command of at most 10 minutes on a fresh machine (the
# device tool's): stages, the most valuable first, each within a time budget, each writing its
# result file to $OUT_DIR as soon as it ends, so that a run cut short still returns what it did.
#
#   1_build.txt     device and versions; the build, for this GPU's architecture only    240 s
#   2_ops.txt       every CUDA op test: torchcnn's kernels against torch's, on the GPU   150 s
#   3_train.txt     train.py --device cuda --epochs 1 (needs the MNIST files)            60 s
#   4_step.txt      the MNIST step against torch.nn (cuDNN, TF32 as torch defaults) at
#                   batch 64 and 256, eager and from CUDA graphs                         75 s
#   5_profile.txt   kernels per step and where the device time goes, both models         30 s
#   6_memcheck.txt  compute-sanitizer: racecheck of the tiled kernels' shared memory   30 s
#                   (only those kernels), then memcheck of the CUDA op tests (no graphs) 70 s
#   7_ops_bench.txt the MNIST-shape ops against cuDNN, and each conv forward on every
#                   CUDA route (tiled, im2col + cuBLAS, direct), if time is left         60 s
#   summary.md      one line per stage, rewritten after each
#
# A stage that runs out of its budget is stopped and says so; the whole run keeps within
# GPU_CHECK_SECONDS (default 570; a rehearsal's budgets are longer, below). Full logs go to $LOG_DIR (default /tmp/gpu_check_logs), the
# result files hold their tails. The MNIST files are read from $TORCHCNN_DATA_DIR, else ./data: on
# the device tool, copy them into data/ (git ignores it) and name it in `carry`:
#
#   mkdir -p data && cp ../shared/data/mnist/*.gz data/
#   run: OUT_DIR=$OUT bash scripts/gpu_check.sh        with carry ["data"], timeout_s 600
#
#   scripts/gpu_check.sh [--rehearse]
#
# --rehearse runs the same stages on a machine without a GPU, to time them and try the script:
# the build compiles the CUDA kernels for sm_90 all the same, the op tests run the CUDA kernels
# emulated on the CPU, training and the benchmarks run on the CPU, and compute-sanitizer is skipped.
# Environment: OUT_DIR (default gpu_check/), LOG_DIR, GPU_CHECK_SECONDS, PYTHON,
# TORCH_CUDA_ARCH_LIST (default: this GPU's architecture), TORCHCNN_DATA_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=0
for arg in "$@"; do
  case "$arg" in
    --rehearse) rehearse=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
OUT_DIR="${OUT_DIR:-gpu_check}"
LOG_DIR="${LOG_DIR:-/tmp/gpu_check_logs}"
# A second run on the same machine starts clean: no logs of the last (train.py refuses a used --out),
# and no build lock left by a build that a stage's timeout killed.
rm -rf "$LOG_DIR"
find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -path '*torchcnn*/lock' -delete 2>/dev/null
mkdir -p "$OUT_DIR" "$LOG_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONUNBUFFERED=1  # a stage killed at its budget keeps its log to the end
# A rehearsal's CPU runs everything slower (a 2-core VM builds the CUDA kernels in many minutes,
# a GPU machine's 16 cores in a few): its budgets are 3 times as long, its build's 5 times.
scale=1 build_budget=240 total=570
[ "$rehearse" -eq 0 ] || scale=3 build_budget=1200 total=2400
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-$total}))
device=cuda
[ "$rehearse" -eq 0 ] || device=cpu
summary=()
status=0

# One line of the summary, which is rewritten in full after every stage.
note() {
  summary+=("$1|$2")
  {
    echo "# gpu_check.sh$([ "$rehearse" -eq 0 ] || echo ' --rehearse (no GPU: a rehearsal)')"
    echo
    echo "| stage | result |"
    echo "|---|---|"
    for row in "${summary[@]}"; do echo "| ${row%%|*} | ${row#*|} |"; done
  } > "$OUT_DIR/summary.md"
}

# run_stage FILE NAME BUDGET COMMAND...: runs the command within min(BUDGET, time left), its output
# in $LOG_DIR/NAME.log; sets $rc (124: out of time) and $took.
run_stage() {
  local file=$1 name=$2 budget=$(($3 * scale))
  shift 3
  local left=$((deadline - SECONDS))
  [ "$budget" -le "$left" ] || budget=$left
  echo; echo "== $name (budget ${budget} s)"
  if [ "$budget" -lt 10 ]; then
    rc=125 took=0
    echo "skipped: the run's time is spent" > "$OUT_DIR/$file"
    return
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$budget" "$@" > "$LOG_DIR/$name.log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  tail -n 25 "$LOG_DIR/$name.log"
}

# finish FILE NAME HEADLINE: the stage's result file (headline, then its log's tail) and its
# summary line.
finish() {
  local file=$1 name=$2 headline=$3
  if [ "$rc" -eq 125 ]; then  # run_stage skipped it
    note "$name" "skipped: the run's time is spent"
    status=1
    return
  fi
  [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || headline="OUT OF TIME after ${took} s; $headline"
  { echo "$name: $headline"; echo "(rc $rc, ${took} s)"; echo; tail -n 80 "$LOG_DIR/$name.log" 2>/dev/null; } \
    > "$OUT_DIR/$file"
  note "$name" "$headline (${took} s)"
  [ "$rc" -eq 0 ] || status=1
}

# --- 1: device, versions, build ----------------------------------------------------------------
export TORCHCNN_JIT=1
if [ "$rehearse" -eq 1 ]; then
  export TORCHCNN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  about=$("$PYTHON" -c "import torch; print(f'no GPU (rehearsal); torch {torch.__version__}')" 2>/dev/null)
else
  about=$("$PYTHON" - <<'EOF' 2>&1 | tail -1
import torch
if not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA GPU here (--rehearse tries the script without one)")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
EOF
  ) || { echo "gpu_check.sh: $about" >&2; note "device" "$about"; exit 2; }
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
fi
note "device" "$about"
run_stage 1_build.txt build $((build_budget / scale)) "$PYTHON" -c "
import sys, torchcnn
ext = torchcnn.load()
print('loaded:', ext)
sys.exit(0 if ext.with_cuda else 1)"
finish 1_build.txt build "$([ "$rc" -eq 0 ] && echo "ok, arch $TORCH_CUDA_ARCH_LIST" || echo "FAILED")"
[ "$rc" -eq 0 ] || exit 1

if [ -z "${TORCHCNN_DATA_DIR:-}" ] && [ -d data ]; then
  TORCHCNN_DATA_DIR="$(cd data && pwd)"
  export TORCHCNN_DATA_DIR
fi
have_mnist=0
"$PYTHON" -c "import sys; from torchcnn.mnist import data; sys.exit(0 if data.find_files(data.default_data_dir()) else 1)" \
  2>/dev/null && have_mnist=1

# pytest's closing line ("3 failed, 120 passed, 4 skipped in 40.1s"); for a run its budget cut
# short, how far its progress got ("[ 812/2561]") and how many failed on the way.
pytest_result() {
  local line
  line=$(grep -E "(passed|failed|error|deselected|no tests ran)" "$LOG_DIR/$1.log" | grep -E " in [0-9.]+s" | tail -1 |
    sed 's/=//g; s/^ *//')
  if [ -z "$line" ]; then
    line="stopped at $(grep -Eo '\[ *[0-9]+/[0-9]+\]' "$LOG_DIR/$1.log" | tail -1), $(grep -E '^[.sFExX]+ +\[' \
      "$LOG_DIR/$1.log" | tr -cd 'FE' | wc -c) failed so far"
  fi
  echo "$line"
}

# --- 2: every CUDA op test ---------------------------------------------------------------------
# The kernels' own tests first; test_cuda.py last (a cold inductor compile, subprocesses, > 2^31 elements).
op_tests=(tests/test_conv2d.py tests/test_max_pool2d.py tests/test_fused.py tests/test_cuda_routes.py tests/test_cross_entropy.py
          tests/test_layers.py tests/test_ops.py tests/test_autograd_kernels.py tests/test_cuda_graph.py tests/test_cuda.py)
if [ "$rehearse" -eq 1 ]; then
  selection="emulated and not gradcheck"  # the CUDA kernels, emulated on the CPU
else
  selection="cuda and not emulated"
fi
run_stage 2_ops.txt ops 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rfE -o console_output_style=count \
  -k "$selection" "${op_tests[@]}"
finish 2_ops.txt ops "$(pytest_result ops)"

# --- 3: train.py, one epoch --------------------------------------------------------------------
if [ "$have_mnist" -eq 1 ]; then
  run_stage 3_train.txt train 60 "$PYTHON" train.py --device "$device" --epochs 1 --no-download --quiet --no-plots \
    --out "$LOG_DIR/train_run" $([ "$rehearse" -eq 0 ] || echo "--limit-train 6400")
  headline=$("$PYTHON" -c "
import json; m = json.load(open('$LOG_DIR/train_run/metrics.json'))
print(f\"1 epoch: test accuracy {m['test_accuracy']:.2%}, {m['train_seconds']:.1f} s, {m['images_per_second']:,.0f} img/s\")" \
    2>/dev/null || echo "FAILED")
  finish 3_train.txt train "$headline"
else
  echo "skipped: no MNIST files (data/ or TORCHCNN_DATA_DIR)" > "$OUT_DIR/3_train.txt"
  note train "skipped: no MNIST files (copy them into data/ and carry it)"
fi

# --- 4: the MNIST step against torch.nn --------------------------------------------------------
run_stage 4_step.txt step 75 "$PYTHON" benchmarks/bench_train_step.py --device "$device" --batch-sizes 64 256 \
  --min-run-time 0.3 --rounds 3 --tf32 torch --json "$LOG_DIR/step.json"
headline=$("$PYTHON" - "$LOG_DIR/step.json" <<'EOF' 2>/dev/null || echo "FAILED"
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("; ".join(f"{r['case'].split(' ')[0].rstrip(',')} b{r['batch']} {r['ratio']:.2f}x"
                + (f", graphed {r['graph_ratio']:.2f}x" if "graph_ratio" in r else "") for r in rows))
EOF
)
[ "$rc" -eq 0 ] || headline="$headline: $(grep -E 'Error|error:' "$LOG_DIR/step.log" | tail -1)"
finish 4_step.txt step "$headline"

# --- 5: kernel profile -------------------------------------------------------------------------
run_stage 5_profile.txt profile 30 "$PYTHON" scripts/gpu_profile.py --device "$device" --batch 256 --steps 5
headline=$(grep -E "^[a-z]+: MNIST step at batch" "$LOG_DIR/profile.log" | sed 's/:.*batch 256, / /' | paste -sd ';' -)
[ "$rc" -eq 0 ] || headline="$headline $(grep -E 'Error|error:' "$LOG_DIR/profile.log" | tail -1)"
finish 5_profile.txt profile "$headline"

# --- 6: compute-sanitizer memcheck -------------------------------------------------------------
sanitizer="$(command -v compute-sanitizer || true)"
for candidate in "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -n "$sanitizer" ] || { [ -x "$candidate" ] && sanitizer="$candidate"; }
done
if [ "$rehearse" -eq 1 ] || [ -z "$sanitizer" ]; then
  reason=$([ "$rehearse" -eq 1 ] && echo "a rehearsal has no GPU" || echo "compute-sanitizer not found")
  echo "skipped: $reason" > "$OUT_DIR/6_memcheck.txt"
  note memcheck "skipped: $reason"
else
  # racecheck: the shared-memory hazards of the tiled kernels, which the emulator's fibers cannot
  # show inside one barrier interval, on the 64-bit test's samples (no epilogue, ReLU, ReLU and pool,
  # ∂X, ∂W; both index types). Only those kernels are checked: cuBLAS's, cuDNN's and ATen's are not
  # ours to answer for.
  run_stage 6_memcheck.txt racecheck 30 "$sanitizer" --tool racecheck --kernel-name kns=conv2d_tiled \
    --error-exitcode 98 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_cuda_routes.py \
    -k "cuda and not emulated and the_tiled_kernels_with_64_bit"
  race_rc=$rc race_took=$took
  races=$(grep -Eo "RACECHECK SUMMARY: [0-9]+ hazards? displayed \([0-9]+ errors?, [0-9]+ warnings?\)" \
    "$LOG_DIR/racecheck.log" | tail -1)
  [ -n "$races" ] || races="no summary"
  [ "$race_rc" -ne 124 ] && [ "$race_rc" -ne 137 ] || races="OUT OF TIME after ${race_took} s, $races"
  # memcheck: without the caching allocator every tensor is an allocation of its own, so memcheck
  # sees an overrun; CUDA graphs are left out (they need the caching allocator).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage 6_memcheck.txt memcheck 70 "$sanitizer" --tool memcheck \
    --error-exitcode 99 "$PYTHON" -m pytest -q -x -p no:cacheprovider -o console_output_style=count \
    tests/test_conv2d.py tests/test_max_pool2d.py tests/test_fused.py tests/test_cross_entropy.py \
    tests/test_cuda_routes.py -k "cuda and not emulated and not gradcheck and not graph and not test_every_route"
  # A run cut short prints no summary: count the errors it reported on the way ("Program hit"
  # lines are CUDA API errors, which torch may raise on purpose: read them in the log).
  errors=$(grep -Eo "ERROR SUMMARY: [0-9]+ error" "$LOG_DIR/memcheck.log" | tail -1)
  [ -n "$errors" ] || errors="no summary, $(grep -c '^========= Invalid' "$LOG_DIR/memcheck.log") invalid accesses so far"
  finish 6_memcheck.txt memcheck "racecheck $races (${race_took} s); memcheck $errors; $(pytest_result memcheck)"
  { echo; echo "racecheck (rc $race_rc, ${race_took} s):"; tail -n 30 "$LOG_DIR/racecheck.log"; } >> "$OUT_DIR/6_memcheck.txt"
  [ "$race_rc" -eq 0 ] || status=1
fi

# --- 7: the ops against cuDNN, if time is left -------------------------------------------------
run_stage 7_ops_bench.txt ops_bench 60 "$PYTHON" benchmarks/bench_ops.py --device "$device" --batch-sizes 64 256 \
  --min-run-time 0.3 --rounds 3 $([ "$rehearse" -eq 1 ] || echo "--cuda-routes")
finish 7_ops_bench.txt ops_bench "$(grep -E "worst ratio" "$LOG_DIR/ops_bench.log" || echo "no result")"

echo; cat "$OUT_DIR/summary.md"
exit $status
