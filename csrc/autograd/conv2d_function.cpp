// The Autograd kernels of torchcnn::conv2d, conv2d_relu and conv2d_relu_max_pool2d for CPU and CUDA
// tensors, in C++.
//
// On small tensors the Python kernels and their Functions (torchcnn/_ops/conv2d.py) cost more than
// the convolution: ~10 µs a call without a gradient and ~100 µs for a forward and backward with
// one, where torch's own convolution of a 1×4×4 input takes ~5 and ~75 µs. Here the same formulas
// are C++ nodes. The backward runs the gradient ops below autograd or, when it is itself
// differentiated (create_graph, or a tangent riding on the gradient), calls them through autograd,
// whose Python kernels record them again. Forward-mode tangents and torch.func's transforms go to
// the Python kernels (common.h).
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <vector>

#include "../cpu/sparse_pieces.h"
#include "common.h"

namespace torchcnn::autograd {
namespace {

using at::IntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Mask = std::array<bool, 3>;  // which of (input, weight, bias) take a gradient

using Conv2dSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   IntArrayRef, IntArrayRef, IntArrayRef, int64_t);
using Conv2dReLUSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, IntArrayRef,
                                                               IntArrayRef, IntArrayRef, int64_t);
using Conv2dPoolSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, IntArrayRef, IntArrayRef, IntArrayRef,
    int64_t, bool);
using GradientSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, IntArrayRef,
                                     IntArrayRef, IntArrayRef, int64_t);

// The convolution's arguments other than tensors, as a node keeps them from forward to backward:
// one list in saved_data, [stride, padding, dilation, groups, has_bias] (whether a bias was given,
// for gradient_mask), since every entry there costs a hash and an allocation per call.
struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  ConvArgs(IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups)
      : stride(stride.vec()), padding(padding.vec()), dilation(dilation.vec()), groups(groups) {}

  void save(AutogradContext* ctx, const std::optional<at::Tensor>& bias) const {
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["conv"] = std::vector<int64_t>{stride[0], stride[1], padding[0], padding[1], dilation[0],
                                                   dilation[1], groups, has_bias};
  }

  static ConvArgs load(AutogradContext* ctx) {
    const auto v = ctx->saved_data["conv"].toIntVector();
    return {{v[0], v[1]}, {v[2], v[3]}, {v[4], v[5]}, v[6]};
  }

  static bool has_bias(AutogradContext* ctx) {
    return ctx->saved_data["conv"].toIntList().get(7) != 0;
  }
};

// Which of a convolution node's (input, weight, bias) need a gradient. needs_input_grad counts
// the tensors the node was given: bias is the third only if it was given.
Mask gradient_mask(AutogradContext* ctx) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ConvArgs::has_bias(ctx) && ctx->needs_input_grad(2)};
}

// conv2d's gradients from ∂L/∂Y: ∂L/∂X = conv2d_backward_input(∂L/∂Y, W), ∂L/∂W =
// conv2d_backward_weight(∂L/∂Y, X), ∂L/∂b = Σ ∂L/∂Y over batch and plane; each only where `mask`
// says, the rest of the `arguments` entries undefined.
variable_list conv2d_gradients(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                               const ConvArgs& a, Mask mask, size_t arguments, bool recorded) {
  static const auto backward_input = find_op<GradientSignature>("torchcnn::conv2d_backward_input");
  static const auto backward_weight = find_op<GradientSignature>("torchcnn::conv2d_backward_weight");
  variable_list result(arguments);
  call_recorded_if(recorded, [&] {
    if (mask[0]) {
      result[0] = backward_input.call(grad_y, input, weight, a.stride, a.padding, a.dilation, a.groups);
    }
    if (mask[1]) {
      result[1] = backward_weight.call(grad_y, input, weight, a.stride, a.padding, a.dilation, a.groups);
    }
    if (mask[2]) {
      result[2] = grad_y.sum({0, 2, 3});
    }
  });
  return result;
}

// ∂L/∂Y = M ⊙ ∂L/∂A, where the ReLU passes.
at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& passes, bool recorded) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("torchcnn::relu_backward");
  return call_recorded_if(recorded, [&] { return op.call(grad_output, passes); });
}

