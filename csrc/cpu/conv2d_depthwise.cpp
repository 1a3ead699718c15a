// conv2d with one input channel per group (depthwise, MobileNet-style; also any conv of a
// one-channel image, such as MNIST's first layer), computed directly.
//
// Output channel k reads input channel c = k / m alone, m = K / C being the channel multiplier:
//   Y[n, k, i, j] = b_k + Σ_p Σ_q W[k, 0, p, q] · X[n, c, i·s + p·d − pad, j·s + q·d − pad].
// For each tap (p, q) that is a scaled copy of an input row segment added onto an output row —
// an axpy over contiguous memory when the stride is 1, vectorised with at::vec. A GEMM per group
// would have C/g·KH·KW = 9 rows: all overhead.
//   ∂L/∂X[n, c] = Σ_{k of c} Σ_{p, q} W[k, p, q] · (∂L/∂Y[n, k] shifted back), the same axpys with
//   source and destination swapped, gathered per input plane (each thread owns whole planes);
//   ∂L/∂W[k, p, q] = Σ_n Σ_{i, j} ∂L/∂Y[n, k, i, j] · X[n, c, …], dot products, per output channel.
// Every sum runs in a fixed order: the results do not depend on the thread count.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/all.h>

#include "conv2d_algorithms.h"

namespace torchcnn::cpu {
namespace {

using at::vec::Vectorized;

// dst[j · dst_step] += a · src[j · src_step] for j in [lo, hi); one of the steps is 1.
template <typename T>
void axpy(T* dst, int64_t dst_step, const T* src, int64_t src_step, T a, int64_t lo, int64_t hi) {
  using Vec = Vectorized<T>;
  int64_t j = lo;
  if (dst_step == 1 && src_step == 1) {
    const Vec va(a);
    for (; j + Vec::size() <= hi; j += Vec::size()) {
      at::vec::fmadd(va, Vec::loadu(src + j), Vec::loadu(dst + j)).store(dst + j);
    }
  }
  for (; j < hi; ++j) {
    dst[j * dst_step] += a * src[j * src_step];
  }
}

// Σ_j x[j] · y[j · y_step] for j in [lo, hi).
template <typename T>
T dot(const T* x, const T* y, int64_t y_step, int64_t lo, int64_t hi) {
  using Vec = Vectorized<T>;
  int64_t j = lo;
  T sum = 0;
  if (y_step == 1 && hi - lo >= Vec::size()) {
    Vec acc(T(0));
    for (; j + Vec::size() <= hi; j += Vec::size()) {
      acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(y + j), acc);
    }
    sum = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
  }
  for (; j < hi; ++j) {
    sum += x[j] * y[j * y_step];
  }
  return sum;
}

// Calls tap(oh, ih, p, q, lo, hi, offset) for every tap of every output row that lands inside the
// input: output columns [lo, hi) read input columns ow·s + offset.
template <typename F>
void for_each_tap(const Conv2dGeometry& g, F&& tap) {
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    for (int64_t p = 0; p < g.kernel_h; ++p) {
      const int64_t ih = oh * g.stride_h - g.pad_h + p * g.dilation_h;
      if (ih < 0 || ih >= g.height) {
        continue;
      }
      for (int64_t q = 0; q < g.kernel_w; ++q) {
        const int64_t offset = q * g.dilation_w - g.pad_w;
        const auto [lo, hi] = valid_range(offset, g.stride_w, g.width, g.out_width);
        tap(oh, ih, p, q, lo, hi, offset);
      }
    }
  }
}

template <typename T>
void forward(const T* x, const T* w, const T* bias, const Conv2dGeometry& g, T* y) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  const int64_t planes = g.batch * g.out_channels;
  for_each_chunk(planes, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.out_channels, k = plane % g.out_channels;
      const T* xc = x + (n * g.channels + k / multiplier) * g.in_plane();
      const T* wk = w + k * taps;
      T* yk = y + plane * g.out_plane();
      std::fill(yk, yk + g.out_plane(), bias ? bias[k] : T(0));
      for_each_tap(g, [&](int64_t oh, int64_t ih, int64_t p, int64_t q, int64_t lo, int64_t hi, int64_t offset) {
        axpy(yk + oh * g.out_width, 1, xc + ih * g.width + offset, g.stride_w, wk[p * g.kernel_w + q], lo, hi);
      });
    }
  });
}

template <typename T>
void backward_input(const T* dy, const T* w, const Conv2dGeometry& g, T* dx) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  const int64_t planes = g.batch * g.channels;
  for_each_chunk(planes, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.channels, c = plane % g.channels;
      T* dxc = dx + plane * g.in_plane();
      for (int64_t k = c * multiplier; k < (c + 1) * multiplier; ++k) {
        const T* dyk = dy + (n * g.out_channels + k) * g.out_plane();
        const T* wk = w + k * taps;
        for_each_tap(g, [&](int64_t oh, int64_t ih, int64_t p, int64_t q, int64_t lo, int64_t hi, int64_t offset) {
          axpy(dxc + ih * g.width + offset, g.stride_w, dyk + oh * g.out_width, 1, wk[p * g.kernel_w + q], lo, hi);
        });
      }
    }
  });
}

template <typename T>
void backward_weight(const T* dy, const T* x, const Conv2dGeometry& g, T* dw) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  for_each_chunk(g.out_channels, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      T* dwk = dw + k * taps;
      std::fill(dwk, dwk + taps, T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* dyk = dy + (n * g.out_channels + k) * g.out_plane();
        const T* xc = x + (n * g.channels + k / multiplier) * g.in_plane();
        for_each_tap(g, [&](int64_t oh, int64_t ih, int64_t p, int64_t q, int64_t lo, int64_t hi, int64_t offset) {
          dwk[p * g.kernel_w + q] += dot(dyk + oh * g.out_width, xc + ih * g.width + offset, g.stride_w, lo, hi);
        });
      }
    }
  });
}

}  // namespace

void depthwise_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const Conv2dGeometry& g, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::depthwise_forward", [&] {
    forward<scalar_t>(input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                      bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, g,
                      output.mutable_data_ptr<scalar_t>());
  });
}

void depthwise_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                              at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "torchcnn::depthwise_backward_input", [&] {
    backward_input<scalar_t>(grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), g,
                             grad_input.mutable_data_ptr<scalar_t>());
  });
}

void depthwise_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                               at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "torchcnn::depthwise_backward_weight", [&] {
    backward_weight<scalar_t>(grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), g,
                              grad_weight.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace torchcnn::cpu
