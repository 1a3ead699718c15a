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

// The mask takes no gradient: the node's one output is A, and forward hands M back through
// `passes_out` as a plain tensor (common.h).
struct ReLU : public torch::autograd::Function<ReLU> {
  static constexpr bool is_traceable = true;  // common.h
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                at::Tensor* passes_out) {
    auto [output, passes] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return relu_op().call(input);
    }();
    ctx->save_for_backward({passes});
    *passes_out = passes;
    return {output};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto relu_backward =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("torchcnn::relu_backward");
    torch::autograd::variable_list result(2);  // one per argument of forward
    const at::Tensor& grad_output = grads[0];
    const at::Tensor passes = ctx->get_saved_variables()[0];
    result[0] = call_recorded_if(differentiated(grad_output), [&] { return relu_backward.call(grad_output, passes); });
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
  at::Tensor passes;
  auto outputs = ReLU::apply(input, &passes);
  return {outputs[0], passes};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, AutogradCPU, m) {
  m.impl("relu", TORCH_FN(relu_autograd));
}

TORCH_LIBRARY_IMPL(torchcnn, AutogradCUDA, m) {
  m.impl("relu", TORCH_FN(relu_autograd));
}

}  // namespace torchcnn::autograd
