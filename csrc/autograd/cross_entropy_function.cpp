// The Autograd kernel of torchcnn::cross_entropy for CPU and CUDA tensors, in C++.
//
// The Python kernel (torchcnn/_ops/registration.py) cost more than the op: a 64×10 loss is a few
// microseconds of arithmetic, and the Python kernel and its Function added ~15 µs to the forward
// and ~40 µs to the backward of every training step.
// Here the same backward is a C++ node: cross_entropy_backward below autograd, or, when the
// backward is itself differentiated (create_graph, or a tangent to carry), the differentiable
// formula torchcnn::_cross_entropy_gradient, the Python one (torchcnn/_ops/cross_entropy.py).
//
// The Python kernel stays registered for the Autograd alias key and still serves what a C++
// Function cannot (common.h): forward-mode tangents (no jvp), torch.func's transforms, and a weight
// that asks for a gradient (which it refuses).
#include <torch/library.h>

#include <string>

#include "common.h"

namespace torchcnn::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ForwardSignature = Outputs(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 c10::string_view, int64_t, double);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                     c10::string_view, int64_t, double);
using GradientSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&, c10::string_view, int64_t,
                                     double);

const c10::TypedOperatorHandle<ForwardSignature>& cross_entropy_op() {
  static const auto handle = find_op<ForwardSignature>("torchcnn::cross_entropy");
  return handle;
}

struct CrossEntropy : public torch::autograd::Function<CrossEntropy> {
  static constexpr bool is_traceable = true;  // common.h
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                c10::string_view reduction, int64_t ignore_index,
                                                double label_smoothing, at::Tensor* log_sum_exp_out,
                                                at::Tensor* total_weight_out) {
    auto [loss, log_sum_exp, total_weight] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return cross_entropy_op().call(input, target, weight, reduction, ignore_index, label_smoothing);
    }();
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), log_sum_exp, total_weight});
    // log_sum_exp and total_weight take no gradient: handed back as plain tensors (common.h).
    *log_sum_exp_out = log_sum_exp;
    *total_weight_out = total_weight;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    return {loss};
  }

  // ∂L/∂input only: targets are indices, and a weight that asks for a gradient never gets here.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(8);  // one per argument of forward
    const at::Tensor& grad_loss = grads[0];
    if (!ctx->needs_input_grad(0)) {
      return result;
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &target = saved[1], &log_sum_exp = saved[3], &total_weight = saved[4];
    const std::optional<at::Tensor> weight =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    if (differentiated(grad_loss) || has_tangent(input)) {
      // create_graph, or tangents to carry (forward-over-reverse): a formula autograd can
      // differentiate again; the op below autograd would drop them.
      static const auto gradient = find_op<GradientSignature>("torchcnn::_cross_entropy_gradient");
      result[0] = gradient.call(grad_loss, input, target, weight, total_weight, reduction, ignore_index,
                                label_smoothing);
    } else {
      static const auto backward = find_op<BackwardSignature>("torchcnn::cross_entropy_backward");
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      result[0] = backward.call(grad_loss, input, target, weight, log_sum_exp, total_weight, reduction, ignore_index,
                                label_smoothing);
    }
    return result;
  }
};

Outputs cross_entropy_autograd(c10::DispatchKeySet keys, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, c10::string_view reduction,
                               int64_t ignore_index, double label_smoothing) {
  const at::Tensor no_weight;
  const at::Tensor& w = weight.has_value() ? *weight : no_weight;
  const auto below = keys & c10::after_autograd_keyset;
  const bool python_route = functorch_active() || has_tangent(input) ||
                            has_tangent(w) || (at::GradMode::is_enabled() && w.defined() && w.requires_grad());
  if (python_route) {
    return cross_entropy_op().redispatch(python_kernel_keys(keys), input, target, weight, reduction, ignore_index,
                                         label_smoothing);
  }
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return cross_entropy_op().redispatch(below, input, target, weight, reduction, ignore_index, label_smoothing);
  }
  at::Tensor log_sum_exp, total_weight;
  auto outputs = CrossEntropy::apply(input, target, weight, reduction, ignore_index, label_smoothing, &log_sum_exp,
                                     &total_weight);
  return {outputs[0], log_sum_exp, total_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, AutogradCPU, m) {
  m.impl("cross_entropy", TORCH_FN(cross_entropy_autograd));
}

TORCH_LIBRARY_IMPL(torchcnn, AutogradCUDA, m) {
  m.impl("cross_entropy", TORCH_FN(cross_entropy_autograd));
}

}  // namespace torchcnn::autograd
