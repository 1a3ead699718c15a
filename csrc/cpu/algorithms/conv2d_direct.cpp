// conv2d with stride 1 computed directly, with no im2col columns: for convolutions whose GEMM
// would be thin — few channels per group, few output channels, or large filters on small planes
// (a 7×7 filter's columns are 49 copies of the input, written and read again for every pass).
//
// On the input plane padded to Hp × Wp, output pixel (i, j) sits at m = i·Wp + j and tap (p, q)
// reads m + p·dh·Wp + q·dw: every tap is one offset into the flattened plane, so
//   Y[k, m] = b_k + Σ_c Σ_{p,q} W[k, c, p, q] · Xp[c, m + p·dh·Wp + q·dw],
// a sum of shifted rows, computed in whole vectors (along the grid or along each output row: Grid
// below) and the entries that are no output pixel dropped. The kernel keeps a block of output
// channels × two vectors of m in registers, broadcasts each filter value and adds the input row
// times it: one load of the input feeds a whole block of output channels.
//   ∂L/∂X is the same kernel on ∂L/∂Y padded by d·(K − 1) − pad, over the filters turned around
//   (input and output channels swapped within each group, taps reversed; an infinite filter value
//   meets that padding's zeros there and gives NaN where torch's ∂X has ±inf, as with Winograd);
//   ∂L/∂W[k, c, p, q] = Σ_n Σ_m ∂L/∂Y[n, k, m] · Xp[n, c, m + offset(p, q)], with ∂L/∂Y spread onto
//   the same grid (zeros in the dropped columns): blocks of output channels × taps of dot products
//   (an image whose input holds ±inf or NaN is summed over its output pixels alone instead).
// The vectors are GCC/clang vectors of 64 bytes at the AVX-512 tier (a ZMM register) and 32
// elsewhere (a YMM register at AVX2; two SSE or NEON registers at the baseline); the sums over
// channels and taps run in a fixed order.
#include <torch/all.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../conv2d_algorithms.h"
#include "../simd.h"

namespace torchcnn::cpu {

DirectVectors direct_vectors(const Conv2dGeometry& g, int64_t lanes) {
  const int64_t along_grid = (g.out_height * (g.width + 2 * g.pad_w) + lanes - 1) / lanes;
  const int64_t along_rows = g.out_height * ((g.out_width + lanes - 1) / lanes);
  return along_rows < along_grid ? DirectVectors{true, along_rows} : DirectVectors{false, along_grid};
}

double direct_lanes_used(const Conv2dGeometry& g, int64_t lanes, int64_t runs) {
  const int64_t vectors = (direct_vectors(g, lanes).count + runs - 1) / runs * runs;
  return vectors == 0 ? 0.0 : static_cast<double>(g.out_plane()) / static_cast<double>(vectors * lanes);
}

namespace {

// Where one image's group is computed: its input planes padded to hp × wp; the output pixels as
// vectors of `lanes` entries, vector e covering m ∈ [starts[e], starts[e] + lanes) of the padded
// grid (each tap reads from m + offset(tap)); output pixel p = i·OW + j in lane where[p] of the
// vectors laid end to end. The vectors run along the grid (m = e·lanes, computing the KW − 1
// columns past each row's end too) or along each output row (rounding each row up to whole
// vectors), whichever takes fewer: with 16 lanes, a 14-wide output with a 7×7 filter wastes 6 of
// every 20 entries along the grid, 2 of 16 along the rows; a 7-wide one with a 3×3 filter 2 of 9
// against 9 of 16.
struct Grid {
  int64_t wp, hp, plane;          // padded width, height and plane size
  int64_t lanes, span;            // entries per vector; entries of all the vectors (count · lanes)
  int64_t buffer;                 // entries of the padded input of a group's channels, with the slack
  std::vector<int64_t> starts;    // per vector, a multiple of `runs` of them (the last repeated)
  std::vector<int64_t> offsets;   // per tap, p·dh·Wp + q·dw
  std::vector<int64_t> where;     // per output pixel

