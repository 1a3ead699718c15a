// The CUDA emulator (csrc/cuda/emulation.h) on kernels written for it: what it must run as a GPU
// would, and the bugs it must report. Built without torch by tests/test_emulation.py; prints one
// line per check and exits non-zero if any failed.
#include "../../csrc/cuda/emulation.h"

#include <cmath>
#include <cstdio>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using torchcnn::emulation::run_grid;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok" : "FAILED", what.c_str());
  failures += ok ? 0 : 1;
}

template <typename T>
T* shared_memory() {
  return reinterpret_cast<T*>(torchcnn::emulation::Grid::shared());
}

// Each block reverses chunks of blockDim.x values through shared memory, in a grid-stride loop:
// right only if the barriers hold every thread until the whole chunk is in.
__global__ void reverse_chunks(const int* in, int* out, int chunks, bool with_barriers) {
  int* tile = shared_memory<int>();
  for (int chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int base = chunk * blockDim.x;
    tile[threadIdx.x] = in[base + threadIdx.x];
    if (with_barriers) {
      __syncthreads();
    }
    out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
    if (with_barriers) {
      __syncthreads();  // before the next chunk overwrites the tile
    }
  }
}

__global__ void record_order(int* order, int* next) {
  order[(*next)++] = blockIdx.x * blockDim.x + threadIdx.x;
}

__global__ void returns_early(int* out) {
  if (threadIdx.x == 3) {
    return;
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void diverges(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void reads_unwritten(float* out) {
  out[threadIdx.x] = shared_memory<float>()[threadIdx.x];
}

__global__ void throws(int* out) {
  if (blockIdx.x == 1 && threadIdx.x == 5) {
    throw std::out_of_range("thread 5 of block 1");
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::logic_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

int main() {
  const int threads = 32, blocks = 3, chunks = 7, n = threads * chunks;
  std::vector<int> in(n), out(n);
  for (int i = 0; i < n; ++i) {
    in[i] = i;
  }
  bool all_right = true;
  for (int launch = 0; launch < 20; ++launch) {
    run_grid(reverse_chunks, blocks, threads, threads * sizeof(int), in.data(), out.data(), chunks, true);
    for (int i = 0; i < n; ++i) {
      all_right &= out[i] == (i / threads) * threads + threads - 1 - i % threads;
    }
  }
  check(all_right, "barriers: shared-memory tiles reversed right in every launch");

  int wrong_launches = 0;
  for (int launch = 0; launch < 20; ++launch) {
    run_grid(reverse_chunks, blocks, threads, threads * sizeof(int), in.data(), out.data(), chunks, false);
    for (int i = 0; i < n; ++i) {
      if (out[i] != (i / threads) * threads + threads - 1 - i % threads) {
        ++wrong_launches;
        break;
      }
    }
  }
  check(wrong_launches > 0, "no barriers: a read before the write shows (" + std::to_string(wrong_launches) +
                                " of 20 launches wrong)");

  std::vector<int> first(blocks * threads), second(blocks * threads);
  int next = 0;
  run_grid(record_order, blocks, threads, 0, first.data(), &next);
  next = 0;
  run_grid(record_order, blocks, threads, 0, second.data(), &next);
  check(std::set<int>(first.begin(), first.end()).size() == first.size() && first != second,
        "every thread runs once, in a new order each launch");
  bool interleaved = false;
  for (int i = 0; i + 1 < threads && !interleaved; ++i) {
    interleaved = first[i] / threads != first[i + 1] / threads;
  }
  check(interleaved, "blocks interleave");

  std::string error = error_of([&] { run_grid(returns_early, 2, threads, 0, out.data()); });
  check(error.find("reached by 31 of the 32 threads") != std::string::npos &&
            error.find("the other 1 returned") != std::string::npos && error.find("selftest.cpp") != std::string::npos,
        "a barrier part of a block returned before: " + error);

  error = error_of([&] { run_grid(diverges, 1, threads, 0, out.data()); });
  check(error.find("two different __syncthreads()") != std::string::npos, "divergent barriers: " + error);

  std::vector<float> floats(threads, 0.0f);
  run_grid(reads_unwritten, 1, threads, threads * sizeof(float), floats.data());
  bool all_nan = true;
  for (const float f : floats) {
    all_nan &= std::isnan(f);
  }
  check(all_nan, "shared memory no thread wrote reads as NaN");

  bool caught = false;
  try {
    run_grid(throws, 2, threads, 0, out.data());
  } catch (const std::out_of_range& e) {
    caught = std::string(e.what()) == "thread 5 of block 1";
  }
  check(caught, "an exception in a kernel leaves the launch with its type");

  error = error_of([&] { run_grid(reads_unwritten, 1, threads, 48 * 1024 + 4, floats.data()); });
  check(error.find("at most 49152 bytes of shared memory") != std::string::npos, "too much shared memory: " + error);
  error = error_of([&] { run_grid(reads_unwritten, 1, 1025, 0, floats.data()); });
  check(error.find("1 to 1024 threads") != std::string::npos, "too many threads: " + error);

  // After all of that, the emulator still runs a grid right (its stacks reused).
  run_grid(reverse_chunks, blocks, threads, threads * sizeof(int), in.data(), out.data(), chunks, true);
  check(out[0] == threads - 1 && out[n - 1] == n - threads, "a launch after the failed ones");
  return failures == 0 ? 0 : 1;
}
