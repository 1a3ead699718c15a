// Launch geometry shared by the CUDA kernels: a 1-D grid of 256-thread blocks, with grid-stride
// loops over int64 element indices, so any tensor size is covered by any grid (no 65535-block
// limit in y/z, no int32 overflow past 2^31 elements).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace torchcnn {

constexpr int kThreads = 256;

// Enough blocks to fill the device several times over; the grid-stride loop does the rest.
inline unsigned int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const int64_t cap = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace torchcnn