  Grid(const Conv2dGeometry& g, int64_t lanes_, int64_t runs) : lanes(lanes_) {
    wp = g.width + 2 * g.pad_w;
    hp = g.height + 2 * g.pad_h;
    plane = hp * wp;
    const int64_t oh = g.out_height, ow = g.out_width;
    const auto [along_rows, count] = direct_vectors(g, lanes);
    const int64_t per_row = (ow + lanes - 1) / lanes;
    where.resize(oh * ow);
    if (along_rows) {
      for (int64_t i = 0; i < oh; ++i) {
        for (int64_t v = 0; v < per_row; ++v) {
          starts.push_back(i * wp + v * lanes);
        }
        for (int64_t j = 0; j < ow; ++j) {
          where[i * ow + j] = (i * per_row + j / lanes) * lanes + j % lanes;
        }
      }
    } else {
      for (int64_t e = 0; e < count; ++e) {
        starts.push_back(e * lanes);
      }
      for (int64_t i = 0; i < oh; ++i) {
        for (int64_t j = 0; j < ow; ++j) {
          where[i * ow + j] = i * wp + j;
        }
      }
    }
    while (!starts.empty() && starts.size() % runs != 0) {
      starts.push_back(starts.back());
    }
    span = static_cast<int64_t>(starts.size()) * lanes;
    // The last channel's reads reach its last vector's end − 1 + the largest offset.
    const int64_t reach = (g.kernel_h - 1) * g.dilation_h * wp + (g.kernel_w - 1) * g.dilation_w;
    buffer = (g.in_channels_per_group() - 1) * plane + (starts.empty() ? 0 : starts.back()) + lanes + reach;
    for (int64_t p = 0; p < g.kernel_h; ++p) {
      for (int64_t q = 0; q < g.kernel_w; ++q) {
        offsets.push_back(p * g.dilation_h * wp + q * g.dilation_w);
      }
    }
  }
};

// x's channels [c0, c0 + count) of one image (H × W planes) into xp, padded, zeros around and after.
template <typename T>
void pad_planes(const T* x, const Conv2dGeometry& g, const Grid& s, int64_t count, T* xp) {
  std::fill(xp, xp + s.buffer, T(0));
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t i = 0; i < g.height; ++i) {
      std::memcpy(xp + c * s.plane + (i + g.pad_h) * s.wp + g.pad_w, x + (c * g.height + i) * g.width,
                  g.width * sizeof(T));
    }
  }
}

// A vector of kBytes, and the same read from and written to memory at any element's address.
template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  typedef T unaligned __attribute__((vector_size(kBytes), aligned(sizeof(T)), may_alias));
  static constexpr int kLanes = kBytes / sizeof(T);
};
#define TORCHCNN_UNROLL _Pragma("GCC unroll 16")
#define TORCHCNN_LOAD(U, p) (*reinterpret_cast<const U*>(p))
#define TORCHCNN_STORE(U, p, v) (*reinterpret_cast<U*>(p) = (v))

// out[k, e·lanes + l] for kBlock output channels and every vector e, kRuns vectors at a time:
// Σ_c Σ_taps w[k, c, tap] · xp[c, starts[e] + l + offset(tap)]. w: (the group's outputs, cg, taps).
template <typename T, int kBytes, int kBlock, int kRuns>
[[gnu::always_inline]] inline void forward_block(const T* __restrict xp, const T* __restrict w, int64_t cg,
                                                 const Grid& s, int64_t taps, T* __restrict out) {
  using V = typename Vec<T, kBytes>::type;
  using U = typename Vec<T, kBytes>::unaligned;
  constexpr int kLanes = Vec<T, kBytes>::kLanes;
  const int64_t* offsets = s.offsets.data();
  const int64_t count = static_cast<int64_t>(s.starts.size());
  for (int64_t e = 0; e < count; e += kRuns) {
    V acc[kBlock][kRuns];
    TORCHCNN_UNROLL
    for (int o = 0; o < kBlock; ++o) {
      TORCHCNN_UNROLL
      for (int r = 0; r < kRuns; ++r) {
        acc[o][r] = V{};
      }
    }
    int64_t start[kRuns];
    TORCHCNN_UNROLL
    for (int r = 0; r < kRuns; ++r) {
      start[r] = s.starts[e + r];
    }
    for (int64_t c = 0; c < cg; ++c) {
      const T* __restrict plane = xp + c * s.plane;
      const T* __restrict wc = w + c * taps;
      for (int64_t t = 0; t < taps; ++t) {
        V x[kRuns];
        TORCHCNN_UNROLL
        for (int r = 0; r < kRuns; ++r) {
          x[r] = TORCHCNN_LOAD(U, plane + start[r] + offsets[t]);
        }
        TORCHCNN_UNROLL
        for (int o = 0; o < kBlock; ++o) {
          const T a = wc[o * cg * taps + t];
          TORCHCNN_UNROLL
          for (int r = 0; r < kRuns; ++r) {
            acc[o][r] += x[r] * a;
          }
        }
      }
    }
    TORCHCNN_UNROLL
    for (int o = 0; o < kBlock; ++o) {
      TORCHCNN_UNROLL
      for (int r = 0; r < kRuns; ++r) {
        TORCHCNN_STORE(U, out + o * s.span + (e + r) * kLanes, acc[o][r]);
      }
    }
  }
}

