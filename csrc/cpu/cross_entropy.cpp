// softmax + cross-entropy on the CPU, one op forward and one backward (the design notes' e and f):
// rows in parallel, each by cross_entropy_row.h (shared with CUDA), then the reduction. The
// forward keeps each row's log Σ exp, so the backward, ŷ − y scaled, is one more pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include "../cross_entropy_row.h"
#include "../shapes.h"

namespace torchcnn {
namespace {

// Rows per parallel task: ~16k logits each.
int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, 16384 / classes);
}

// The first invalid target, named (cross_entropy_row.h leaves the check to its callers).
void check_targets(const int64_t* target, const CrossEntropyGeometry& g, int64_t ignore_index) {
  for (int64_t i = 0; i < g.rows; ++i) {
    TORCH_CHECK_INDEX(is_valid_target(target[i], g.classes, ignore_index), "cross_entropy: target ", target[i],
                      " is out of bounds for ", g.classes, " classes (expected 0 ≤ target < ", g.classes,
                      ", or ignore_index=", ignore_index, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
  const auto g = cross_entropy_geometry("cross_entropy", input_, target_, weight_, reduction, label_smoothing);
  const auto operands = cross_entropy_operands(input_, target_, weight_);
  const at::Tensor &input = operands.input, &target = operands.target, &weight = operands.weight;
  auto losses = per_row(input, g.rows), lse = per_row(input, g.rows), weights = per_row(input, g.rows);
  check_targets(target.const_data_ptr<int64_t>(), g, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    acc_t* loss = losses.mutable_data_ptr<acc_t>();
    acc_t* l = lse.mutable_data_ptr<acc_t>();
    acc_t* tw = weights.mutable_data_ptr<acc_t>();
    const auto smoothing = static_cast<acc_t>(label_smoothing);
    at::parallel_for(0, g.rows, row_grain(g.classes), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        cross_entropy_row(z + i * g.classes, g.classes, t[i], w, ignore_index, smoothing, loss[i], l[i], tw[i]);
      }
    });
  });
  const auto total_weight = weights.sum();
  return {reduce_cross_entropy(losses, total_weight, g.reduction, input.scalar_type()), lse, total_weight};
}

at::Tensor cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input_, const at::Tensor& target_,
    const std::optional<at::Tensor>& weight_, const at::Tensor& log_sum_exp, const at::Tensor& total_weight,
    c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
  const auto g = cross_entropy_backward_geometry("cross_entropy_backward", grad_loss, input_, target_, weight_,
                                                 log_sum_exp, total_weight, reduction, label_smoothing);
  const auto operands = cross_entropy_operands(input_, target_, weight_);
  const at::Tensor &input = operands.input, &target = operands.target, &weight = operands.weight;
  const auto lse = log_sum_exp.contiguous();
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto scales = cross_entropy_scales(grad_loss, total_weight, g.reduction, g.rows, acc);
  auto grad_input = at::empty(input.sizes(), input.options());
  check_targets(target.const_data_ptr<int64_t>(), g, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::cross_entropy_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* l = lse.const_data_ptr<acc_t>();
    const acc_t* scale = scales.const_data_ptr<acc_t>();
    scalar_t* grad = grad_input.mutable_data_ptr<scalar_t>();
    const auto smoothing = static_cast<acc_t>(label_smoothing);
    at::parallel_for(0, g.rows, row_grain(g.classes), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        cross_entropy_backward_row(z + i * g.classes, g.classes, t[i], w, ignore_index, smoothing, l[i], scale[i],
                                   grad + i * g.classes);
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace torchcnn
