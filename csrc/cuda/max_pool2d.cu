// max_pool2d on CUDA: P[n, c, i, j] = max over the window and the flat index h·W + w of that max in
// its plane, by torch's rule (max_pool2d_window.h, shared with the CPU kernels). A dedicated kernel
// for the design notes' 2×2 stride-2 pool loads each window's two row pairs as vectors; the
// backward gathers, so it needs no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include "../max_pool2d_window.h"
#include "../shapes.h"
#include "launch.cuh"

namespace torchcnn {
namespace {

// One thread per output element (n, c, i, j); it scans its window row by row. index_t: int32_t
// wherever grid_fits_int32 allows it (launch.cuh), in the three kernels.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  int64_t* __restrict__ indices, index_t total, Window2d g) {
  const index_t OW = g.out_width, OH = g.out_height, in_plane = g.height * g.width;
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t ow = t % OW;
    const index_t oh = t / OW % OH;
    window_max(x + t / (OH * OW) * in_plane, g, oh, ow, y[t], indices[t]);
  }
}

template <typename scalar_t>
struct alignas(2 * sizeof(scalar_t)) Pair {
  scalar_t a, b;
};

// 2×2, stride 2, no padding: one thread per output; its window is x[2i, 2j..2j+1] and
// x[2i+1, 2j..2j+1], read as two 2-element vector loads when rows start aligned (Vec).
template <typename scalar_t, typename index_t, bool Vec>
__global__ void max_pool2d_2x2_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                      int64_t* __restrict__ indices, index_t total, Window2d g) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t W = g.width, OW = g.out_width, OH = g.out_height, in_plane = g.height * g.width;
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t ow = t % OW;
    const index_t oh = t / OW % OH;
    const index_t base = 2 * oh * W + 2 * ow;
    const scalar_t* r0 = x + t / (OH * OW) * in_plane + base;
    acc_t a, b, c, d;
    if constexpr (Vec) {
      const Pair<scalar_t> top = *reinterpret_cast<const Pair<scalar_t>*>(r0);
      const Pair<scalar_t> bottom = *reinterpret_cast<const Pair<scalar_t>*>(r0 + W);
      a = top.a, b = top.b, c = bottom.a, d = bottom.b;
    } else {
      a = r0[0], b = r0[1], c = r0[W], d = r0[W + 1];
    }
    acc_t m = a;
    int64_t k = 0;
    take_if_larger(b, 1, m, k);
    take_if_larger(c, W, m, k);
    take_if_larger(d, W + 1, m, k);
    y[t] = static_cast<scalar_t>(m);
    indices[t] = base + k;
  }
}

