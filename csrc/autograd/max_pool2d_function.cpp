// The Autograd kernel of torchcnn::max_pool2d_with_indices for CPU and CUDA tensors, in C++.
//
// Pooling a small tensor takes the kernel a few microseconds; the Python kernel and its Function
// (torchcnn/_ops/max_pool2d.py) added ~7 µs to every call and ~70 µs to a forward and backward.
// Here the same formula is a C++ node: it keeps the input (for its shape) and the indices, and its
// backward routes ∂L/∂P to the argmax with max_pool2d_backward, below autograd, or — when the
// backward is itself differentiated — through autograd, whose Python kernel records it again.
// Forward-mode tangents and torch.func's transforms go to the Python kernel (common.h).
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace torchcnn::autograd {
namespace {

using at::IntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor>;
using Signature = Outputs(const at::Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool);

const c10::TypedOperatorHandle<Signature>& max_pool2d_op() {
  static const auto handle = find_op<Signature>("torchcnn::max_pool2d_with_indices");
  return handle;
}

// The indices take no gradient: the node's one output is the pooled tensor, and forward hands the
// indices back through `indices_out`, as a plain tensor (as torch's own max pool does).
struct MaxPool2d : public torch::autograd::Function<MaxPool2d> {
  static constexpr bool is_traceable = true;  // common.h
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, IntArrayRef kernel_size,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, bool ceil_mode,
                               at::Tensor* indices_out) {
    auto [output, indices] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode);
    }();
    *indices_out = indices;
    ctx->save_for_backward({input, indices});
    // One entry, [kernel_size, stride, padding, dilation, ceil_mode]: each costs a hash and an
    // allocation per call.
    ctx->saved_data["pool"] = std::vector<int64_t>{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                                                   padding[1], dilation[0], dilation[1], ceil_mode};
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, IntArrayRef,
                                         IntArrayRef, IntArrayRef, IntArrayRef, bool);
    static const auto max_pool2d_backward = find_op<BackwardSignature>("torchcnn::max_pool2d_backward");
    variable_list result(7);  // one per argument of forward
    const at::Tensor& grad_output = grads[0];
    if (!ctx->needs_input_grad(0)) {
      return result;
    }
    const auto saved = ctx->get_saved_variables();
    const auto p = ctx->saved_data["pool"].toIntVector();
    result[0] = call_recorded_if(differentiated(grad_output), [&] {
      return max_pool2d_backward.call(grad_output, saved[0], saved[1], {p[0], p[1]}, {p[2], p[3]}, {p[4], p[5]},
                                      {p[6], p[7]}, p[8] != 0);
    });
    return result;
  }
};

Outputs max_pool2d_autograd(c10::DispatchKeySet keys, const at::Tensor& input, IntArrayRef kernel_size,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  if (functorch_active() || has_tangent(input)) {
    return max_pool2d_op().redispatch(python_kernel_keys(keys), input, kernel_size, stride, padding, dilation,
                                      ceil_mode);
  }
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return max_pool2d_op().redispatch(keys & c10::after_autograd_keyset, input, kernel_size, stride, padding,
                                      dilation, ceil_mode);
  }
  at::Tensor indices;
  auto outputs = MaxPool2d::apply(input, kernel_size, stride, padding, dilation, ceil_mode, &indices);
  return {outputs[0], indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, AutogradCPU, m) {
  m.impl("max_pool2d_with_indices", TORCH_FN(max_pool2d_autograd));
}

TORCH_LIBRARY_IMPL(torchcnn, AutogradCUDA, m) {
  m.impl("max_pool2d_with_indices", TORCH_FN(max_pool2d_autograd));
}

}  // namespace torchcnn::autograd