// Every output channel of a group: blocks of kBlock, the rest in blocks of 4, 2 and 1.
template <typename T, int kBytes, int kBlock, int kRuns>
[[gnu::always_inline]] inline void forward_group(const T* xp, const T* w, int64_t cg, int64_t kg, const Grid& s,
                                                 int64_t taps, T* out) {
  int64_t k = 0;
  for (; k + kBlock <= kg; k += kBlock) {
    forward_block<T, kBytes, kBlock, kRuns>(xp, w + k * cg * taps, cg, s, taps, out + k * s.span);
  }
  if constexpr (kBlock > 4) {
    for (; k + 4 <= kg; k += 4) {
      forward_block<T, kBytes, 4, kRuns>(xp, w + k * cg * taps, cg, s, taps, out + k * s.span);
    }
  }
  for (; k + 2 <= kg; k += 2) {
    forward_block<T, kBytes, 2, kRuns>(xp, w + k * cg * taps, cg, s, taps, out + k * s.span);
  }
  for (; k < kg; ++k) {
    forward_block<T, kBytes, 1, kRuns>(xp, w + k * cg * taps, cg, s, taps, out + k * s.span);
  }
}

// The images of one pass of ∂L/∂W, side by side: image i's padded input at xp + i·x_stride, its
// ∂L/∂Y spread onto the grid at dy + i·dy_stride.
struct Images {
  int64_t count, x_stride, dy_stride;
};

// dw[k, c, tap] += Σ_images Σ_m dy[k, m] · xp[c, m + offset(tap)] for kBlock output channels ×
// kTaps taps, in vector registers over all the images: one horizontal sum per pass.
template <typename T, int kBytes, int kBlock, int kTaps>
[[gnu::always_inline]] inline void weight_block(const T* __restrict dy, const T* __restrict xp, const Grid& s,
                                                const Images& images, const int64_t* __restrict offsets,
                                                int64_t stride_k, T* __restrict dw) {
  using V = typename Vec<T, kBytes>::type;
  using U = typename Vec<T, kBytes>::unaligned;
  constexpr int kLanes = Vec<T, kBytes>::kLanes;
  V acc[kBlock][kTaps];
  for (int o = 0; o < kBlock; ++o) {
    TORCHCNN_UNROLL
    for (int t = 0; t < kTaps; ++t) {
      acc[o][t] = V{};
    }
  }
  const int64_t count = static_cast<int64_t>(s.starts.size());
  for (int64_t i = 0; i < images.count; ++i) {
    const T* __restrict d_image = dy + i * images.dy_stride;
    const T* __restrict x_image = xp + i * images.x_stride;
    for (int64_t e = 0; e < count; ++e) {
      const int64_t m = s.starts[e];
      V d[kBlock], x[kTaps];
      TORCHCNN_UNROLL
      for (int o = 0; o < kBlock; ++o) {
        d[o] = TORCHCNN_LOAD(U, d_image + o * s.span + e * kLanes);
      }
      TORCHCNN_UNROLL
      for (int t = 0; t < kTaps; ++t) {
        x[t] = TORCHCNN_LOAD(U, x_image + m + offsets[t]);
      }
      TORCHCNN_UNROLL
      for (int o = 0; o < kBlock; ++o) {
        TORCHCNN_UNROLL
        for (int t = 0; t < kTaps; ++t) {
          acc[o][t] += d[o] * x[t];
        }
      }
    }
  }
  for (int o = 0; o < kBlock; ++o) {
    TORCHCNN_UNROLL
    for (int t = 0; t < kTaps; ++t) {
      T sum = 0;
      for (int l = 0; l < kLanes; ++l) {
        sum += acc[o][t][l];
      }
      dw[o * stride_k + t] += sum;
    }
  }
}

