// The backward of conv2d_relu_max_pool2d on the CPU, from the sparse gradient it starts with.
//
// ∂L/∂Y, the gradient at the convolution's output, is the pooled gradient routed to each window's
// argmax where the ReLU passed: at most one non-zero in every 2×2 window, so at least three
// quarters of ∂L/∂Y are zeros. The dense route (max_pool2d_backward, then conv2d's two gradient
// ops) multiplies all of them. Here each non-zero g at Y[n, k, y, x] is taken once:
//
//   ∂L/∂X[n, c, y·s + p·d − pad, x·s + q·d − pad] += g · W[k, c, p, q]     (for c in k's group)
//   ∂L/∂W[k, c, p, q] += g · X[n, c, y·s + p·d − pad, x·s + q·d − pad]
//   ∂L/∂b[k] += g
//
// over channels-last, zero-padded copies of X and ∂L/∂X (every tap in bounds, a filter row's
// taps one contiguous run), in the op-math type. Both sums are taken where they can stay in
// registers: ∂W[k] over channel k's non-zeros (threads split the channels), ∂X at each window
// start over the channels with a non-zero there (threads split the images). Each output is
// summed in one fixed order: the results do not depend on the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../shapes.h"
#include "conv2d_algorithms.h"
#include "sparse_pieces.h"
#include "simd.h"

