// How the CPU's sparse backward of conv2d_relu_max_pool2d (conv2d_relu_pool_backward.cpp) cuts a
// filter into contiguous pieces, as far as the rule that picks that op (autograd/conv2d_function.cpp)
// needs to know: with one group and no horizontal dilation a piece is a filter row (KW · C/groups
// values), otherwise one tap's C/groups channels.
#pragma once

#include <cstdint>

namespace torchcnn::cpu {

// ∂W sums all of a filter's pieces in registers at once (accumulate_short) when there are at most
// kMaxShortPieces of them, each at most kShortPiece values long.
constexpr int64_t kShortPiece = 16;
constexpr int64_t kMaxShortPieces = 8;

struct FilterPieces {
  int64_t count, len;  // pieces per filter and values per piece (before any split into chunks)

  bool short_enough() const { return len <= kShortPiece && count <= kMaxShortPieces; }
};

inline FilterPieces filter_pieces(int64_t group_channels, int64_t kernel_h, int64_t kernel_w, bool rows) {
  return rows ? FilterPieces{kernel_h, kernel_w * group_channels} : FilterPieces{kernel_h * kernel_w, group_channels};
}

// Whether this CPU's tier runs the sparse op faster than the dense route: on x86, with AVX2 or
// AVX-512 (0.5–0.9× the dense route's time on the MNIST-like layers), not at the baseline tier,
// where it took 1.8–3.5× (docs/BENCHMARKS.md); on other CPUs (aarch64, untimed) as before.
bool sparse_route_pays_off();

// The same for short pieces (accumulate_short): on x86 with AVX2 or AVX-512 (0.45–0.83× the dense
// route on first layers); not at the baseline tier (1.45–2.3× on 7 first layers of 8: its vectors
// spill), nor on other CPUs, where it is untimed. The op itself sums short pieces one at a time
// where this is false (a forced sparse route, or rows of exactly kShortPiece values).
bool short_pieces_pay_off();

}  // namespace torchcnn::cpu