// ∂L/∂X[n, c, h, w] = Σ over the windows that hold (h, w) and whose argmax it is of ∂L/∂P.
// One thread per input pixel; it gathers from the outputs [i0, i1) × [j0, j1) whose windows can
// reach it, so every pixel is written once: no atomics, no zeroing, deterministic. A window whose
// taps step over (h, w) (dilation) does not hold it, and one with no real pixel holds none: they
// pass it nothing, whatever their index says. Each window's index is checked on the device by the
// thread of the window's first real pixel (an index that is no pixel of its window would
// otherwise be dropped silently): no host synchronisation, so CUDA graphs can capture it.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_backward_kernel(const scalar_t* __restrict__ grad_output,
                                           const int64_t* __restrict__ indices, scalar_t* __restrict__ grad_input,
                                           index_t total, Window2d g) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t H = g.height, W = g.width, OH = g.out_height, OW = g.out_width;
  const index_t sh = g.stride_h, sw = g.stride_w, ph = g.pad_h, pw = g.pad_w, dh = g.dilation_h, dw = g.dilation_w;
  const index_t reach_h = dilated_extent(g.kernel_h, g.dilation_h);
  const index_t reach_w = dilated_extent(g.kernel_w, g.dilation_w);
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t w = t % W;
    const index_t h = t / W % H;
    const index_t offset = t / (H * W) * (OH * OW);
    // Window i starts at i·s − pad and spans `reach` pixels: it reaches h iff
    // i·s − pad ≤ h ≤ i·s − pad + reach − 1.
    const index_t i0 = h + ph < reach_h ? 0 : (h + ph - reach_h) / sh + 1;
    const index_t i1 = std::min<index_t>((h + ph) / sh + 1, OH);
    const index_t j0 = w + pw < reach_w ? 0 : (w + pw - reach_w) / sw + 1;
    const index_t j1 = std::min<index_t>((w + pw) / sw + 1, OW);
    const int64_t me = h * W + w;
    acc_t sum = 0;
    for (index_t i = i0; i < i1; ++i) {
      if ((h + ph - i * sh) % dh != 0) {
        continue;
      }
      for (index_t j = j0; j < j1; ++j) {
        if ((w + pw - j * sw) % dw != 0) {
          continue;
        }
        const index_t o = offset + i * OW + j;
        const int64_t index = indices[o];
        const PoolWindow win = pool_window(g, i, j);
        if (h == win.h0 && w == win.w0) {
          KERNEL_CHECK_INDEX(is_valid_argmax(g, i, j, index), "max_pool2d_backward: indices holds a value that is "
                             "not a pixel of its pooling window (as flat index h·W + w in the input plane)");
        }
        if (index == me) {
          sum += static_cast<acc_t>(grad_output[o]);
        }
      }
    }
    grad_input[t] = static_cast<scalar_t>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_indices_cuda(
    const at::Tensor& input_, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode) {
  const auto g = max_pool2d_geometry("max_pool2d", input_, kernel_size, stride, padding, dilation, ceil_mode);
  const DeviceGuard guard(input_.device());
  const auto input = input_.contiguous();
  auto output = at::empty({g.batch, g.channels, g.out_height, g.out_width}, input.options());
  auto indices = at::empty(output.sizes(), input.options().dtype(at::kLong));
  const int64_t total = output.numel();
  if (total == 0) {
    return {output.contiguous(input_.suggest_memory_format()), indices.contiguous(input_.suggest_memory_format())};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::max_pool2d_cuda", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    const unsigned int blocks = blocks_for(total);
    with_index_type(grid_fits_int32(g, total, {input.numel()}), [&](auto i) {
      using index_t = decltype(i);
      const auto n = static_cast<index_t>(total);
      if (is_pool_2x2_stride_2(g)) {
        const bool aligned = g.width % 2 == 0 && reinterpret_cast<uintptr_t>(x) % (2 * sizeof(scalar_t)) == 0;
        if (aligned) {
          launch(max_pool2d_2x2_kernel<scalar_t, index_t, true>, blocks, kThreads, x, y, idx, n, g);
        } else {
          launch(max_pool2d_2x2_kernel<scalar_t, index_t, false>, blocks, kThreads, x, y, idx, n, g);
        }
      } else {
        launch(max_pool2d_kernel<scalar_t, index_t>, blocks, kThreads, x, y, idx, n, g);
      }
    });
  });
  return {output.contiguous(input_.suggest_memory_format()), indices.contiguous(input_.suggest_memory_format())};
}

at::Tensor max_pool2d_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input, const at::Tensor& indices_,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool ceil_mode) {
  const char* op = "max_pool2d_backward";
  const auto g = max_pool2d_backward_geometry(op, grad_output_, input, indices_, kernel_size, stride, padding,
                                              dilation, ceil_mode);
  const DeviceGuard guard(input.device());
  const auto grad_output = grad_output_.contiguous();
  const auto indices = indices_.contiguous();
  auto grad_input = at::empty({g.batch, g.channels, g.height, g.width}, grad_output.options());
  const int64_t total = grad_input.numel();
  if (total == 0) {
    return grad_input.contiguous(input.suggest_memory_format());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "torchcnn::max_pool2d_backward_cuda", [&] {
    with_index_type(grid_fits_int32(g, total, {grad_output.numel()}), [&](auto i) {
      using index_t = decltype(i);
      launch(max_pool2d_backward_kernel<scalar_t, index_t>, blocks_for(total), kThreads,
             grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
             grad_input.mutable_data_ptr<scalar_t>(), static_cast<index_t>(total), g);
    });
  });
  return grad_input.contiguous(input.suggest_memory_format());
}

}  // namespace

TORCHCNN_CUDA_KERNELS(m) {
  m.impl("max_pool2d_with_indices", &max_pool2d_with_indices_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace torchcnn
