// The CUDA language for a plain C++ compiler, so that csrc/cuda/*.cu run on the CPU in the test
// suite (included by launch.cuh when TORCHCNN_EMULATE_CUDA is defined; never by nvcc).
//
// What it gives: the function qualifiers (__global__, __device__, __host__, __forceinline__), the
// built-in indices blockIdx/threadIdx/blockDim/gridDim (x only: every launch here is 1-D), and
// run_grid, which runs every thread of every block of a grid, one after the other, each to the
// end of the kernel. It runs them in a shuffled order — blocks and threads interleaved, a new
// order every launch — so a kernel whose result depends on which thread runs first, or on
// threads being launched in index order, gives wrong results here.
//
// What it deliberately lacks: threads run one at a time, so there is no block-level concurrency
// to emulate barriers with. __shared__ and __syncthreads() therefore stop the build with a message,
// and warp intrinsics (__shfl_*_sync, __ballot_sync, …) and atomics are left undefined: a kernel
// that needs them needs a faithful emulator first (one fiber per thread, as MCUDA and HIP-CPU do).
#pragma once

#ifdef __CUDACC__
#error "emulation.h is for plain C++ builds of csrc/cuda; nvcc has the real CUDA language"
#endif

#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ \
  static_assert(false, "csrc/cuda/emulation.h runs threads one at a time: __shared__ memory is not emulated");
#define __syncthreads() \
  static_assert(false, "csrc/cuda/emulation.h runs threads one at a time: __syncthreads() is not emulated")

// CUDA's dim3/uint3, reduced to what a 1-D launch needs.
struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// The built-in variables of the thread that is running (thread_local: two Python threads may run
// emulated kernels at once).
inline thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace torchcnn {
namespace emulation {

// A different, reproducible order for every launch in a process (splitmix64 of a launch counter).
inline uint64_t next_launch_seed() {
  static std::atomic<uint64_t> launches{0};
  uint64_t z = (launches.fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Runs kernel(args...) once for each of the blocks × threads (block, thread) pairs, in an order
// shuffled by Fisher–Yates (xorshift64 steps), with blockIdx/threadIdx/blockDim/gridDim set.
template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args&&... args) {
  const uint64_t total = uint64_t{blocks} * threads;
  std::vector<uint64_t> order(total);
  std::iota(order.begin(), order.end(), uint64_t{0});
  uint64_t state = next_launch_seed() | 1;
  for (uint64_t i = total; i > 1; --i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::swap(order[i - 1], order[state % i]);
  }
  gridDim = dim3{blocks, 1, 1};
  blockDim = dim3{threads, 1, 1};
  for (const uint64_t t : order) {
    blockIdx = dim3{static_cast<unsigned int>(t / threads), 0, 0};
    threadIdx = dim3{static_cast<unsigned int>(t % threads), 0, 0};
    kernel(args...);
  }
}

}  // namespace emulation
}  // namespace torchcnn