const c10::TypedOperatorHandle<Conv2dSignature>& conv2d_op() {
  static const auto handle = find_op<Conv2dSignature>("torchcnn::conv2d");
  return handle;
}

const c10::TypedOperatorHandle<Conv2dReLUSignature>& conv2d_relu_op() {
  static const auto handle = find_op<Conv2dReLUSignature>("torchcnn::conv2d_relu");
  return handle;
}

const c10::TypedOperatorHandle<Conv2dPoolSignature>& conv2d_relu_max_pool2d_op() {
  static const auto handle = find_op<Conv2dPoolSignature>("torchcnn::conv2d_relu_max_pool2d");
  return handle;
}

// Y = conv2d(X, W) + b; keeps X and W.
struct Conv2d : public torch::autograd::Function<Conv2d> {
  static constexpr bool is_traceable = true;  // common.h
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, int64_t groups) {
    at::Tensor output = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups);
    }();
    ctx->save_for_backward({input, weight});
    ConvArgs(stride, padding, dilation, groups).save(ctx, bias);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_output = grads[0];
    const auto saved = ctx->get_saved_variables();
    return conv2d_gradients(grad_output, saved[0], saved[1], ConvArgs::load(ctx), gradient_mask(ctx), 7,
                            differentiated(grad_output));
  }
};

// A = relu(Y) and M = (Y ≥ 0), handed back through `passes_out` (common.h); keeps X, W and M.
// ∂L/∂Y = M ⊙ ∂L/∂A, then conv2d's gradients.
struct Conv2dReLU : public torch::autograd::Function<Conv2dReLU> {
  static constexpr bool is_traceable = true;  // common.h
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, int64_t groups, at::Tensor* passes_out) {
    auto [output, passes] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return conv2d_relu_op().call(input, weight, bias, stride, padding, dilation, groups);
    }();
    ctx->save_for_backward({input, weight, passes});
    ConvArgs(stride, padding, dilation, groups).save(ctx, bias);
    *passes_out = passes;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_output = grads[0];
    const auto saved = ctx->get_saved_variables();
    const bool recorded = differentiated(grad_output);
    return conv2d_gradients(relu_backward(grad_output, saved[2], recorded), saved[0], saved[1], ConvArgs::load(ctx),
                            gradient_mask(ctx), 8, recorded);
  }
};

// The route conv2d_relu_max_pool2d's CPU backward takes: chosen by sparse_backward_applies, or
// forced for the tests (torchcnn.testing.forced_fused_backward_route).
enum class Route : int { kRule, kSparse, kDense };
std::atomic<Route> forced_route{Route::kRule};

// Whether conv2d_relu_max_pool2d's backward takes the CPU's sparse op: CPU tensors and a backward
// that is not itself differentiated (the dense route's ops carry those derivatives), with filters
// whose pieces (cpu/sparse_pieces.h) the op's vector loops take faster than the dense route's
// GEMMs: pieces of at least 16 values (the MNIST model's second layer: rows of 3 · 32 = 96), or,
// when only ∂W and ∂b are wanted (a network's first layer), few short ones in float sums (a
// one-channel 5×5 filter: five rows of five), whose ∂W is summed in registers all at once — each on
// the CPUs where it pays off (cpu/sparse_pieces.h: not x86's baseline tier).
bool sparse_backward_applies(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                             const ConvArgs& a, const Mask& mask) {
  if (!grad_output.is_cpu() || differentiated(grad_output) || functorch_active()) {
    return false;
  }
  const Route forced = forced_route.load();
  if (forced != Route::kRule) {
    return forced == Route::kSparse;
  }
  if (!cpu::sparse_route_pays_off()) {
    return false;
  }
  // Sizes as SymInts: traced with symbolic shapes (torch.compile's dynamic=True), a plain size()
  // would specialise the graph to them. A symbolic channel count or filter takes the dense route.
  const auto channels = input.sym_size(1).maybe_as_int();
  const auto kernel_h = weight.sym_size(2).maybe_as_int();
  const auto kernel_w = weight.sym_size(3).maybe_as_int();
  if (!channels || !kernel_h || !kernel_w) {
    return false;
  }
  const bool rows = a.groups == 1 && a.dilation[1] == 1;
  const auto pieces = cpu::filter_pieces(*channels / a.groups, *kernel_h, *kernel_w, rows);
  if (pieces.len >= 16) {
    return true;
  }
  return !mask[0] && pieces.short_enough() && input.scalar_type() != at::kDouble && cpu::short_pieces_pay_off();
}

