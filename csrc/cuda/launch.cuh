// The device runtime as the CUDA kernels see it: every kernel launch, and every call the host code
// makes to the CUDA runtime or to CUDA-only ATen functions, goes through this header.
//
// The same csrc/cuda sources are built two ways:
// - by nvcc, for the GPU (the extension's CUDA kernels, dispatch key CUDA);
// - by a plain C++ compiler with -DTORCHCNN_EMULATE_CUDA, for the CPU (the emulated-CUDA test
//   library, torchcnn.testing.emulated_cuda_ops()): emulation.h supplies the CUDA language
//   (__global__, blockIdx, …) and runs every block and thread of a grid on the calling thread.
//
// The seams, each with its GPU and its emulated form below:
//   launch(kernel, blocks, threads, args...)  the current stream + a launch check | the emulator
//   launch_shared(kernel, blocks, threads,    the same, with `bytes` of dynamic shared memory per
//                 bytes, args...)             block (at most 48 KiB) | a poisoned buffer per block
//   shared_memory<T>()                        the block's dynamic shared memory: `extern __shared__` |
//                                             the running block's buffer
//   max_blocks()                              32 per multiprocessor | 3, so grid-stride loops wrap
//   l2_cache_bytes()                          the device's L2 cache | 50 MB, an H100's
//   DeviceGuard                               c10::cuda::CUDAGuard | nothing to switch
//   bmm_out_dtype(out, a, b)                  at::bmm_out with out_dtype (CUDA only in ATen) |
//                                             at::bmm on inputs converted to out's dtype
//   KERNEL_CHECK_INDEX(cond, msg)             a device-side assert (no host synchronisation;
//                                             reported at the next one, as torch's own index checks) |
//                                             an IndexError with the message
// Nothing else in csrc/cuda may include a CUDA header or use <<<…>>>.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../registration.h"

#ifdef TORCHCNN_EMULATE_CUDA
#include "emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace torchcnn {
namespace {  // each library keeps its own copy: the real and the emulated ones differ

// Dynamic shared memory a block may have without opting in to more, on every GPU since Volta.
constexpr size_t kMaxSharedBytes = 48 * 1024;

#ifdef TORCHCNN_EMULATE_CUDA

// Small blocks and few of them, so that every grid-stride loop in the test sweeps wraps.
constexpr int kThreads = 32;
inline int64_t max_blocks() { return 3; }
inline int64_t l2_cache_bytes() { return int64_t{50} << 20; }

template <typename... Params, typename... Args>
void launch_shared(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, size_t shared_bytes,
                   Args&&... args) {
  emulation::run_grid(kernel, blocks, threads, shared_bytes, std::forward<Args>(args)...);
}

template <typename T>
T* shared_memory() {
  return reinterpret_cast<T*>(emulation::Grid::shared());
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

#define KERNEL_CHECK_INDEX(cond, msg) TORCH_CHECK_INDEX(cond, msg)

inline void bmm_out_dtype(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  // Products of half-type values are exact in float: the same sums as cuBLAS's float accumulator.
  out.copy_(at::bmm(a.to(out.scalar_type()), b.to(out.scalar_type())));
}

#else

constexpr int kThreads = 256;
// Enough blocks to fill the device several times over; the grid-stride loop does the rest.
inline int64_t max_blocks() {
  return int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 32;
}
inline int64_t l2_cache_bytes() {
  return std::max<int64_t>(at::cuda::getCurrentDeviceProperties()->l2CacheSize, int64_t{1} << 20);
}

template <typename... Params, typename... Args>
void launch_shared(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, size_t shared_bytes,
                   Args&&... args) {
  TORCH_INTERNAL_ASSERT(shared_bytes <= kMaxSharedBytes, "a launch asked for ", shared_bytes,
                        " bytes of shared memory per block");
  kernel<<<blocks, threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
__device__ __forceinline__ T* shared_memory() {
  extern __shared__ __align__(16) unsigned char block_shared_memory[];
  return reinterpret_cast<T*>(block_shared_memory);
}

using DeviceGuard = c10::cuda::CUDAGuard;

#define KERNEL_CHECK_INDEX(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)

inline void bmm_out_dtype(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::bmm_out(out, a, b, out.scalar_type());
}

#endif

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args&&... args) {
  launch_shared(kernel, blocks, threads, 0, std::forward<Args>(args)...);
}

// A 1-D grid of kThreads-thread blocks covering `total` work items with grid-stride loops over
// int64 indices: any size is covered by any grid (no 65535-block limit in y/z, no int32 overflow).
inline unsigned int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, max_blocks())));
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace
}  // namespace torchcnn
