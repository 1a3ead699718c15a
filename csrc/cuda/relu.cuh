// The design notes' ReLU over a dense buffer, for the CUDA ops that apply it (relu.cu, and
// conv2d_relu.cu in place on the convolution's output): one thread per value, A = relu(Z) and
// whether the gradient passes there (relu.h, shared with the CPU). `z` and `a` may be the same.
#pragma once

#include <ATen/OpMathType.h>

#include "../relu.h"
#include "launch.cuh"

namespace torchcnn {
namespace {

template <typename scalar_t>
__global__ void relu_kernel(const scalar_t* z, scalar_t* a, bool* __restrict__ passes, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = grid_start(); t < total; t += grid_step()) {
    const scalar_t value = z[t];
    const bool pass = relu_passes(static_cast<acc_t>(value));
    a[t] = pass ? value : scalar_t(0);
    passes[t] = pass;
  }
}

}  // namespace
}  // namespace torchcnn