// Forces the route ("sparse", "dense", or "" for the rule again); returns the previous one.
std::string force_route(const std::string& name) {
  static const char* const kNames[] = {"", "sparse", "dense"};
  const auto* found = std::find(std::begin(kNames), std::end(kNames), name);
  TORCH_CHECK_VALUE(found != std::end(kNames), "_cpu_fused_backward_route: expected name to be 'sparse', 'dense' "
                    "or '' but got '", name, "'");
  return kNames[static_cast<int>(forced_route.exchange(static_cast<Route>(found - std::begin(kNames))))];
}

// P = the 2×2 max pool of relu(Y), with its indices in Y's plane and M at them handed back through
// `indices_out` and `passes_out` (common.h); keeps X, W, the indices and M. ∂L/∂Y =
// max_pool2d_backward(M ⊙ ∂L/∂P), then conv2d's gradients, or on the CPU the sparse op that takes
// ∂L/∂Y as its one non-zero per window.
struct Conv2dReLUMaxPool2d : public torch::autograd::Function<Conv2dReLUMaxPool2d> {
  static constexpr bool is_traceable = true;  // common.h
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, int64_t groups, bool ceil_mode, at::Tensor* indices_out,
                               at::Tensor* passes_out) {
    auto [output, indices, passes] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return conv2d_relu_max_pool2d_op().call(input, weight, bias, stride, padding, dilation, groups, ceil_mode);
    }();
    ctx->save_for_backward({input, weight, indices, passes});
    ConvArgs(stride, padding, dilation, groups).save(ctx, bias);
    ctx->saved_data["ceil_mode"] = ceil_mode;  // an IValue of its own, but no allocation
    *indices_out = indices;
    *passes_out = passes;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr size_t kArguments = 10;  // one per argument of forward
    const at::Tensor& grad_output = grads[0];
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &indices = saved[2], &passes = saved[3];
    const ConvArgs a = ConvArgs::load(ctx);
    const bool ceil_mode = ctx->saved_data["ceil_mode"].toBool();
    const Mask mask = gradient_mask(ctx);
    if (sparse_backward_applies(grad_output, input, weight, a, mask)) {
      using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, IntArrayRef,
          IntArrayRef, IntArrayRef, int64_t, bool, Mask);
      static const auto sparse = find_op<Signature>("torchcnn::_cpu_conv2d_relu_max_pool2d_backward");
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_input, grad_weight, grad_bias] = sparse.call(grad_output, input, weight, indices, passes, a.stride,
                                                              a.padding, a.dilation, a.groups, ceil_mode, mask);
      variable_list result(kArguments);
      result[0] = mask[0] ? grad_input : at::Tensor();
      result[1] = mask[1] ? grad_weight : at::Tensor();
      result[2] = mask[2] ? grad_bias : at::Tensor();
      return result;
    }
    // The dense route: max_pool2d_backward reads only the shape of its `input`, Y here, which a
    // stand-in of no storage gives.
    using PoolBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, IntArrayRef,
                                             IntArrayRef, IntArrayRef, IntArrayRef, bool);
    static const auto pool_backward = find_op<PoolBackwardSignature>("torchcnn::max_pool2d_backward");
    const bool recorded = differentiated(grad_output);
    // The convolution's output size along one dimension (shapes.h's window_output_size, whose
    // numerator a valid convolution keeps ≥ 0), in SymInts, which tracing keeps symbolic.
    const auto out_size = [&](int64_t d) {
      return (input.sym_size(d) + 2 * a.padding[d - 2] - (weight.sym_size(d) - 1) * a.dilation[d - 2] - 1) /
                 a.stride[d - 2] + 1;
    };
    const std::vector<c10::SymInt> y_sizes = {input.sym_size(0), weight.sym_size(0), out_size(2), out_size(3)};
    const at::Tensor y_shape = grad_output.new_empty({}).expand_symint(y_sizes);
    const at::Tensor grad_pooled = relu_backward(grad_output, passes, recorded);
    const std::vector<int64_t> two = {2, 2}, zero = {0, 0}, one = {1, 1};
    const at::Tensor grad_y = call_recorded_if(
        recorded, [&] { return pool_backward.call(grad_pooled, y_shape, indices, two, two, zero, one, ceil_mode); });
    return conv2d_gradients(grad_y, input, weight, a, mask, kArguments, recorded);
  }
};