// kBlock output channels from dy, every input channel and tap: kTaps taps at a time, the rest
// (fewer than kTaps) in one block of their own.
template <typename T, int kBytes, int kBlock, int kTaps>
[[gnu::always_inline]] inline void weight_channels(const T* dy, const T* xp, int64_t cg, const Grid& s,
                                                   const Images& images, int64_t taps, T* dw) {
  const int64_t stride_k = cg * taps;
  const int64_t* offsets = s.offsets.data();
  for (int64_t c = 0; c < cg; ++c) {
    const T* xc = xp + c * s.plane;
    T* dwc = dw + c * taps;
    int64_t t = 0;
    for (; t + kTaps <= taps; t += kTaps) {
      weight_block<T, kBytes, kBlock, kTaps>(dy, xc, s, images, offsets + t, stride_k, dwc + t);
    }
    switch (taps - t) {
      case 3:
        weight_block<T, kBytes, kBlock, 3>(dy, xc, s, images, offsets + t, stride_k, dwc + t);
        break;
      case 2:
        weight_block<T, kBytes, kBlock, 2>(dy, xc, s, images, offsets + t, stride_k, dwc + t);
        break;
      case 1:
        weight_block<T, kBytes, kBlock, 1>(dy, xc, s, images, offsets + t, stride_k, dwc + t);
        break;
      default:
        break;
    }
  }
}

// Every (output channel, input channel, tap) of a group: dw (kg, cg, taps) += the images' sums.
template <typename T, int kBytes, int kBlock, int kTaps>
[[gnu::always_inline]] inline void weight_group(const T* dy, const T* xp, int64_t cg, int64_t kg, const Grid& s,
                                                const Images& images, int64_t taps, T* dw) {
  int64_t k = 0;
  for (; k + kBlock <= kg; k += kBlock) {
    weight_channels<T, kBytes, kBlock, kTaps>(dy + k * s.span, xp, cg, s, images, taps, dw + k * cg * taps);
  }
  for (; k < kg; ++k) {
    weight_channels<T, kBytes, 1, kTaps>(dy + k * s.span, xp, cg, s, images, taps, dw + k * cg * taps);
  }
}

// Each tier's copy, with register blocks (forward: output channels × vectors; ∂W: output channels
// × taps) that fit its registers: 32 ZMM at AVX-512, 16 YMM at AVX2. The baseline takes AVX2's
// blocks as pairs of 16-byte registers: NEON's 32 hold them, x86's 16 SSE registers spill.
#define TORCHCNN_DIRECT_KERNELS(T)                                                                         \
  TORCHCNN_DIRECT_TIER(T, avx512, TORCHCNN_TARGET_AVX512, 64, 8, 2, 4, 4)                                  \
  TORCHCNN_DIRECT_TIER(T, avx2, TORCHCNN_TARGET_AVX2, 32, 4, 2, 2, 4)

#define TORCHCNN_DIRECT_TIER(T, tier, target, bytes, block, runs, wblock, wtaps)                           \
  target void forward_group_##tier(const T* xp, const T* w, int64_t cg, int64_t kg, const Grid& s,           \
                                   int64_t taps, T* out) {                                                   \
    forward_group<T, bytes, block, runs>(xp, w, cg, kg, s, taps, out);                                       \
  }                                                                                                          \
  target void weight_group_##tier(const T* dy, const T* xp, int64_t cg, int64_t kg, const Grid& s,           \
                                  const Images& images, int64_t taps, T* dw) {                               \
    weight_group<T, bytes, wblock, wtaps>(dy, xp, cg, kg, s, images, taps, dw);                              \
  }

#if TORCHCNN_X86_TIERS
TORCHCNN_DIRECT_KERNELS(float)
TORCHCNN_DIRECT_KERNELS(double)
#endif
#define TORCHCNN_NO_TARGET
TORCHCNN_DIRECT_TIER(float, default, TORCHCNN_NO_TARGET, 32, 4, 2, 2, 4)
TORCHCNN_DIRECT_TIER(double, default, TORCHCNN_NO_TARGET, 32, 4, 2, 2, 4)

// The entries of a vector at the tier the kernels run at.
template <typename T>
int64_t vector_lanes() {
#if TORCHCNN_X86_TIERS
  if (avx512_tier()) {
    return 64 / sizeof(T);
  }
#endif
  return 32 / sizeof(T);
}

