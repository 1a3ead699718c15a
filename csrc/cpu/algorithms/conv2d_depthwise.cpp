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

#include <vector>

// GCC would turn the short row copies back into memmove calls, each costing more than the few
// values it moves (the pragma is GCC's own; other compilers leave the loops be).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include "../conv2d_algorithms.h"
#include "../simd.h"

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

// The inner loops, over contiguous memory so that the compiler vectorises them; the wrappers
// below compile them once per tier (simd.h's TORCHCNN_TIERED).
// y[0, n) += a · x[0, n)
template <typename T>
[[gnu::always_inline]] inline void axpy(T* __restrict y, const T* __restrict x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// Σ x[i] · y[i] over [0, n)
template <typename T>
[[gnu::always_inline]] inline T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i] * y[i];
  }
  return sum;
}

// One plane of each op, row by row: output columns [lo, hi) of a row read input columns
// ow·s + offset.

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
      axpy(dst + lo, src + lo, a, hi - lo);
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
      axpy(dst + lo, src + lo, a, hi - lo);
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
      sum = dot(a + lo, b + lo, hi - lo);
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        sum += a[j] * b[j * s];
      }
    }
    dw[p * g.kernel_w + q] += sum;
  });
}

// Stride 1, the planes seen as one long row. In the input plane padded to Hp × Wp, output pixel
// (i, j) of the flattened output m = i·Wp + j reads xp[m + p·dh·Wp + q·dw]: every tap is ONE axpy
// (or dot) over OH·Wp entries, whatever the plane's width; the columns j ≥ OW of each output row
// are computed and dropped (or, for ∂L/∂Y, zero). The padded planes of a channel in several
// images, stacked, are one longer row still: 32 images of an 8 × 8 plane take 9 axpys of 3,180
// entries instead of 2,304 of 8.
struct Wide {
  int64_t wp, hp, len;       // padded width and height; the flattened output length
  int64_t group;             // images whose planes are stacked into one long row
  int64_t slack;             // readable zeros past the padded plane: the last tap reads that far
  int64_t offset[64];        // per tap (p, q): p·dh·Wp + q·dw
  int64_t taps;
};

// The row is taken in blocks of kBlock entries, every tap on a block before the next: the block
// of the output (or of ∂L/∂Y) stays in L1 across the taps, where whole rows of tens of thousands
// of entries would be streamed through L2 once per tap.
constexpr int64_t kBlock = 2048;

// out[0, len) = bias + Σ_taps w[tap] · xp[offset[tap] + ·]
template <typename T>
[[gnu::always_inline]] inline void wide_forward(const T* xp, const T* w, T bias, const Wide& s, T* out) {
  for (int64_t b0 = 0; b0 < s.len; b0 += kBlock) {
    const int64_t n = std::min(kBlock, s.len - b0);
    std::fill(out + b0, out + b0 + n, bias);
    for (int64_t t = 0; t < s.taps; ++t) {
      axpy(out + b0, xp + s.offset[t] + b0, w[t], n);
    }
  }
}

// dxp[offset[tap] + ·] += w[tap] · dy[0, len)
template <typename T>
[[gnu::always_inline]] inline void wide_backward_input(const T* dy, const T* w, const Wide& s, T* dxp) {
  for (int64_t b0 = 0; b0 < s.len; b0 += kBlock) {
    const int64_t n = std::min(kBlock, s.len - b0);
    for (int64_t t = 0; t < s.taps; ++t) {
      axpy(dxp + s.offset[t] + b0, dy + b0, w[t], n);
    }
  }
}

// dw[tap] += dy[0, len) · xp[offset[tap] + ·]
template <typename T>
[[gnu::always_inline]] inline void wide_backward_weight(const T* dy, const T* xp, const Wide& s, T* dw) {
  for (int64_t b0 = 0; b0 < s.len; b0 += kBlock) {
    const int64_t n = std::min(kBlock, s.len - b0);
    for (int64_t t = 0; t < s.taps; ++t) {
      dw[t] += dot(dy + b0, xp + s.offset[t] + b0, n);
    }
  }
}