// Whether a call must go to the Python kernel: a torch.func transform, or a tangent on an argument.
bool python_route(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return functorch_active() || has_tangent(input) || has_tangent(weight) || (bias.has_value() && has_tangent(*bias));
}

// Whether autograd records the call: a gradient is enabled and some argument wants one.
bool wants_gradient(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() ||
          (bias.has_value() && bias->defined() && bias->requires_grad()));
}

at::Tensor conv2d_autograd(c10::DispatchKeySet keys, const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
                           IntArrayRef dilation, int64_t groups) {
  if (python_route(input, weight, bias)) {
    return conv2d_op().redispatch(python_kernel_keys(keys), input, weight, bias, stride, padding, dilation, groups);
  }
  if (!wants_gradient(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_op().redispatch(keys & c10::after_autograd_keyset, input, weight, bias, stride, padding, dilation,
                                  groups);
  }
  return Conv2d::apply(input, weight, bias, stride, padding, dilation, groups)[0];
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_autograd(c10::DispatchKeySet keys, const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, IntArrayRef stride,
                                                        IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  if (python_route(input, weight, bias)) {
    return conv2d_relu_op().redispatch(python_kernel_keys(keys), input, weight, bias, stride, padding, dilation,
                                       groups);
  }
  if (!wants_gradient(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_relu_op().redispatch(keys & c10::after_autograd_keyset, input, weight, bias, stride, padding,
                                       dilation, groups);
  }
  at::Tensor passes;
  auto outputs = Conv2dReLU::apply(input, weight, bias, stride, padding, dilation, groups, &passes);
  return {outputs[0], passes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_autograd(
    c10::DispatchKeySet keys, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups, bool ceil_mode) {
  if (python_route(input, weight, bias)) {
    return conv2d_relu_max_pool2d_op().redispatch(python_kernel_keys(keys), input, weight, bias, stride, padding,
                                                  dilation, groups, ceil_mode);
  }
  if (!wants_gradient(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_relu_max_pool2d_op().redispatch(keys & c10::after_autograd_keyset, input, weight, bias, stride,
                                                  padding, dilation, groups, ceil_mode);
  }
  at::Tensor indices, passes;
  auto outputs = Conv2dReLUMaxPool2d::apply(input, weight, bias, stride, padding, dilation, groups, ceil_mode,
                                            &indices, &passes);
  return {outputs[0], indices, passes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchcnn, m) {
  m.def("_cpu_fused_backward_route(str name) -> str", &force_route);
}

TORCH_LIBRARY_IMPL(torchcnn, AutogradCPU, m) {
  m.impl("conv2d", TORCH_FN(conv2d_autograd));
  m.impl("conv2d_relu", TORCH_FN(conv2d_relu_autograd));
  m.impl("conv2d_relu_max_pool2d", TORCH_FN(conv2d_relu_max_pool2d_autograd));
}

TORCH_LIBRARY_IMPL(torchcnn, AutogradCUDA, m) {
  m.impl("conv2d", TORCH_FN(conv2d_autograd));
  m.impl("conv2d_relu", TORCH_FN(conv2d_relu_autograd));
  m.impl("conv2d_relu_max_pool2d", TORCH_FN(conv2d_relu_max_pool2d_autograd));
}

}  // namespace torchcnn::autograd
