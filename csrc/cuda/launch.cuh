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
//   bmm_float(out, a, b, accumulate, tf32)    a float32 batched GEMM in cuBLAS, allowed TF32 on
//                                             tensor cores exactly when `tf32` | at::bmm, on inputs
//                                             rounded to TF32's 10-bit mantissa when `tf32`
//   KERNEL_CHECK_INDEX(cond, msg)             a device-side assert (no host synchronisation;
//                                             reported at the next one, as torch's own index checks) |
//                                             an IndexError with the message
// Nothing else in csrc/cuda may include a CUDA header or use <<<…>>>.
//
// Index arithmetic: a GPU divides 64-bit integers in software, so every kernel that divides takes
// its index type as a template parameter, int32_t wherever fits_int32 allows it (with_index_type).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

#include "../registration.h"
#include "../shapes.h"

#ifdef TORCHCNN_EMULATE_CUDA
#include "emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace torchcnn {
namespace TORCHCNN_CUDA_SHARED {

// Whether a kernel over window `g` (a convolution's or a pool's) may index in 32 bits: every count
// it indexes with (its tensors' sizes, the ends of its loops) and every row or column coordinate,
// padding included, is below 2^31, and 64-bit indices are not forced
// (torch.ops.torchcnn._cuda_force_64bit_indices, for the tests; conv2d_tiled.cu holds the knob).
bool fits_int32(const Window2d& g, std::initializer_list<int64_t> counts);

}  // namespace TORCHCNN_CUDA_SHARED

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

// float32 rounded to TF32 (8-bit exponent, 10-bit mantissa), to nearest, ties to even: about what
// a tensor core multiplies (a GPU's conversion may break ties away from zero, or truncate).
// Infinities and NaNs pass unchanged.
inline at::Tensor tf32_rounded(const at::Tensor& x) {
  const auto finite = x.isfinite();
  const auto bits = at::where(finite, x, 0.0f).contiguous().view(at::kInt);  // no overflow below
  const auto lowest_kept = bits.bitwise_right_shift(13).bitwise_and(1);
  const auto rounded = (bits + 0xFFF + lowest_kept).bitwise_and(~0x1FFF).view(at::kFloat);
  return at::where(finite, rounded, x);
}

inline void bmm_float(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate, bool tf32) {
  const auto ra = tf32 ? tf32_rounded(a) : a, rb = tf32 ? tf32_rounded(b) : b;
  if (accumulate) {
    out.baddbmm_(ra, rb);
  } else {
    at::bmm_out(out, ra, rb);
  }
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

// One operand of a row-major product as cuBLAS (column-major) sees it: the operation that turns
// the stored matrix into the operand's transpose, and the stored matrix's leading dimension.
struct BlasOperand {
  cublasOperation_t op;
  int ld;
};

// x (batch, rows, cols): rows of unit stride are x's transpose stored column-major (no op);
// columns of unit stride are x itself column-major (transposed by cuBLAS). `x` is made contiguous
// when it is neither (no caller's operand is: a stride-0 batch would be copied out in full).
inline BlasOperand blas_operand(at::Tensor& x) {
  const int64_t rows = x.size(1), cols = x.size(2);
  if (x.stride(2) != 1 && cols != 1 && x.stride(1) != 1 && rows != 1) {
    x = x.contiguous();
  }
  if (x.stride(2) == 1 || cols == 1) {
    return {CUBLAS_OP_N, static_cast<int>(rows == 1 ? std::max<int64_t>(cols, 1) : x.stride(1))};
  }
  return {CUBLAS_OP_T, static_cast<int>(cols == 1 ? std::max<int64_t>(rows, 1) : x.stride(2))};
}

// out (B, M, N) = a (B, M, K) · b (B, K, N) (+ out, when `accumulate`), all float32, out's rows of
// unit stride; a batch stride of 0 repeats an operand. cuBLAS computes outᵀ = bᵀ · aᵀ.
// TF32 follows `tf32` alone: torch's handle carries torch.backends.cuda.matmul's flag, so the
// math mode is set here for this call (torch sets it again each time it takes the handle).
inline void bmm_float(at::Tensor& out, const at::Tensor& a_, const at::Tensor& b_, bool accumulate, bool tf32) {
  auto a = a_, b = b_;
  const int64_t batch = out.size(0), m = out.size(1), n = out.size(2), k = a.size(2);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(out.stride(2) == 1 || n == 1, "bmm_float: the output's rows must be contiguous");
  TORCH_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax && batch <= kIntMax &&
                  std::max({a.stride(1), a.stride(2), b.stride(1), b.stride(2), out.stride(1)}) <= kIntMax,
              "conv2d: a GEMM of ", m, " × ", k, " × ", n, " is beyond cuBLAS's 32-bit sizes");
  if (batch == 0 || m == 0 || n == 0) {
    return;
  }
  const BlasOperand ob = blas_operand(b), oa = blas_operand(a);
  const int ldc = static_cast<int>(m == 1 ? std::max<int64_t>(n, 1) : out.stride(1));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, ob.op, oa.op, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha,
      b.const_data_ptr<float>(), CUDA_R_32F, ob.ld, b.stride(0), a.const_data_ptr<float>(), CUDA_R_32F, oa.ld,
      a.stride(0), &beta, out.mutable_data_ptr<float>(), CUDA_R_32F, ldc, out.stride(0), static_cast<int>(batch),
      tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#endif

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args&&... args) {
  launch_shared(kernel, blocks, threads, 0, std::forward<Args>(args)...);
}

// A 1-D grid of kThreads-thread blocks covering `total` work items with grid-stride loops: any size
// is covered by any grid (no 65535-block limit in y/z; the loop's index type by grid_fits_int32).
inline unsigned int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, max_blocks())));
}

// f(int32_t{}) when `int32`, else f(int64_t{}): the launch of a kernel templated on its index type,
// written once (`using index_t = decltype(i);` inside f).
template <typename F>
void with_index_type(bool int32, F&& f) {
  if (int32) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// fits_int32 for a kernel whose grid-stride loop runs over `total` items (its counter reaches total
// plus the grid's size) and whose tensors have `sizes` elements.
inline bool grid_fits_int32(const Window2d& g, int64_t total, std::initializer_list<int64_t> sizes) {
  return total + max_blocks() * kThreads <= std::numeric_limits<int32_t>::max() &&
      TORCHCNN_CUDA_SHARED::fits_int32(g, sizes);
}

// A grid-stride loop's first item and step, in its index type.
template <typename index_t = int64_t>
__device__ __forceinline__ index_t grid_start() {
  return static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
}

template <typename index_t = int64_t>
__device__ __forceinline__ index_t grid_step() {
  return static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
}

}  // namespace
}  // namespace torchcnn