namespace torchcnn::cpu {
namespace {

// The accumulation both gradients come down to: dst[0, len) += Σ_i v[i] · (src[i] + offset)[0, len),
// with the sum over i kept in registers and added to dst once. ∂W takes it with the input patches
// as sources (one channel k's non-zeros), ∂X with the filters (the non-zeros at one position of Y).
constexpr int64_t kChunk = 128;  // len at most: 8 AVX-512 vectors of float

template <typename T>
[[gnu::always_inline]] inline void accumulate(const T* const* src, int64_t offset, const T* v, int64_t count,
                                              int64_t len, T* dst) {
  T sum[kChunk] = {};
  for (int64_t i = 0; i < count; ++i) {
    const T* s = src[i] + offset;
    for (int64_t c = 0; c < len; ++c) {
      sum[c] += v[i] * s[c];
    }
  }
  for (int64_t c = 0; c < len; ++c) {
    dst[c] += sum[c];
  }
}

// Eight floats as a GCC/clang vector: one register where the tier has AVX, two SSE or NEON ones
// elsewhere (loaded and stored with memcpy: the data need not be aligned).
typedef float Floats8 __attribute__((vector_size(32)));

// accumulate for len = 8·kBlocks floats, the sums in kBlocks vector registers (the scalar loop's
// 128-value array lives in memory: a load and a store per multiply-add).
template <int kBlocks>
[[gnu::always_inline]] inline void accumulate_blocks(const float* const* src, int64_t offset, const float* v,
                                                     int64_t count, float* dst) {
  Floats8 sum[kBlocks] = {};
  for (int64_t i = 0; i < count; ++i) {
    const float* s = src[i] + offset;
    const float vi = v[i];
    for (int r = 0; r < kBlocks; ++r) {
      Floats8 x;
      std::memcpy(&x, s + 8 * r, sizeof x);
      sum[r] += vi * x;
    }
  }
  for (int r = 0; r < kBlocks; ++r) {
    Floats8 d;
    std::memcpy(&d, dst + 8 * r, sizeof d);
    d += sum[r];
    std::memcpy(dst + 8 * r, &d, sizeof d);
  }
}

// accumulate for float: 64 columns at a time, then the remaining whole blocks of 8, then the last
// few columns one by one.
[[gnu::always_inline]] inline void accumulate_floats(const float* const* src, int64_t offset, const float* v,
                                                     int64_t count, int64_t len, float* dst) {
  int64_t c = 0;
  for (; c + 64 <= len; c += 64) {
    accumulate_blocks<8>(src, offset + c, v, count, dst + c);
  }
  switch ((len - c) / 8) {
    case 7: accumulate_blocks<7>(src, offset + c, v, count, dst + c); break;
    case 6: accumulate_blocks<6>(src, offset + c, v, count, dst + c); break;
    case 5: accumulate_blocks<5>(src, offset + c, v, count, dst + c); break;
    case 4: accumulate_blocks<4>(src, offset + c, v, count, dst + c); break;
    case 3: accumulate_blocks<3>(src, offset + c, v, count, dst + c); break;
    case 2: accumulate_blocks<2>(src, offset + c, v, count, dst + c); break;
    case 1: accumulate_blocks<1>(src, offset + c, v, count, dst + c); break;
    default: break;
  }
  c += (len - c) / 8 * 8;
  if (c < len) {
    accumulate(src, offset + c, v, count, len - c, dst + c);
  }
}

TORCHCNN_TIERED(accumulate_tiered, accumulate_floats,
                (const float* const* src, int64_t offset, const float* v, int64_t count, int64_t len, float* dst),
                (src, offset, v, count, len, dst))
TORCHCNN_TIERED(accumulate_tiered, accumulate,
                (const double* const* src, int64_t offset, const double* v, int64_t count, int64_t len, double* dst),
                (src, offset, v, count, len, dst))

#if TORCHCNN_X86_TIERS

template <int kVectors>
TORCHCNN_TARGET_AVX512 void accumulate_avx512(const float* const* src, int64_t offset, const float* v,
                                                          int64_t count, int64_t len, float* dst) {
  __m512 sum[kVectors];
  for (int r = 0; r < kVectors; ++r) {
    sum[r] = _mm512_setzero_ps();
  }
  const __mmask16 last = first_lanes(len - 16 * (kVectors - 1));
  for (int64_t i = 0; i < count; ++i) {
    const __m512 vi = _mm512_set1_ps(v[i]);
    const float* s = src[i] + offset;
    for (int r = 0; r < kVectors - 1; ++r) {
      sum[r] = _mm512_fmadd_ps(vi, _mm512_loadu_ps(s + 16 * r), sum[r]);
    }
    sum[kVectors - 1] = _mm512_fmadd_ps(vi, _mm512_maskz_loadu_ps(last, s + 16 * (kVectors - 1)), sum[kVectors - 1]);
  }
  for (int r = 0; r < kVectors - 1; ++r) {
    _mm512_storeu_ps(dst + 16 * r, _mm512_add_ps(_mm512_loadu_ps(dst + 16 * r), sum[r]));
  }
  float* d = dst + 16 * (kVectors - 1);
  _mm512_mask_storeu_ps(d, last, _mm512_add_ps(_mm512_maskz_loadu_ps(last, d), sum[kVectors - 1]));
}

#endif

void accumulate_rows(const float* const* src, int64_t offset, const float* v, int64_t count, int64_t len,
                     float* dst) {
#if TORCHCNN_X86_TIERS
  if (!avx512_tier()) {
    accumulate_tiered(src, offset, v, count, len, dst);
    return;
  }
  switch ((len + 15) / 16) {
    case 1: return accumulate_avx512<1>(src, offset, v, count, len, dst);
    case 2: return accumulate_avx512<2>(src, offset, v, count, len, dst);
    case 3: return accumulate_avx512<3>(src, offset, v, count, len, dst);
    case 4: return accumulate_avx512<4>(src, offset, v, count, len, dst);
    case 5: return accumulate_avx512<5>(src, offset, v, count, len, dst);
    case 6: return accumulate_avx512<6>(src, offset, v, count, len, dst);
    case 7: return accumulate_avx512<7>(src, offset, v, count, len, dst);
    default: return accumulate_avx512<8>(src, offset, v, count, len, dst);
  }
#else
  accumulate_tiered(src, offset, v, count, len, dst);
#endif
}

void accumulate_rows(const double* const* src, int64_t offset, const double* v, int64_t count, int64_t len,
                     double* dst) {
  accumulate_tiered(src, offset, v, count, len, dst);
}

// A filter's taps as contiguous pieces of at most kChunk values, each at `image` in a padded,
// channels-last image (relative to the tap (0, 0)) and at `filter` in a filter laid out (KH, KW,
// C/groups). With one group and no horizontal dilation, a filter row's KW taps are KW·C
// consecutive values in both, one piece (or a few); otherwise each tap's C/groups channels are.
struct Piece {
  int64_t image, filter, len;
};

std::vector<Piece> pieces(const Conv2dGeometry& g, int64_t padded_w) {
  const bool rows = g.groups == 1 && g.dilation_w == 1;
  const int64_t cg = g.in_channels_per_group();
  std::vector<Piece> out;
  for (int64_t p = 0; p < g.kernel_h; ++p) {
    for (int64_t q = 0; q < (rows ? 1 : g.kernel_w); ++q) {
      const int64_t len = rows ? g.kernel_w * cg : cg;
      for (int64_t c = 0; c < len; c += kChunk) {
        out.push_back({(p * g.dilation_h * padded_w + q * g.dilation_w) * g.channels + c, (p * g.kernel_w + q) * cg + c,
                       std::min(kChunk, len - c)});
      }
    }
  }
  return out;
}

// ∂W's sums when every piece is short — at most kShortPiece values, as in a first layer's
// one-channel filters (a 5×5 filter: five rows of five) — and there are at most kMaxShortPieces:
// all the pieces' sums in registers at once, in one pass over the non-zeros, where
// accumulate_rows would take one pass per piece with a single sum (a chain of dependent
// multiply-adds, five lanes of sixteen busy). Each piece is read as kVectors whole vectors from
// its start: up to kShortPiece − len values past its end, which the padded image's slack
// (kShortPieceSlack) keeps in bounds and whose lanes are dropped.
constexpr int64_t kShortPieceSlack = kShortPiece;  // sparse_pieces.h
static_assert(kShortPiece <= 16 && kShortPieceSlack >= 15, "a piece of up to 16 values is read as two vectors of 8");

template <int kPieces, int kVectors>
[[gnu::always_inline]] inline void accumulate_short_pieces(const float* const* src, const Piece* pieces,
                                                           const float* v, int64_t count, float* dw) {
  Floats8 sum[kPieces][kVectors] = {};
  int64_t offset[kPieces];
  for (int p = 0; p < kPieces; ++p) {
    offset[p] = pieces[p].image;
  }
  for (int64_t i = 0; i < count; ++i) {
    const float* s = src[i];
    const float vi = v[i];
    for (int p = 0; p < kPieces; ++p) {
      for (int r = 0; r < kVectors; ++r) {
        Floats8 x;
        std::memcpy(&x, s + offset[p] + 8 * r, sizeof x);
        sum[p][r] += vi * x;
      }
    }
  }
  for (int p = 0; p < kPieces; ++p) {
    float lanes[8 * kVectors];
    std::memcpy(lanes, sum[p], sizeof lanes);
    float* d = dw + pieces[p].filter;
    for (int64_t c = 0; c < pieces[p].len; ++c) {
      d[c] += lanes[c];
    }
  }
}

template <int kVectors>
[[gnu::always_inline]] inline void accumulate_short_vectors(const float* const* src, const Piece* pieces,
                                                            int64_t n_pieces, const float* v, int64_t count,
                                                            float* dw) {
  switch (n_pieces) {
    case 1: return accumulate_short_pieces<1, kVectors>(src, pieces, v, count, dw);
    case 2: return accumulate_short_pieces<2, kVectors>(src, pieces, v, count, dw);
    case 3: return accumulate_short_pieces<3, kVectors>(src, pieces, v, count, dw);
    case 4: return accumulate_short_pieces<4, kVectors>(src, pieces, v, count, dw);
    case 5: return accumulate_short_pieces<5, kVectors>(src, pieces, v, count, dw);
    case 6: return accumulate_short_pieces<6, kVectors>(src, pieces, v, count, dw);
    case 7: return accumulate_short_pieces<7, kVectors>(src, pieces, v, count, dw);
    case 8: return accumulate_short_pieces<8, kVectors>(src, pieces, v, count, dw);
    default: TORCH_INTERNAL_ASSERT(false, "accumulate_short: ", n_pieces, " pieces");  // short_pieces rules it out
  }
}

[[gnu::always_inline]] inline void accumulate_short(const float* const* src, const Piece* pieces, int64_t n_pieces,
                                                    int64_t longest, const float* v, int64_t count, float* dw) {
  if (longest <= 8) {
    accumulate_short_vectors<1>(src, pieces, n_pieces, v, count, dw);
  } else {
    accumulate_short_vectors<2>(src, pieces, n_pieces, v, count, dw);
  }
}

TORCHCNN_TIERED(accumulate_short_tiered, accumulate_short,
                (const float* const* src, const Piece* pieces, int64_t n_pieces, int64_t longest, const float* v,
                 int64_t count, float* dw),
                (src, pieces, n_pieces, longest, v, count, dw))

// What the loops share: the non-zeros (the pooled gradient where the ReLU passed, and the flat
// index in Y's plane of its argmax), image by image (K planes of `pooled` each), and the sizes.
template <typename T>
struct SparseGrad {
  const T* values;
  const bool* passes;
  const int64_t* at;
  int64_t out_channels, pooled, plane;
  int64_t group_out_channels, group_channels;
  std::vector<Piece> pieces;
  // Where the window of Y's value at each index of its plane starts in a padded, channels-last
  // image (a table: no division in the loops).
  std::vector<int64_t> window;

