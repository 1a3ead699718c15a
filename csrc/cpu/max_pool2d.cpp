// max_pool2d on the CPU: planes (n, c) in parallel, one pass over each window.
//
// Forward (the design notes' pooling): P[i, j] = max over the window of X, and the flat index
// h·W + w of the element chosen, by torch's rule (max_pool2d_window.h, shared with CUDA).
// Backward: ∂L/∂X[idx] += ∂L/∂P[i, j] for each output, i.e. the gradient goes to the argmax.
// Reduced-precision inputs are compared in float; the result is exact in the input dtype.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../max_pool2d_window.h"
#include "../shapes.h"
#include "max_pool_2x2.h"

namespace torchcnn::cpu {
namespace {

// Planes per parallel task: enough work per task (~32k window taps) to amortise scheduling.
int64_t plane_grain(const Window2d& g) {
  const int64_t work = std::max<int64_t>(1, g.out_plane() * g.kernel_h * g.kernel_w);
  return std::max<int64_t>(1, 32768 / work);
}

// General window: any kernel, stride, padding, dilation, ceil_mode.
template <typename scalar_t>
void max_pool_plane(const scalar_t* x, scalar_t* y, int64_t* idx, const Window2d& g) {
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    for (int64_t ow = 0; ow < g.out_width; ++ow) {
      window_max(x, g, oh, ow, y[oh * g.out_width + ow], idx[oh * g.out_width + ow]);
    }
  }
}

// The design notes' 2×2 stride-2 pool: two input rows give one output row; each window is four
// loads and three compares, scanned in the same order as the general kernel (float rows 16
// windows at a time in AVX-512, or 8 at the other tiers: max_pool_2x2.h).
template <typename scalar_t>
void max_pool_plane_2x2(const scalar_t* x, scalar_t* y, int64_t* idx, const Window2d& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = g.width;
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    const scalar_t* r0 = x + 2 * oh * W;
    const scalar_t* r1 = r0 + W;
    scalar_t* yr = y + oh * g.out_width;
    int64_t* ir = idx + oh * g.out_width;
    const int64_t base = 2 * oh * W;
    int64_t ow = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
#if TORCHCNN_X86_TIERS
      if (max_pool_2x2_vectorizes(W)) {
        max_pool_2x2_row_avx512<false>(r0, r1, g.out_width, base, W, yr, ir, nullptr);
        continue;
      }
#endif
      ow = g.out_width / 8 * 8;
      max_pool_2x2_rows(r0, r1, ow, base, W, yr, ir);
    }
    for (; ow < g.out_width; ++ow) {
      const acc_t a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
      acc_t m = a;
      int64_t k = 0;
      take_if_larger(b, 1, m, k);
      take_if_larger(c, W, m, k);
      take_if_larger(d, W + 1, m, k);
      yr[ow] = static_cast<scalar_t>(m);
      ir[ow] = base + 2 * ow + k;
    }
  }
}

// The error for a plane whose indices are not all valid (is_valid_argmax), naming the first bad one.
[[noreturn]] void throw_invalid_index(const int64_t* idx, const Window2d& g, const char* op) {
  for (int64_t j = 0; j < g.out_plane(); ++j) {
    const int64_t oh = j / g.out_width, ow = j % g.out_width;
    TORCH_CHECK_INDEX(is_valid_argmax(g, oh, ow, idx[j]), op, ": indices[..., ", oh, ", ", ow, "] = ", idx[j],
                      " is not a pixel of its pooling window (as flat index h·W + w in the input plane)");
  }
  TORCH_INTERNAL_ASSERT(false, op, ": an index was invalid in one pass and valid in the next");
}

// ∂L/∂X[idx[j]] += ∂L/∂P[j] over one plane, zeroed here while it is in cache.
//
// 2×2 stride 2: each index is checked as it is used, branch-free (an offset of 0 or 1 from the
// window's first pixel or from the pixel below it); an invalid one adds nothing, at the window's
// first pixel, and the op raises once the plane is done.
template <typename scalar_t>
void max_pool_backward_plane_2x2(const scalar_t* go, const int64_t* idx, scalar_t* gi, const Window2d& g,
                                 const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
#if TORCHCNN_X86_TIERS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (max_pool_2x2_vectorizes(g.width)) {  // rows written whole, then the pixels no window covers zeroed
      const int64_t W = g.width, covered = 2 * g.out_width;
      uint32_t invalid = 0;
      for (int64_t oh = 0; oh < g.out_height; ++oh) {
        float* g0 = gi + 2 * oh * W;
        invalid |= max_pool_2x2_backward_row_avx512(go + oh * g.out_width, idx + oh * g.out_width, g.out_width,
                                                         2 * oh * W, W, g0, g0 + W);
        std::fill(g0 + covered, g0 + W, 0.0f);
        std::fill(g0 + W + covered, g0 + 2 * W, 0.0f);
      }
      std::fill(gi + 2 * g.out_height * W, gi + g.in_plane(), 0.0f);
      if (invalid != 0) {
        throw_invalid_index(idx, g, op);
      }
      return;
    }
  }
#endif
  std::fill(gi, gi + g.in_plane(), scalar_t(0));
  const uint64_t W = g.width;
  uint64_t invalid = 0;
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    const int64_t* ir = idx + oh * g.out_width;
    const scalar_t* gr = go + oh * g.out_width;
    for (int64_t ow = 0; ow < g.out_width; ++ow) {
      const uint64_t first = 2 * (oh * W + ow);
      const uint64_t k = static_cast<uint64_t>(ir[ow]) - first;
      const bool bad = (k > 1) & (k - W > 1);
      invalid |= bad;
      const uint64_t at = bad ? first : first + k;
      gi[at] = static_cast<scalar_t>(static_cast<acc_t>(gi[at]) + (bad ? acc_t(0) : static_cast<acc_t>(gr[ow])));
    }
  }
  if (invalid != 0) {
    throw_invalid_index(idx, g, op);
  }
}

