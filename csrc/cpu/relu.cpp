// The design notes' ReLU as an op of its own on the CPU: one pass forward, A = relu(Z) and where
// its gradient passes (relu.h, shared with CUDA); the backward then reads that mask (a byte per
// value) instead of Z, which the graph need not keep.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include "../relu.h"
#include "../shapes.h"

namespace torchcnn {
namespace {

std::tuple<at::Tensor, at::Tensor> relu_cpu(const at::Tensor& input_) {
  detail::check_floating("relu", "input", input_);
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

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("relu", &relu_cpu);
}

}  // namespace torchcnn
