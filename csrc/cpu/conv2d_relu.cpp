// conv2d + bias + the design notes' ReLU (+ their 2×2 max pool) on the CPU, as one op each:
//   conv2d_relu:             A = relu(Y),                       and where its gradient passes (Y ≥ 0);
//   conv2d_relu_max_pool2d:  P = max over each 2×2 window of relu(Y), the flat index of that max in
//                            Y's plane, and whether the gradient passes at it.
// Y = X ⋆ W + b comes from the algorithm the rule picks (conv2d.cpp), into a buffer this thread
// keeps between calls; one pass over it, plane by plane, then does the rest while each plane is
// in cache. The results equal the composition of the separate ops exactly: each value of Y is
// rounded to the input's dtype before the ReLU sees it, and the window scan is max_pool2d's
// (max_pool2d_window.h), on relu(Y) (relu.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <type_traits>

#include "../max_pool2d_window.h"
#include "../relu.h"
#include "conv2d_algorithms.h"
#include "max_pool_2x2.h"

namespace torchcnn::cpu {
namespace {

// relu of a value of Y, rounded to the op's dtype first (a window map, max_pool2d_window.h).
template <typename scalar_t>
struct RoundedRelu {
  template <typename acc_t>
  acc_t operator()(acc_t y) const { return relu(static_cast<acc_t>(static_cast<scalar_t>(y))); }
};

// Y in the op-math type (float for half types), computed into this thread's buffer: a fresh
// multi-megabyte tensor would be page-faulted in on every call. Valid until the next fused call
// on this thread.
at::Tensor convolve(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const Conv2dGeometry& g) {
  const auto compute = at::toOpMathType(input.scalar_type());
  const auto options = input.options().dtype(compute);
  auto y = workspace_tensor(Slot::kConvOutput, g.output_sizes(), at::empty({0}, options));
  const auto b = bias.has_value() && bias->defined() ? bias->to(compute) : at::Tensor();
  conv2d_forward(input.to(compute), weight.to(compute), b, g, y);
  return y;
}

// Planes per parallel task: ~16k values of Y each.
int64_t plane_grain(int64_t plane) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1));
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry("conv2d_relu", input, weight, bias, stride, padding, dilation, groups);
  const auto format = conv2d_memory_format(input, weight);
  auto output = at::empty(g.output_sizes(), input.options());
  auto passes = at::empty(g.output_sizes(), input.options().dtype(at::kBool));
  if (g.batch > 0) {
    const auto y = convolve(input, weight, bias, g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::conv2d_relu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* yp = y.const_data_ptr<acc_t>();
      scalar_t* out = output.mutable_data_ptr<scalar_t>();
      bool* pass = passes.mutable_data_ptr<bool>();
      at::parallel_for(0, y.numel(), 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t value = static_cast<scalar_t>(yp[i]);
          const bool p = relu_passes(static_cast<acc_t>(value));
          out[i] = p ? value : scalar_t(0);
          pass[i] = p;
        }
      });
    });
  }
  return {output.contiguous(format), passes.contiguous(format)};
}

// One plane of Y (rounded and through the ReLU as it is read) into its pooled plane: full windows
// as four loads and three compares (float rows 8 or, in AVX-512, 16 windows at a time: max_pool_2x2.h),
// the partial ones of ceil_mode by the general scan; all in max_pool2d's scan order.
template <typename scalar_t>
void relu_pool_plane(const at::opmath_type<scalar_t>* y, scalar_t* out, int64_t* idx, bool* pass,
                     const Window2d& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const RoundedRelu<scalar_t> act;
  const int64_t W = p.width;
  const int64_t full_rows = std::min(p.out_height, p.height / 2), full_columns = std::min(p.out_width, W / 2);
  for (int64_t oh = 0; oh < p.out_height; ++oh) {
    int64_t ow = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t o = oh * p.out_width;
      const float *r0 = y + 2 * oh * W, *r1 = r0 + W;
      if (oh < full_rows) {
#if TORCHCNN_X86_TIERS
        if (max_pool_2x2_vectorizes(W)) {
          max_pool_2x2_row_avx512<true>(r0, r1, full_columns, 2 * oh * W, W, out + o, idx + o, pass + o);
          ow = full_columns;
        }
#endif
        if (ow == 0) {
          ow = full_columns / 8 * 8;
          relu_max_pool_2x2_rows(r0, r1, ow, 2 * oh * W, W, out + o, idx + o, pass + o);
        }
      }
    }
    for (; ow < p.out_width; ++ow) {
      const int64_t j = oh * p.out_width + ow;
      const int64_t first = 2 * oh * W + 2 * ow;
      acc_t m;
      int64_t k;
      if (2 * oh + 1 < p.height && 2 * ow + 1 < W) {
        m = act(y[first]);
        k = first;
        take_if_larger(act(y[first + 1]), first + 1, m, k);
        take_if_larger(act(y[first + W]), first + W, m, k);
        take_if_larger(act(y[first + W + 1]), first + W + 1, m, k);
      } else {
        window_max(y, p, oh, ow, m, k, act);
      }
      out[j] = static_cast<scalar_t>(m);
      idx[j] = k;
      pass[j] = relu_passes(static_cast<acc_t>(static_cast<scalar_t>(y[k])));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool ceil_mode) {
  const auto g = conv2d_relu_max_pool2d_geometry("conv2d_relu_max_pool2d", input, weight, bias, stride, padding,
                                                 dilation, groups, ceil_mode);
  const Window2d& p = g.pool;
  const auto format = conv2d_memory_format(input, weight);
  const std::vector<int64_t> sizes = {p.batch, p.channels, p.out_height, p.out_width};
  auto output = at::empty(sizes, input.options());
  auto indices = at::empty(sizes, input.options().dtype(at::kLong));
  auto passes = at::empty(sizes, input.options().dtype(at::kBool));
  if (p.batch > 0) {
    const auto y = convolve(input, weight, bias, g.conv);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::conv2d_relu_max_pool2d",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* yp = y.const_data_ptr<acc_t>();
      scalar_t* out = output.mutable_data_ptr<scalar_t>();
      int64_t* idx = indices.mutable_data_ptr<int64_t>();
      bool* pass = passes.mutable_data_ptr<bool>();
      at::parallel_for(0, p.batch * p.channels, plane_grain(p.in_plane()), [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t o = plane * p.out_plane();
          relu_pool_plane<scalar_t>(yp + plane * p.in_plane(), out + o, idx + o, pass + o, p);
        }
      });
    });
  }
  return {output.contiguous(format), indices.contiguous(format), passes.contiguous(format)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_cpu);
}

}  // namespace torchcnn::cpu
