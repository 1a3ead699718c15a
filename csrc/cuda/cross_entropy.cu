// softmax + cross-entropy on CUDA, one op forward and one backward: one thread per row, each by
// cross_entropy_row.h (shared with the CPU), then the reduction by ATen on the current stream. An
// invalid target is a device-side check, never a read back to the host, so a training step does not
// wait for the GPU and a CUDA graph can capture it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include "../cross_entropy_row.h"
#include "../shapes.h"
#include "launch.cuh"

namespace torchcnn {
namespace {

// A string literal where it is used: a device-side assert takes its message from device code.
#define BAD_TARGET "cross_entropy: a target is out of bounds (expected 0 ≤ target < classes, or ignore_index)"

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void cross_entropy_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ target,
                                     const scalar_t* __restrict__ weight, acc_t* __restrict__ losses,
                                     acc_t* __restrict__ lse, acc_t* __restrict__ weights, int64_t rows,
                                     int64_t classes, int64_t ignore_index, acc_t smoothing) {
  for (int64_t i = grid_start(); i < rows; i += grid_step()) {
    KERNEL_CHECK_INDEX(is_valid_target(target[i], classes, ignore_index), BAD_TARGET);
    cross_entropy_row(z + i * classes, classes, target[i], weight, ignore_index, smoothing, losses[i], lse[i],
                      weights[i]);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void cross_entropy_backward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ target,
                                              const scalar_t* __restrict__ weight, const acc_t* __restrict__ lse,
                                              const acc_t* __restrict__ scale, scalar_t* __restrict__ grad,
                                              int64_t rows, int64_t classes, int64_t ignore_index, acc_t smoothing) {
  for (int64_t i = grid_start(); i < rows; i += grid_step()) {
    KERNEL_CHECK_INDEX(is_valid_target(target[i], classes, ignore_index), BAD_TARGET);
    cross_entropy_backward_row(z + i * classes, classes, target[i], weight, ignore_index, smoothing, lse[i], scale[i],
                               grad + i * classes);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cuda(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
  const auto g = cross_entropy_geometry("cross_entropy", input_, target_, weight_, reduction, label_smoothing);
  const DeviceGuard guard(input_.device());
  const auto operands = cross_entropy_operands(input_, target_, weight_);
  const at::Tensor &input = operands.input, &target = operands.target, &weight = operands.weight;
  auto losses = per_row(input, g.rows), lse = per_row(input, g.rows), weights = per_row(input, g.rows);
  if (g.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::cross_entropy_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(cross_entropy_kernel<scalar_t>, blocks_for(g.rows), kThreads, input.const_data_ptr<scalar_t>(),
             target.const_data_ptr<int64_t>(), weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr,
             losses.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), weights.mutable_data_ptr<acc_t>(),
             g.rows, g.classes, ignore_index, static_cast<acc_t>(label_smoothing));
    });
  }
  const auto total_weight = weights.sum();
  return {reduce_cross_entropy(losses, total_weight, g.reduction, input.scalar_type()), lse, total_weight};
}

at::Tensor cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input_, const at::Tensor& target_,
    const std::optional<at::Tensor>& weight_, const at::Tensor& log_sum_exp, const at::Tensor& total_weight,
    c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
  const auto g = cross_entropy_backward_geometry("cross_entropy_backward", grad_loss, input_, target_, weight_,
                                                 log_sum_exp, total_weight, reduction, label_smoothing);
  const DeviceGuard guard(input_.device());
  const auto operands = cross_entropy_operands(input_, target_, weight_);
  const at::Tensor &input = operands.input, &target = operands.target, &weight = operands.weight;
  const auto lse = log_sum_exp.contiguous();
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto scales = cross_entropy_scales(grad_loss, total_weight, g.reduction, g.rows, acc);
  auto grad_input = at::empty(input.sizes(), input.options());
  if (g.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "torchcnn::cross_entropy_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(cross_entropy_backward_kernel<scalar_t>, blocks_for(g.rows), kThreads, input.const_data_ptr<scalar_t>(),
             target.const_data_ptr<int64_t>(), weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr,
             lse.const_data_ptr<acc_t>(), scales.const_data_ptr<acc_t>(), grad_input.mutable_data_ptr<scalar_t>(),
             g.rows, g.classes, ignore_index, static_cast<acc_t>(label_smoothing));
    });
  }
  return grad_input;
}

}  // namespace

TORCHCNN_CUDA_KERNELS(m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

}  // namespace torchcnn