  int64_t per_image() const { return out_channels * pooled; }
  // Entry i's gradient: zero where the ReLU did not pass, whatever grad_output holds there (a NaN).
  T value(int64_t i) const { return passes[i] ? values[i] : T(0); }
  int64_t group_offset(int64_t k) const { return k / group_out_channels * group_channels; }
};

std::vector<int64_t> window_starts(const Conv2dGeometry& g, int64_t padded_w) {
  std::vector<int64_t> starts(g.out_plane());
  for (int64_t y = 0; y < g.out_height; ++y) {
    for (int64_t x = 0; x < g.out_width; ++x) {
      starts[y * g.out_width + x] = (y * g.stride_h * padded_w + x * g.stride_w) * g.channels;
    }
  }
  return starts;
}

// ∂W (K, KH, KW, C/groups) and ∂b: channel k's non-zeros over a few images at a time (their
// padded inputs stay in cache while every k of this thread passes over them).
template <typename T>
void weight_grad(const SparseGrad<T>& s, const T* xp, int64_t batch, int64_t padded_image, int64_t filter_size,
                 T* dw, T* db) {
  // Images per block: what fits a 32 KiB L1 data cache, one image at least.
  const int64_t block = std::max<int64_t>(1, (32 << 10) / (padded_image * int64_t(sizeof(T))));
  int64_t longest = 0;
  for (const Piece& piece : s.pieces) {
    longest = std::max(longest, piece.len);
  }
  // accumulate_short (float sums only, below): pieces few and short enough to stay in registers,
  // by the rule's own measure, on a CPU where that pays off.
  const bool short_rows = !s.pieces.empty() && short_pieces_pay_off() &&
                          FilterPieces{static_cast<int64_t>(s.pieces.size()), longest}.short_enough();
  at::parallel_for(0, s.out_channels, 1, [&](int64_t k_begin, int64_t k_end) {
    std::vector<const T*> src(block * s.pooled);
    std::vector<T> v(block * s.pooled);
    for (int64_t n0 = 0; n0 < batch; n0 += block) {
      const int64_t n1 = std::min(batch, n0 + block);
      for (int64_t k = k_begin; k < k_end; ++k) {
        int64_t count = 0;
        T bias = 0;
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t first = n * s.per_image() + k * s.pooled;
          const int64_t* at = s.at + first;
          const T* image = xp + n * padded_image + s.group_offset(k);
          for (int64_t j = 0; j < s.pooled; ++j) {  // without a branch: the ReLU's zeros fall at random
            const T g = s.value(first + j);
            bias += g;
            src[count] = image + s.window[at[j]];
            v[count] = g;
            count += g != T(0);
          }
        }
        db[k] += bias;
        if constexpr (std::is_same_v<T, float>) {
          if (short_rows) {
            accumulate_short_tiered(src.data(), s.pieces.data(), static_cast<int64_t>(s.pieces.size()), longest,
                                    v.data(), count, dw + k * filter_size);
            continue;
          }
        }
        for (const Piece& piece : s.pieces) {
          accumulate_rows(src.data(), piece.image, v.data(), count, piece.len, dw + k * filter_size + piece.filter);
        }
      }
    }
  });
}

// ∂X, image by image, into the padded, channels-last dxp: the non-zeros sorted by where their
// window starts (and by group), then at each start Σ_k g_k · W_k accumulated once per piece.
template <typename T>
void input_grad(const SparseGrad<T>& s, const T* filters, int64_t batch, int64_t padded_image, int64_t filter_size,
                T* dxp) {
  const int64_t groups = s.out_channels / s.group_out_channels;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const int64_t buckets = groups * s.plane;  // (group, index in Y's plane)
    std::vector<int64_t> first(buckets + 1), next(buckets);
    std::vector<const T*> src(s.per_image());
    std::vector<T> v(s.per_image());
    for (int64_t n = begin; n < end; ++n) {
      const int64_t first_entry = n * s.per_image();
      const int64_t* at = s.at + first_entry;
      std::fill(first.begin(), first.end(), 0);  // a counting sort of the non-zeros by bucket
      for (int64_t k = 0; k < s.out_channels; ++k) {
        int64_t* counts = first.data() + 1 + k / s.group_out_channels * s.plane;
        for (int64_t j = k * s.pooled; j < (k + 1) * s.pooled; ++j) {
          counts[at[j]] += s.value(first_entry + j) != T(0);
        }
      }
      for (int64_t b = 0; b < buckets; ++b) {
        first[b + 1] += first[b];
      }
      std::copy(first.begin(), first.end() - 1, next.begin());
      for (int64_t k = 0; k < s.out_channels; ++k) {
        int64_t* slots = next.data() + k / s.group_out_channels * s.plane;
        for (int64_t j = k * s.pooled; j < (k + 1) * s.pooled; ++j) {
          const T g = s.value(first_entry + j);
          if (g != T(0)) {
            const int64_t slot = slots[at[j]]++;
            src[slot] = filters + k * filter_size;
            v[slot] = g;
          }
        }
      }
      // Piece by piece: one piece of every filter (a filter row, K · KW · C/groups values) stays in cache.
      for (const Piece& piece : s.pieces) {
        for (int64_t group = 0; group < groups; ++group) {
          T* image = dxp + n * padded_image + group * s.group_channels + piece.image;
          for (int64_t index = 0; index < s.plane; ++index) {
            const int64_t b = group * s.plane + index, count = first[b + 1] - first[b];
            if (count > 0) {
              accumulate_rows(src.data() + first[b], piece.filter, v.data() + first[b], count, piece.len,
                              image + s.window[index]);
            }
          }
        }
      }
    }
  });
}

