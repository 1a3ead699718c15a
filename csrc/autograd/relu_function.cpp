// The Autograd kernel of torchcnn::relu for CPU and CUDA tensors, in C++.
//
// ReLU is the cheapest op there is, so the Python Autograd kernel and its Function were most of
// its cost on small tensors (fwd + bwd ~57 µs against torch's ~23 µs; ~8 µs without a gradient
// against torch's ~1.3 µs). Here the same formula (torchcnn/_ops/relu.py) is a C++ node: it keeps
// only the mask M = (Z ≥ 0) and its backward is relu_backward(∂L/∂A, M), below autograd, or —
// when the backward is itself differentiated (create_graph, or a tangent to carry) — the op through
// autograd, whose Python kernel records it again. Forward-mode tangents and torch.func's transforms
// go to the Python kernel (common.h).
#include <torch/library.h>

#include "common.h"

namespace torchcnn::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<Outputs(const at::Tensor&)>& relu_op() {
  static const auto handle = find_op<Outputs(const at::Tensor&)>("torchcnn::relu");
  return handle;
}

struct ReLU : public torch::autograd::Function<ReLU> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input) {
    auto [output, passes] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return relu_op().call(input);
    }();
    ctx->save_for_backward({passes});
    // The mask takes no gradient: handed on detached (compiled autograd refuses
    // mark_non_differentiable in a C++ node), its gradient, always undefined, never materialised.
    ctx->set_materialize_grads(false);
    return {output, passes};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto relu_backward =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("torchcnn::relu_backward");
    torch::autograd::variable_list result(1);
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) {
      return result;
    }
    const at::Tensor passes = ctx->get_saved_variables()[0];
    if (at::GradMode::is_enabled() || has_tangent(grad_output)) {
      result[0] = relu_backward.call(grad_output, passes);  // recorded: differentiable again
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      result[0] = relu_backward.call(grad_output, passes);
    }
    return result;
  }
};

Outputs relu_autograd(c10::DispatchKeySet keys, const at::Tensor& input) {
  if (functorch_active() || has_tangent(input)) {
    return relu_op().redispatch(python_kernel_keys(keys), input);
  }
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return relu_op().redispatch(keys & c10::after_autograd_keyset, input);
  }
  auto outputs = ReLU::apply(input);
  return {outputs[0], outputs[1].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, AutogradCPU, m) {
  m.impl("relu", TORCH_FN(relu_autograd));
}

TORCH_LIBRARY_IMPL(torchcnn, AutogradCUDA, m) {
  m.impl("relu", TORCH_FN(relu_autograd));
}

}  // namespace torchcnn::autograd