#define TORCHCNN_DEPTHWISE_PLANES(T)                                                                       \
  TORCHCNN_TIERED(forward_plane_cloned, forward_plane,                                                     \
                  (const T* x, const T* w, T bias, const Conv2dGeometry& g, T* y), (x, w, bias, g, y))     \
  TORCHCNN_TIERED(backward_input_plane_cloned, backward_input_plane,                                       \
                  (const T* dy, const T* w, const Conv2dGeometry& g, T* dx), (dy, w, g, dx))               \
  TORCHCNN_TIERED(backward_weight_plane_cloned, backward_weight_plane,                                     \
                  (const T* dy, const T* x, const Conv2dGeometry& g, T* dw), (dy, x, g, dw))               \
  TORCHCNN_TIERED(wide_forward_cloned, wide_forward, (const T* xp, const T* w, T bias, const Wide& s, T* out), \
                  (xp, w, bias, s, out))                                                                   \
  TORCHCNN_TIERED(wide_backward_input_cloned, wide_backward_input, (const T* dy, const T* w, const Wide& s, T* dxp), \
                  (dy, w, s, dxp))                                                                         \
  TORCHCNN_TIERED(wide_backward_weight_cloned, wide_backward_weight,                                       \
                  (const T* dy, const T* xp, const Wide& s, T* dw), (dy, xp, s, dw))
TORCHCNN_DEPTHWISE_PLANES(float)
TORCHCNN_DEPTHWISE_PLANES(double)
#undef TORCHCNN_DEPTHWISE_PLANES

bool use_wide(const Conv2dGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.kernel_h * g.kernel_w <= 64;
}

// `per_thread`: groups small enough for every thread to get one (the forward and ∂X, whose sums
// do not depend on the grouping); ∂W, whose dot products do, groups by size alone.
Wide wide_geometry(const Conv2dGeometry& g, bool per_thread) {
  Wide s;
  s.wp = g.width + 2 * g.pad_w;
  s.hp = g.height + 2 * g.pad_h;
  s.slack = dilated_extent(g.kernel_w, g.dilation_w);
  s.taps = g.kernel_h * g.kernel_w;
  for (int64_t p = 0; p < g.kernel_h; ++p) {
    for (int64_t q = 0; q < g.kernel_w; ++q) {
      s.offset[p * g.kernel_w + q] = p * g.dilation_h * s.wp + q * g.dilation_w;
    }
  }
  // Images per group: their padded planes, stacked, within about 256 KiB of floats, and (per
  // thread) enough groups for every thread to have a (channel, group) to work on.
  const int64_t groups_per_channel = per_thread ? (at::get_num_threads() + g.channels - 1) / g.channels : 1;
  s.group = std::max<int64_t>(1, std::min({g.batch, (int64_t{64} << 10) / (s.hp * s.wp),
                                            (g.batch + groups_per_channel - 1) / groups_per_channel}));
  return s;
}

// The flattened output length of `images` stacked planes: plane i's output rows start at row
// i·Hp (the rows between its last output row and the next plane are computed and dropped).
int64_t wide_length(const Conv2dGeometry& g, const Wide& s, int64_t images) {
  return ((images - 1) * s.hp + g.out_height) * s.wp;
}

// dst[0, n) = src[0, n), inlined: the rows copied here are often a few floats long, where a call
// to memmove costs more than the copy (hence no-tree-loop-distribute-patterns at the top of this
// file: gcc would turn the loop back into a call).
template <typename T>
inline void copy_row(const T* __restrict src, int64_t n, T* __restrict dst) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = src[j];
  }
}

