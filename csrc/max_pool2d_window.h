// One max-pooling window, written once for the CPU and the CUDA kernels (C10_HOST_DEVICE): which
// input pixels it holds, torch's rule for its max and argmax, and where its gradient may go.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <limits>

#include "shapes.h"

namespace torchcnn {

// The real pixels of a window: rows h0, h0 + dilation_h, … < h1 and columns w0, w0 + dilation_w,
// … < w1 (its taps that fall in the padding left out).
struct PoolWindow {
  int64_t h0, h1, w0, w1;

  // With dilation a window can step over the whole input and hold no real pixel.
  C10_HOST_DEVICE bool empty() const { return h0 >= h1 || w0 >= w1; }
};

// The first of the taps start, start + dilation, … that is not in the leading padding.
C10_HOST_DEVICE inline int64_t first_real_tap(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + (-start + dilation - 1) / dilation * dilation;
}

C10_HOST_DEVICE inline PoolWindow pool_window(const Window2d& g, int64_t oh, int64_t ow) {
  const int64_t hs = oh * g.stride_h - g.pad_h;
  const int64_t ws = ow * g.stride_w - g.pad_w;
  const int64_t h1 = hs + dilated_extent(g.kernel_h, g.dilation_h);
  const int64_t w1 = ws + dilated_extent(g.kernel_w, g.dilation_w);
  return {first_real_tap(hs, g.dilation_h), h1 < g.height ? h1 : g.height,
          first_real_tap(ws, g.dilation_w), w1 < g.width ? w1 : g.width};
}

// torch's max, tap by tap in scan order: a value replaces the running max only if it is larger
// (so ties keep the first) or NaN (so NaN propagates, and the last NaN wins). Written without
// short-circuits so that compilers emit selects, not branches: on real data the outcome is a coin
// flip, and a mispredicted branch per tap costs more than the whole window.
template <typename acc_t>
C10_HOST_DEVICE inline void take_if_larger(acc_t value, int64_t index, acc_t& best, int64_t& best_index) {
  const bool larger = (value > best) | (value != value);
  best = larger ? value : best;
  best_index = larger ? index : best_index;
}

// What a window's max is taken over: the plane's values as they are, or mapped tap by tap (the
// fused conv2d_relu_max_pool2d pools relu(Y): relu.h).
struct AsIs {
  template <typename T>
  C10_HOST_DEVICE T operator()(T value) const { return value; }
};

// The max of window (oh, ow) over the values at(h, w) of one (H, W) plane (of map(value), tap by
// tap) and its flat index h·W + w, scanned row by row. A window of −inf reports its first real
// pixel, and one with no real pixel −inf at h0·W + w0 (an index outside the window, as torch's):
// both as torch does.
template <typename scalar_t, typename At, typename Map = AsIs>
C10_HOST_DEVICE inline void window_max_of(const At& at, const Window2d& g, int64_t oh, int64_t ow, scalar_t& value,
                                          int64_t& index, Map map = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  const PoolWindow win = pool_window(g, oh, ow);
  int64_t best = win.h0 * g.width + win.w0;
  acc_t best_value = -std::numeric_limits<acc_t>::infinity();
  for (int64_t h = win.h0; h < win.h1; h += g.dilation_h) {
    for (int64_t w = win.w0; w < win.w1; w += g.dilation_w) {
      take_if_larger(map(static_cast<acc_t>(at(h, w))), h * g.width + w, best_value, best);
    }
  }
  value = static_cast<scalar_t>(best_value);
  index = best;
}

// A plane in memory, (H, W) contiguous.
template <typename scalar_t>
struct PlaneAt {
  const scalar_t* plane;
  int64_t width;

  C10_HOST_DEVICE scalar_t operator()(int64_t h, int64_t w) const { return plane[h * width + w]; }
};

// window_max_of over a plane in memory.
template <typename scalar_t, typename Map = AsIs>
C10_HOST_DEVICE inline void window_max(const scalar_t* plane, const Window2d& g, int64_t oh, int64_t ow,
                                       scalar_t& value, int64_t& index, Map map = {}) {
  window_max_of(PlaneAt<scalar_t>{plane, g.width}, g, oh, ow, value, index, map);
}

// Whether input pixel (h, w) is one of the window's real pixels: the only places its gradient
// may go.
C10_HOST_DEVICE inline bool holds_pixel(const PoolWindow& win, const Window2d& g, int64_t h, int64_t w) {
  return h >= win.h0 && h < win.h1 && (h - win.h0) % g.dilation_h == 0 && w >= win.w0 && w < win.w1 &&
      (w - win.w0) % g.dilation_w == 0;
}

// The backward's contract for indices[n, c, oh, ow]: a window with no real pixel passes no
// gradient, whatever its index; any other window's index must be one of its real pixels.
C10_HOST_DEVICE inline bool is_valid_argmax(const Window2d& g, int64_t oh, int64_t ow, int64_t index) {
  const PoolWindow win = pool_window(g, oh, ow);
  if (win.empty()) {
    return true;
  }
  return index >= 0 && index < g.in_plane() && holds_pixel(win, g, index / g.width, index % g.width);
}

}  // namespace torchcnn
