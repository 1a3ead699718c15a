// conv2d with one input channel per group (depthwise, MobileNet-style; also any conv of a
// one-channel image, such as MNIST's first layer), computed directly.
//
// Output channel k reads input channel c = k / m alone, m = K / C being the channel multiplier:
//   Y[n, k, i, j] = b_k + Σ_p Σ_q W[k, 0, p, q] · X[n, c, i·s + p·d − pad, j·s + q·d − pad].
// For each tap (p, q) that is a scaled copy of an input row segment added onto an output row —
// an axpy over contiguous memory when the stride is 1, vectorised. A GEMM per group would have
// C/g·KH·KW = 9 rows: all overhead.
//   ∂L/∂X[n, c] = Σ_{k of c} Σ_{p, q} W[k, p, q] · (∂L/∂Y[n, k] shifted back), the same axpys with
//   source and destination swapped, gathered per input plane (each thread owns whole planes);
//   ∂L/∂W[k, p, q] = Σ_n Σ_{i, j} ∂L/∂Y[n, k, i, j] · X[n, c, …], dot products, per output channel.
// Every sum runs in a fixed order: the results do not depend on the thread count.
#include <torch/all.h>

#include "conv2d_algorithms.h"

namespace torchcnn::cpu {
namespace {

// Calls tap(oh, ih, p, q, lo, hi, offset) for every tap of every output row that lands inside the
// input: output columns [lo, hi) read input columns ow·s + offset.
template <typename F>
[[gnu::always_inline]] inline void for_each_tap(const Conv2dGeometry& g, F&& tap) {
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

// One plane of each op. The inner loops run over contiguous output columns (input columns ow·s +
// offset), so that the compiler vectorises them; the wrappers below compile them for AVX-512 and
// for baseline x86-64, and the CPU picks at load time (target_clones). (at::vec::Vectorized would
// be fixed at the baseline here: an extension is not compiled per CPU capability as ATen is.)

// y (OH × OW) = bias + Σ_taps w[p, q] · x shifted.
template <typename T>
[[gnu::always_inline]] inline void forward_plane(const T* __restrict x, const T* __restrict w, T bias,
                                                 const Conv2dGeometry& g, T* __restrict y) {
  std::fill(y, y + g.out_plane(), bias);
  const int64_t s = g.stride_w;
  for_each_tap(g, [&](int64_t oh, int64_t ih, int64_t p, int64_t q, int64_t lo, int64_t hi, int64_t offset) {
    T* __restrict dst = y + oh * g.out_width;
    const T* __restrict src = x + ih * g.width + offset;
    const T a = w[p * g.kernel_w + q];
    if (s == 1) {
      for (int64_t j = lo; j < hi; ++j) {
        dst[j] += a * src[j];
      }
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        dst[j] += a * src[j * s];
      }
    }
  });
}

// dx (H × W) += Σ_taps w[p, q] · dy shifted back (the adjoint of forward_plane).
template <typename T>
[[gnu::always_inline]] inline void backward_input_plane(const T* __restrict dy, const T* __restrict w,
                                                        const Conv2dGeometry& g, T* __restrict dx) {
  const int64_t s = g.stride_w;
  for_each_tap(g, [&](int64_t oh, int64_t ih, int64_t p, int64_t q, int64_t lo, int64_t hi, int64_t offset) {
    const T* __restrict src = dy + oh * g.out_width;
    T* __restrict dst = dx + ih * g.width + offset;
    const T a = w[p * g.kernel_w + q];
    if (s == 1) {
      for (int64_t j = lo; j < hi; ++j) {
        dst[j] += a * src[j];
      }
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        dst[j * s] += a * src[j];
      }
    }
  });
}

// dw (KH × KW) += Σ_{i, j} dy[i, j] · x[tap of (i, j)].
template <typename T>
[[gnu::always_inline]] inline void backward_weight_plane(const T* __restrict dy, const T* __restrict x,
                                                         const Conv2dGeometry& g, T* __restrict dw) {
  const int64_t s = g.stride_w;
  for_each_tap(g, [&](int64_t oh, int64_t ih, int64_t p, int64_t q, int64_t lo, int64_t hi, int64_t offset) {
    const T* __restrict a = dy + oh * g.out_width;
    const T* __restrict b = x + ih * g.width + offset;
    T sum = 0;
    if (s == 1) {
      for (int64_t j = lo; j < hi; ++j) {
        sum += a[j] * b[j];
      }
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        sum += a[j] * b[j * s];
      }
    }
    dw[p * g.kernel_w + q] += sum;
  });
}

#define TORCHCNN_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#define TORCHCNN_DEPTHWISE_PLANES(T)                                                                     \
  TORCHCNN_VECTOR_CLONES void forward_plane_cloned(const T* x, const T* w, T bias, const Conv2dGeometry& g, \
                                                   T* y) {                                               \
    forward_plane(x, w, bias, g, y);                                                                     \
  }                                                                                                      \
  TORCHCNN_VECTOR_CLONES void backward_input_plane_cloned(const T* dy, const T* w, const Conv2dGeometry& g, \
                                                          T* dx) {                                       \
    backward_input_plane(dy, w, g, dx);                                                                  \
  }                                                                                                      \
  TORCHCNN_VECTOR_CLONES void backward_weight_plane_cloned(const T* dy, const T* x, const Conv2dGeometry& g, \
                                                           T* dw) {                                      \
    backward_weight_plane(dy, x, g, dw);                                                                 \
  }
TORCHCNN_DEPTHWISE_PLANES(float)
TORCHCNN_DEPTHWISE_PLANES(double)
#undef TORCHCNN_DEPTHWISE_PLANES

template <typename T>
void forward(const T* x, const T* w, const T* bias, const Conv2dGeometry& g, T* y) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  for_each_chunk(g.batch * g.out_channels, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.out_channels, k = plane % g.out_channels;
      forward_plane_cloned(x + (n * g.channels + k / multiplier) * g.in_plane(), w + k * taps,
                           bias ? bias[k] : T(0), g, y + plane * g.out_plane());
    }
  });
}

template <typename T>
void backward_input(const T* dy, const T* w, const Conv2dGeometry& g, T* dx) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  for_each_chunk(g.batch * g.channels, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.channels, c = plane % g.channels;
      for (int64_t k = c * multiplier; k < (c + 1) * multiplier; ++k) {
        backward_input_plane_cloned(dy + (n * g.out_channels + k) * g.out_plane(), w + k * taps, g,
                                    dx + plane * g.in_plane());
      }
    }
  });
}

template <typename T>
void backward_weight(const T* dy, const T* x, const Conv2dGeometry& g, T* dw) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  for_each_chunk(g.out_channels, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      std::fill(dw + k * taps, dw + (k + 1) * taps, T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        backward_weight_plane_cloned(dy + (n * g.out_channels + k) * g.out_plane(),
                                     x + (n * g.channels + k / multiplier) * g.in_plane(), g, dw + k * taps);
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
