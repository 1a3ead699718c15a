// What the C++ Autograd kernels (csrc/autograd/*.cpp) share: finding an op, and telling when a
// call must go to the op's Python Autograd kernel instead (torchcnn/_ops/registration.py).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

namespace torchcnn::autograd {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether a torch.func transform is active: torch._C._are_functorch_transforms_active().
inline bool functorch_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// Whether a forward-mode tangent rides on t (a C++ Function has no jvp: such calls go to Python).
inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

// Whether a backward is itself differentiated: create_graph, or a tangent riding on the gradient
// (forward-over-reverse). Then the ops it calls must go through autograd, which records them.
inline bool differentiated(const at::Tensor& grad_output) {
  return at::GradMode::is_enabled() || has_tangent(grad_output);
}

// Runs `call` through autograd when `recorded` (it is recorded, differentiable again), else below
// autograd: the two ways a backward calls an op.
template <typename Call>
auto call_recorded_if(bool recorded, Call&& call) {
  if (recorded) {
    return call();
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call();
}

// Outputs that take no gradient (relu's mask, max pooling's indices, the loss's log Σ exp) are not
// outputs of the C++ Function: its forward hands them back through a pointer argument, which
// Function::apply passes on untouched, so they leave as plain tensors, as torch's own indices do.
// (Returned by the node, each would cost a detach, and mark_non_differentiable, which compiled
// autograd refuses in a C++ node, would be the only other way to keep its gradient out.)

// Every node is_traceable: compiled autograd traces its backward into the graph instead of
// running it eagerly behind a graph break. A backward may read only what compiled autograd hands
// over: saved variables, saved_data, and its gradients (tracing reads the route knob's setting).

// The Python Autograd kernel is registered for the Autograd alias key, these C++ ones for
// AutogradCPU and AutogradCUDA, which take precedence; redispatching with AutogradOther, a key the
// alias covers and they do not, reaches the Python one.
inline c10::DispatchKeySet python_kernel_keys(c10::DispatchKeySet keys) {
  return c10::DispatchKeySet(c10::DispatchKey::AutogradOther) | (keys & c10::after_autograd_keyset);
}

}  // namespace torchcnn::autograd
