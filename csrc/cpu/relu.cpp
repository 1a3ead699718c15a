// The design notes' ReLU as an op of its own on the CPU: one pass forward, A = relu(Z) and where
// its gradient passes (relu.h, shared with CUDA); the backward, relu_backward, then reads that mask
// (a byte per value) instead of Z, which the graph need not keep. The fused conv2d_relu ops'
// backwards use relu_backward too.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <cstring>

#include "../relu.h"
#include "../shapes.h"
#include "simd.h"

namespace torchcnn::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> relu_cpu(const at::Tensor& input_) {
  torchcnn::detail::check_floating("relu", "input", input_);
  // Dense tensors (channels_last included) are walked in memory order, outputs laid out alike.
  const auto input = input_.is_non_overlapping_and_dense() ? input_ : input_.contiguous();
  auto output = at::empty_like(input);
  auto passes = at::empty_like(input, input.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::relu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    scalar_t* a = output.mutable_data_ptr<scalar_t>();
    bool* p = passes.mutable_data_ptr<bool>();
    at::parallel_for(0, input.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bool pass = relu_passes(static_cast<acc_t>(z[i]));
        a[i] = pass ? z[i] : scalar_t(0);
        p[i] = pass;
      }
    });
  });
  return {output, passes};
}

// ∂L/∂Z = ∂L/∂A where the ReLU passes, else exactly 0 (a select, not a product: an infinite or NaN
// gradient stays out of the blocked values). Float rows by a loop the compiler vectorises.
template <typename scalar_t>
void select(const scalar_t* grad, const bool* passes, scalar_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = passes[i] ? grad[i] : scalar_t(0);
  }
}

// Float: the gradient's bits and-ed with a mask made of the bool (all ones or zero), so that every
// value is read and the loop vectorises to plain loads, widenings and ands (a conditional read
// would take masked loads, ~25× slower on this project's CPU).
[[gnu::always_inline]] inline void select_bits(const float* grad, const bool* passes, float* out, int64_t n) {
  const auto* pass = reinterpret_cast<const uint8_t*>(passes);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, grad + i, sizeof bits);
    bits &= 0u - static_cast<uint32_t>(pass[i] != 0);
    std::memcpy(out + i, &bits, sizeof bits);
  }
}
TORCHCNN_TIERED(select, select_bits, (const float* grad, const bool* passes, float* out, int64_t n),
                (grad, passes, out, n))

at::Tensor relu_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& passes_) {
  const auto layout = relu_backward_layout("relu_backward", grad_output_, passes_);
  const auto grad_output = layout.first, passes = layout.second;
  auto grad_input = at::empty_like(grad_output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_output.scalar_type(), "torchcnn::relu_backward", [&] {
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const bool* p = passes.const_data_ptr<bool>();
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, grad_output.numel(), 65536, [&](int64_t begin, int64_t end) {
      select(g + begin, p + begin, out + begin, end - begin);  // float: the vectorised overload
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("relu", &relu_cpu);
  m.impl("relu_backward", &relu_backward_cpu);
}

}  // namespace torchcnn::cpu