// A zeroed (N, H + 2·pad_h, W + 2·pad_w, C) tensor of `like`'s dtype in this thread's workspace slot
// (conv2d_algorithms.h: no page faults on every call), followed by kShortPieceSlack zeros that
// accumulate_short's whole-vector loads may read (in the padded input; ∂X's buffer, written by
// masked or exact stores, needs none), and its (N, C, H, W) interior.
std::pair<at::Tensor, at::Tensor> padded_channels_last(Slot slot, const Conv2dGeometry& g, const at::Tensor& like) {
  const int64_t numel = g.batch * (g.height + 2 * g.pad_h) * (g.width + 2 * g.pad_w) * g.channels;
  auto flat = workspace_tensor(slot, {numel + kShortPieceSlack}, like);
  flat.zero_();
  auto padded = flat.narrow(0, 0, numel).view({g.batch, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, g.channels});
  return {padded, padded.narrow(1, g.pad_h, g.height).narrow(2, g.pad_w, g.width).permute({0, 3, 1, 2})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& indices,
    const at::Tensor& passes, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool ceil_mode, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_cpu_conv2d_relu_max_pool2d_backward";
  const auto geometry = conv2d_relu_max_pool2d_backward_geometry(op, grad_output, input, weight, indices, passes,
                                                                  stride, padding, dilation, groups, ceil_mode);
  const Conv2dGeometry& g = geometry.conv;
  const Window2d& pool = geometry.pool;

  const auto acc = at::toOpMathType(input.scalar_type());
  const auto format = conv2d_memory_format(input, weight);
  // The pooled gradient, where the ReLU passed (SparseGrad::value), and the indices, checked.
  const auto at_argmax = indices.contiguous();
  const auto values = grad_output.to(acc).contiguous();
  const auto passed = passes.contiguous();
  const int64_t plane = g.out_plane();
  {  // the indices' values: data, which only a kernel reads (shapes.h checks the arguments' form)
    const int64_t* idx = at_argmax.const_data_ptr<int64_t>();
    const int64_t count = at_argmax.numel();
    bool outside = false;
    for (int64_t i = 0; i < count; ++i) {  // no early exit: the check vectorizes
      outside |= static_cast<uint64_t>(idx[i]) >= static_cast<uint64_t>(plane);
    }
    for (int64_t i = 0; outside && i < count; ++i) {  // the first one, for the message
      TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < plane, op, ": index ", idx[i], " is outside the convolution's ",
                        g.out_height, "×", g.out_width, " output plane");
    }
  }
  const int64_t padded_h = g.height + 2 * g.pad_h, padded_w = g.width + 2 * g.pad_w;
  const int64_t padded_image = padded_h * padded_w * g.channels;
  const int64_t filter_size = g.kernel_h * g.kernel_w * g.in_channels_per_group();

  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, input.options());
  at::Tensor grad_bias = at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SparseGrad<acc_t> s{values.const_data_ptr<acc_t>(), passed.const_data_ptr<bool>(),
                              at_argmax.const_data_ptr<int64_t>(), g.out_channels,
                              pool.out_height * pool.out_width, plane, g.out_channels_per_group(),
                              g.in_channels_per_group(), pieces(g, padded_w), window_starts(g, padded_w)};
    if (output_mask[0]) {
      const auto filters = weight.permute({0, 2, 3, 1}).to(acc).contiguous();  // (K, KH, KW, C/groups)
      const auto [dxp, interior] = padded_channels_last(Slot::kGrads, g, values);
      input_grad(s, filters.const_data_ptr<acc_t>(), g.batch, padded_image, filter_size,
                 dxp.mutable_data_ptr<acc_t>());
      grad_input = interior.to(input.scalar_type(), false, true, format);  // a copy: dxp is the workspace's
    }
    if (output_mask[1] || output_mask[2]) {
      const auto [xp, interior] = padded_channels_last(Slot::kScratch, g, values);
      interior.copy_(input);
      auto dw = at::zeros({g.out_channels, g.kernel_h, g.kernel_w, g.in_channels_per_group()}, xp.options());
      auto db = at::zeros({g.out_channels}, xp.options());
      weight_grad(s, xp.const_data_ptr<acc_t>(), g.batch, padded_image, filter_size, dw.mutable_data_ptr<acc_t>(),
                  db.mutable_data_ptr<acc_t>());
      if (output_mask[1]) {
        grad_weight = dw.permute({0, 3, 1, 2}).to(input.scalar_type(), false, false, format);
      }
      if (output_mask[2]) {
        grad_bias = db.to(input.scalar_type());
      }
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

bool sparse_route_pays_off() {
#if TORCHCNN_X86_TIERS
  return cpu_tier() != Tier::kDefault;
#else
  return true;
#endif
}

bool short_pieces_pay_off() {
  return TORCHCNN_X86_TIERS && sparse_route_pays_off();  // elsewhere untimed
}

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("_cpu_conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cpu);
}

}  // namespace torchcnn::cpu
