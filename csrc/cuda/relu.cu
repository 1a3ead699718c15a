// The design notes' ReLU as an op of its own on CUDA (relu.cuh's kernel): A = relu(Z) and where its
// gradient passes, so the backward reads a byte per value instead of Z.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include "../shapes.h"
#include "launch.cuh"
#include "relu.cuh"

namespace torchcnn {
namespace {

std::tuple<at::Tensor, at::Tensor> relu_cuda(const at::Tensor& input_) {
  detail::check_floating("relu", "input", input_);
  const DeviceGuard guard(input_.device());
  // Dense tensors (channels_last included) are walked in memory order, outputs laid out alike.
  const auto input = input_.is_non_overlapping_and_dense() ? input_ : input_.contiguous();
  auto output = at::empty_like(input);
  auto passes = at::empty_like(input, input.options().dtype(at::kBool));
  const int64_t total = input.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::relu_cuda", [&] {
      launch(relu_kernel<scalar_t>, blocks_for(total), kThreads, input.const_data_ptr<scalar_t>(),
             output.mutable_data_ptr<scalar_t>(), passes.mutable_data_ptr<bool>(), total);
    });
  }
  return {output, passes};
}

// One thread per value: ∂L/∂Z = ∂L/∂A where the ReLU passes, else exactly 0.
template <typename scalar_t>
__global__ void relu_backward_kernel(const scalar_t* __restrict__ grad, const bool* __restrict__ passes,
                                     scalar_t* __restrict__ out, int64_t total) {
  for (int64_t t = grid_start(); t < total; t += grid_step()) {
    out[t] = passes[t] ? grad[t] : scalar_t(0);
  }
}

at::Tensor relu_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& passes_) {
  const auto layout = relu_backward_layout("relu_backward", grad_output_, passes_);
  const auto grad_output = layout.first, passes = layout.second;
  const DeviceGuard guard(grad_output.device());
  auto grad_input = at::empty_like(grad_output);
  const int64_t total = grad_output.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "torchcnn::relu_backward_cuda",
                                    [&] {
      launch(relu_backward_kernel<scalar_t>, blocks_for(total), kThreads, grad_output.const_data_ptr<scalar_t>(),
             passes.const_data_ptr<bool>(), grad_input.mutable_data_ptr<scalar_t>(), total);
    });
  }
  return grad_input;
}

}  // namespace

TORCHCNN_CUDA_KERNELS(m) {
  m.impl("relu", &relu_cuda);
  m.impl("relu_backward", &relu_backward_cuda);
}

}  // namespace torchcnn