// Image plane x (H × W) into the zeroed padded plane xp, at (pad_h, pad_w). Only the interior is
// written: the border stays zero from the first call.
// Returns whether every value copied is finite (x − x is 0 for those, NaN for inf and NaN).
template <typename T>
bool pad_into(const T* x, const Conv2dGeometry& g, const Wide& s, T* xp) {
  T nonfinite = 0;
  for (int64_t i = 0; i < g.height; ++i) {
    const T* __restrict src = x + i * g.width;
    T* __restrict dst = xp + (g.pad_h + i) * s.wp + g.pad_w;
#pragma omp simd reduction(+ : nonfinite)
    for (int64_t j = 0; j < g.width; ++j) {
      dst[j] = src[j];
      nonfinite += src[j] - src[j];
    }
  }
  return nonfinite == T(0);
}

template <typename T>
bool all_finite(const T* p, int64_t n) {
  T nonfinite = 0;
#pragma omp simd reduction(+ : nonfinite)
  for (int64_t i = 0; i < n; ++i) {
    nonfinite += p[i] - p[i];
  }
  return nonfinite == T(0);
}

// ∂L/∂Y plane (OH × OW) into rows of Wp, zeros in the columns past OW (kept zero between calls).
template <typename T>
void spread(const T* dy, const Conv2dGeometry& g, const Wide& s, T* wide) {
  for (int64_t i = 0; i < g.out_height; ++i) {
    copy_row(dy + i * g.out_width, g.out_width, wide + i * s.wp);
  }
}

template <typename T>
void forward(const T* x, const T* w, const T* bias, const Conv2dGeometry& g, T* y) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  if (use_wide(g)) {
    Wide s = wide_geometry(g, /*per_thread=*/true);
    const int64_t groups = (g.batch + s.group - 1) / s.group, stride = s.hp * s.wp;
    for_each_chunk(g.channels * groups, [&](int64_t, int64_t begin, int64_t end) {
      std::vector<T> xp(s.group * stride + s.slack, T(0)), out(wide_length(g, s, s.group));
      Wide t = s;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / groups, n0 = item % groups * s.group, n1 = std::min(g.batch, n0 + s.group);
        for (int64_t n = n0; n < n1; ++n) {
          pad_into(x + (n * g.channels + c) * g.in_plane(), g, s, xp.data() + (n - n0) * stride);
        }
        t.len = wide_length(g, s, n1 - n0);
        for (int64_t k = c * multiplier; k < (c + 1) * multiplier; ++k) {
          wide_forward_cloned(xp.data(), w + k * taps, bias ? bias[k] : T(0), t, out.data());
          for (int64_t n = n0; n < n1; ++n) {
            T* yk = y + (n * g.out_channels + k) * g.out_plane();
            const T* o = out.data() + (n - n0) * stride;
            for (int64_t i = 0; i < g.out_height; ++i) {
              copy_row(o + i * s.wp, g.out_width, yk + i * g.out_width);
            }
          }
        }
      }
    });
    return;
  }
  for_each_chunk(g.batch * g.out_channels, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.out_channels, k = plane % g.out_channels;
      forward_plane_cloned(x + (n * g.channels + k / multiplier) * g.in_plane(), w + k * taps,
                           bias ? bias[k] : T(0), g, y + plane * g.out_plane());
    }
  });
}

