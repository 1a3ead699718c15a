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

}  // namespace

TORCHCNN_CUDA_KERNELS(m) {
  m.impl("relu", &relu_cuda);
}

}  // namespace torchcnn