// Undilated windows of any size, stride and padding (ResNet's and GoogLeNet's 3×3 stride 2): each
// index is checked as it is used and without a division — relative to the window's first pixel it
// must lie, in one of the window's rows, within the window's width — then scattered, branch-free as
// in the 2×2 case. (Checking with h = index / W, w = index % W, as is_valid_argmax does, cost the
// backward 8× torch's time.)
template <typename scalar_t>
void max_pool_backward_plane_undilated(const scalar_t* go, const int64_t* idx, scalar_t* gi, const Window2d& g,
                                       const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  std::fill(gi, gi + g.in_plane(), scalar_t(0));
  const int64_t W = g.width;
  uint64_t invalid = 0;
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    const int64_t hs = oh * g.stride_h - g.pad_h;
    const int64_t h0 = std::max<int64_t>(hs, 0), rows = std::min<int64_t>(hs + g.kernel_h, g.height) - h0;
    const int64_t* ir = idx + oh * g.out_width;
    const scalar_t* gr = go + oh * g.out_width;
    for (int64_t ow = 0; ow < g.out_width; ++ow) {
      const int64_t ws = ow * g.stride_w - g.pad_w;
      const int64_t w0 = std::max<int64_t>(ws, 0);
      const uint64_t width = std::min<int64_t>(ws + g.kernel_w, W) - w0;
      const int64_t first = h0 * W + w0, offset = ir[ow] - first;
      bool inside = false;
      for (int64_t r = 0; r < rows; ++r) {
        inside |= static_cast<uint64_t>(offset - r * W) < width;
      }
      invalid |= !inside;
      const int64_t at = inside ? ir[ow] : first;
      gi[at] = static_cast<scalar_t>(static_cast<acc_t>(gi[at]) + (inside ? static_cast<acc_t>(gr[ow]) : acc_t(0)));
    }
  }
  if (invalid != 0) {
    throw_invalid_index(idx, g, op);
  }
}

// Dilated windows: the indices are checked in a pass of their own, then scattered. Only a dilated
// window can hold no real pixel (max_pool2d_window.h); such a window passes nothing.
template <typename scalar_t>
void max_pool_backward_plane(const scalar_t* go, const int64_t* idx, scalar_t* gi, const Window2d& g,
                             const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  bool valid = true;
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    for (int64_t ow = 0; ow < g.out_width; ++ow) {
      valid &= is_valid_argmax(g, oh, ow, idx[oh * g.out_width + ow]);
    }
  }
  if (!valid) {
    throw_invalid_index(idx, g, op);
  }
  std::fill(gi, gi + g.in_plane(), scalar_t(0));
  for (int64_t j = 0; j < g.out_plane(); ++j) {
    if (pool_window(g, j / g.out_width, j % g.out_width).empty()) {
      continue;
    }
    gi[idx[j]] = static_cast<scalar_t>(static_cast<acc_t>(gi[idx[j]]) + static_cast<acc_t>(go[j]));
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_indices_cpu(
    const at::Tensor& input_, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode) {
  const auto g = max_pool2d_geometry("max_pool2d", input_, kernel_size, stride, padding, dilation, ceil_mode);
  const auto input = input_.contiguous();
  auto output = at::empty({g.batch, g.channels, g.out_height, g.out_width}, input.options());
  auto indices = at::empty(output.sizes(), input.options().dtype(at::kLong));
  const bool fast = is_pool_2x2_stride_2(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::max_pool2d", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, g.batch * g.channels, plane_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* xp = x + plane * g.in_plane();
        scalar_t* yp = y + plane * g.out_plane();
        int64_t* ip = idx + plane * g.out_plane();
        if (fast) {
          max_pool_plane_2x2(xp, yp, ip, g);
        } else {
          max_pool_plane(xp, yp, ip, g);
        }
      }
    });
  });
  return {output.contiguous(input_.suggest_memory_format()), indices.contiguous(input_.suggest_memory_format())};
}

at::Tensor max_pool2d_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input, const at::Tensor& indices_,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool ceil_mode) {
  const char* op = "max_pool2d_backward";
  const auto g = max_pool2d_backward_geometry(op, grad_output_, input, indices_, kernel_size, stride, padding,
                                              dilation, ceil_mode);
  const auto grad_output = grad_output_.contiguous();
  const auto indices = indices_.contiguous();
  auto grad_input = at::empty({g.batch, g.channels, g.height, g.width}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::max_pool2d_backward", [&] {
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    // One task owns whole planes, so the scatter into a plane is race-free and ordered.
    const bool fast = is_pool_2x2_stride_2(g), undilated = g.dilation_h == 1 && g.dilation_w == 1;
    at::parallel_for(0, g.batch * g.channels, plane_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* gop = go + plane * g.out_plane();
        const int64_t* ip = idx + plane * g.out_plane();
        scalar_t* gip = gi + plane * g.in_plane();
        if (fast) {
          max_pool_backward_plane_2x2(gop, ip, gip, g, op);
        } else if (undilated) {
          max_pool_backward_plane_undilated(gop, ip, gip, g, op);
        } else {
          max_pool_backward_plane(gop, ip, gip, g, op);
        }
      }
    });
  });
  return grad_input.contiguous(input.suggest_memory_format());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("max_pool2d_with_indices", &max_pool2d_with_indices_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace torchcnn::cpu