template <typename T>
void backward_input(const T* dy, const T* w, const Conv2dGeometry& g, bool wide, T* dx) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  if (wide) {
    Wide s = wide_geometry(g, /*per_thread=*/true);
    const int64_t groups = (g.batch + s.group - 1) / s.group, stride = s.hp * s.wp;
    for_each_chunk(g.channels * groups, [&](int64_t, int64_t begin, int64_t end) {
      std::vector<T> dxp(s.group * stride + s.slack), wide(s.group * stride, T(0));
      Wide t = s;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / groups, n0 = item % groups * s.group, n1 = std::min(g.batch, n0 + s.group);
        std::fill(dxp.begin(), dxp.end(), T(0));
        t.len = wide_length(g, s, n1 - n0);
        for (int64_t k = c * multiplier; k < (c + 1) * multiplier; ++k) {
          for (int64_t n = n0; n < n1; ++n) {
            spread(dy + (n * g.out_channels + k) * g.out_plane(), g, s, wide.data() + (n - n0) * stride);
          }
          wide_backward_input_cloned(wide.data(), w + k * taps, t, dxp.data());
        }
        for (int64_t n = n0; n < n1; ++n) {
          T* dxc = dx + (n * g.channels + c) * g.in_plane();
          for (int64_t i = 0; i < g.height; ++i) {
            const T* src = dxp.data() + (n - n0) * stride + (g.pad_h + i) * s.wp + g.pad_w;
            copy_row(src, g.width, dxc + i * g.width);
          }
        }
      }
    });
    return;
  }
  for_each_chunk(g.batch * g.channels, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.channels, c = plane % g.channels;
      std::fill(dx + plane * g.in_plane(), dx + (plane + 1) * g.in_plane(), T(0));
      for (int64_t k = c * multiplier; k < (c + 1) * multiplier; ++k) {
        backward_input_plane_cloned(dy + (n * g.out_channels + k) * g.out_plane(), w + k * taps, g,
                                    dx + plane * g.in_plane());
      }
    }
  });
}

template <typename T>
void backward_weight(const T* dy, const T* x, const Conv2dGeometry& g, bool wide, T* dw) {
  const int64_t multiplier = g.out_channels / g.channels, taps = g.kernel_h * g.kernel_w;
  if (wide) {
    Wide s = wide_geometry(g, /*per_thread=*/false);
    const int64_t stride = s.hp * s.wp;
    for_each_chunk(g.out_channels, [&](int64_t, int64_t begin, int64_t end) {
      std::vector<T> xp(s.group * stride + s.slack, T(0)), wide(s.group * stride, T(0));
      Wide t = s;
      for (int64_t k = begin; k < end; ++k) {
        std::fill(dw + k * taps, dw + (k + 1) * taps, T(0));
        for (int64_t n0 = 0; n0 < g.batch; n0 += s.group) {
          const int64_t n1 = std::min(g.batch, n0 + s.group);
          bool finite = true;
          for (int64_t n = n0; n < n1; ++n) {
            finite &= pad_into(x + (n * g.channels + k / multiplier) * g.in_plane(), g, s, xp.data() + (n - n0) * stride);
            spread(dy + (n * g.out_channels + k) * g.out_plane(), g, s, wide.data() + (n - n0) * stride);
          }
          // The last tap reads up to `slack` entries past the group's last plane: a short group's
          // would be an earlier group's input, kept zero here.
          std::fill(xp.data() + (n1 - n0) * stride, xp.data() + (n1 - n0) * stride + s.slack, T(0));
          if (finite) {
            t.len = wide_length(g, s, n1 - n0);
            wide_backward_weight_cloned(wide.data(), xp.data(), t, dw + k * taps);
          } else {  // see finite(): the row-by-row kernel reads only what each output reads
            for (int64_t n = n0; n < n1; ++n) {
              backward_weight_plane_cloned(dy + (n * g.out_channels + k) * g.out_plane(),
                                           x + (n * g.channels + k / multiplier) * g.in_plane(), g, dw + k * taps);
            }
          }
        }
      }
    });
    return;
  }
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

// The wide row's gradients also multiply the dropped columns' zeros — ∂L/∂Y's with the input,
// ∂L/∂X's with the weights — by real values: harmless unless one of those is inf or NaN, where
// 0 · inf would put a NaN in a gradient that has none. Non-finite weights send ∂X, and groups of
// non-finite images send ∂W (checked as they are copied), to the row-by-row kernels.
bool finite(const at::Tensor& t) {
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "torchcnn::all_finite", [&] {
    ok = all_finite(t.const_data_ptr<scalar_t>(), t.numel());
  });
  return ok;
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
                             use_wide(g) && finite(weight), grad_input.mutable_data_ptr<scalar_t>());
  });
}

void depthwise_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                               at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "torchcnn::depthwise_backward_weight", [&] {
    backward_weight<scalar_t>(grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), g,
                              use_wide(g), grad_weight.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace torchcnn::cpu