template <typename T>
void forward_group_tiered(const T* xp, const T* w, int64_t cg, int64_t kg, const Grid& s, int64_t taps, T* out) {
#if TORCHCNN_X86_TIERS
  switch (cpu_tier()) {
    case Tier::kAvx512:
      return forward_group_avx512(xp, w, cg, kg, s, taps, out);
    case Tier::kAvx2:
      return forward_group_avx2(xp, w, cg, kg, s, taps, out);
    default:
      break;
  }
#endif
  forward_group_default(xp, w, cg, kg, s, taps, out);
}

template <typename T>
void weight_group_tiered(const T* dy, const T* xp, int64_t cg, int64_t kg, const Grid& s, const Images& images,
                         int64_t taps, T* dw) {
#if TORCHCNN_X86_TIERS
  switch (cpu_tier()) {
    case Tier::kAvx512:
      return weight_group_avx512(dy, xp, cg, kg, s, images, taps, dw);
    case Tier::kAvx2:
      return weight_group_avx2(dy, xp, cg, kg, s, images, taps, dw);
    default:
      break;
  }
#endif
  weight_group_default(dy, xp, cg, kg, s, images, taps, dw);
}

// y = x ⋆ w (+ bias) for contiguous NCHW x, w (K, C/g, KH, KW), y; stride 1. The work is split
// between the threads by image and group, and, where those are fewer than the threads (a batch
// of one), by blocks of 8 output channels too; each output is computed by one thread, the same
// way whatever the split.
template <typename T>
void forward(const T* x, const T* w, const T* bias, const Conv2dGeometry& g, T* y) {
  const Grid s(g, vector_lanes<T>(), 2);
  const int64_t cg = g.in_channels_per_group(), kg = g.out_channels_per_group();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t images = g.batch * g.groups, blocks = (kg + 7) / 8;
  const int64_t splits = std::clamp<int64_t>((at::get_num_threads() + images - 1) / images, 1, blocks);
  for_each_chunk(images * splits, [&](int64_t, int64_t begin, int64_t end) {
    T* xp = workspace<T>(Slot::kColumns, s.buffer);
    T* out = workspace<T>(Slot::kProducts, kg * s.span);
    int64_t padded = -1;  // the image and group in xp
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / splits, part = item % splits;
      const int64_t n = image / g.groups, group = image % g.groups;
      const int64_t k0 = std::min(kg, blocks * part / splits * 8), k1 = std::min(kg, blocks * (part + 1) / splits * 8);
      if (image != padded) {
        pad_planes(x + (n * g.channels + group * cg) * g.in_plane(), g, s, cg, xp);
        padded = image;
      }
      forward_group_tiered(xp, w + (group * kg + k0) * cg * taps, cg, k1 - k0, s, taps, out);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t channel = group * kg + k;
        const T b = bias != nullptr ? bias[channel] : T(0);
        T* dst = y + (n * g.out_channels + channel) * g.out_plane();
        const T* src = out + (k - k0) * s.span;
        for (int64_t p = 0; p < g.out_plane(); ++p) {
          dst[p] = src[s.where[p]] + b;
        }
      }
    }
  });
}

// ∂L/∂X's convolution: ∂L/∂Y padded by d·(K − 1) − pad, the filters turned around.
Conv2dGeometry turned(const Conv2dGeometry& g) {
  Conv2dGeometry t = g;
  t.channels = g.out_channels;
  t.out_channels = g.channels;
  t.height = g.out_height;
  t.width = g.out_width;
  t.pad_h = g.dilation_h * (g.kernel_h - 1) - g.pad_h;
  t.pad_w = g.dilation_w * (g.kernel_w - 1) - g.pad_w;
  t.out_height = g.height;
  t.out_width = g.width;
  return t;
}

template <typename T>
void backward_input(const T* dy, const T* w, const Conv2dGeometry& g, T* dx) {
  const int64_t cg = g.in_channels_per_group(), kg = g.out_channels_per_group();
  const int64_t kh = g.kernel_h, kw = g.kernel_w;
  // wt[group, c, k, p, q] = w[group, k, c, KH − 1 − p, KW − 1 − q]
  std::vector<T> wt(g.out_channels * cg * kh * kw);
  for (int64_t group = 0; group < g.groups; ++group) {
    for (int64_t k = 0; k < kg; ++k) {
      for (int64_t c = 0; c < cg; ++c) {
        const T* src = w + ((group * kg + k) * cg + c) * kh * kw;
        T* dst = wt.data() + ((group * cg + c) * kg + k) * kh * kw;
        for (int64_t t = 0; t < kh * kw; ++t) {
          dst[t] = src[kh * kw - 1 - t];
        }
      }
    }
  }
  forward<T>(dy, wt.data(), nullptr, turned(g), dx);
}

// Whether xp[0, n) holds only finite values (v − v is 0 for those, NaN for ±inf and NaN).
template <typename T>
bool all_finite(const T* __restrict xp, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite &= xp[i] - xp[i] == T(0);
  }
  return finite;
}

// One image's group, summed over the output pixels alone: where an input holds ±inf or NaN, the
// grid's dropped columns (∂L/∂Y zero there) would add 0 · inf = NaN to taps that never read it.
template <typename T>
void weight_group_exact(const T* dy, const T* xp, int64_t cg, int64_t kg, const Conv2dGeometry& g, const Grid& s,
                        T* dw) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  for (int64_t k = 0; k < kg; ++k) {
    for (int64_t c = 0; c < cg; ++c) {
      for (int64_t t = 0; t < taps; ++t) {
        T sum = 0;
        for (int64_t i = 0; i < g.out_height; ++i) {
          const T* d = dy + k * g.out_plane() + i * g.out_width;
          const T* x = xp + c * s.plane + i * s.wp + s.offsets[t];
          for (int64_t j = 0; j < g.out_width; ++j) {
            sum += d[j] * x[j];
          }
        }
        dw[(k * cg + c) * taps + t] += sum;
      }
    }
  }
}

template <typename T>
void backward_weight(const T* dy, const T* x, const Conv2dGeometry& g, T* dw) {
  const Grid s(g, vector_lanes<T>(), 1);
  const int64_t cg = g.in_channels_per_group(), kg = g.out_channels_per_group();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t size = g.out_channels * cg * taps;
  // Images per pass: their padded inputs and spread gradients within about kPassBytes (L2).
  constexpr int64_t kPassBytes = int64_t{512} << 10;
  const int64_t x_stride = s.buffer, dy_stride = kg * s.span;
  const int64_t per_pass = std::clamp<int64_t>(kPassBytes / ((x_stride + dy_stride) * int64_t(sizeof(T))), 1, 16);
  const int64_t chunks = parallel_chunks(g.batch);
  std::vector<T> partial(chunks * size, T(0));
  for_each_chunk(g.batch, [&](int64_t chunk, int64_t begin, int64_t end) {
    T* xp = workspace<T>(Slot::kColumns, per_pass * x_stride);
    T* spread = workspace<T>(Slot::kGrads, per_pass * dy_stride);
    T* sums = partial.data() + chunk * size;
    for (int64_t group = 0; group < g.groups; ++group) {
      T* dw_group = sums + group * kg * cg * taps;
      int64_t held = 0;  // images in the buffers
      for (int64_t n = begin; n < end; ++n) {
        T* x_slot = xp + held * x_stride;
        pad_planes(x + (n * g.channels + group * cg) * g.in_plane(), g, s, cg, x_slot);
        const T* dy_group = dy + (n * g.out_channels + group * kg) * g.out_plane();
        if (!all_finite(x_slot, s.buffer)) {
          weight_group_exact(dy_group, x_slot, cg, kg, g, s, dw_group);
        } else {
          T* dy_slot = spread + held * dy_stride;
          std::fill(dy_slot, dy_slot + dy_stride, T(0));
          for (int64_t k = 0; k < kg; ++k) {
            for (int64_t p = 0; p < g.out_plane(); ++p) {
              dy_slot[k * s.span + s.where[p]] = dy_group[k * g.out_plane() + p];
            }
          }
          ++held;
        }
        if (held == per_pass || (n + 1 == end && held > 0)) {
          weight_group_tiered(spread, xp, cg, kg, s, Images{held, x_stride, dy_stride}, taps, dw_group);
          held = 0;
        }
      }
    }
  });
  for (int64_t i = 0; i < size; ++i) {
    T sum = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      sum += partial[chunk * size + i];
    }
    dw[i] = sum;
  }
}

}  // namespace

void direct_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const Conv2dGeometry& g, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::direct_forward", [&] {
    forward<scalar_t>(input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                      bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, g,
                      output.mutable_data_ptr<scalar_t>());
  });
}

void direct_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                           at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "torchcnn::direct_backward_input", [&] {
    backward_input<scalar_t>(grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), g,
                             grad_input.mutable_data_ptr<scalar_t>());
  });
}

void direct_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                            at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::direct_backward_weight", [&] {
    backward_weight<scalar_t>(grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), g,
                              grad_weight.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace torchcnn::cpu
