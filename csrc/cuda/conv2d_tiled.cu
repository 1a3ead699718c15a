// conv2d's tiled forward on CUDA: the convolution as a direct, tiled product in shared memory, with
// the bias, the design notes' ReLU and their 2×2 max pool applied to the tile before it leaves the
// block, so that conv2d, conv2d_relu and conv2d_relu_max_pool2d are each one kernel launch and
// neither the convolution's output nor any column buffer goes through device memory.
//
// A block computes one tile: kTileK output channels of one group of one image, over kTileH × kTileW
// output pixels. It walks the group's input channels in chunks; for each chunk it stages in shared
// memory the input patch the tile reads (zeros where the window hangs over the padding) and the
// chunk's taps of its kTileK filters, then each thread adds its share of
//   Y[n, k, i, j] = b[k] + Σ_c Σ_p Σ_q X[n, c, i·s + p·d − pad, j·s + q·d − pad] · W[k, c, p, q]
// into registers: 4 neighbouring pixels of one row × 8 channels, 32 sums, so that each value read
// from shared memory feeds 4 or 8 products. Sums are in at::opmath_type (float for half types) and
// rounded to the input's dtype once, as the GEMM route's are.
//
// The same kernel computes ∂X of a stride-1 convolution, as the convolution of ∂Y with the
// filters turned around (conv2d_tiled_grad_input; it reads the forward's filters that way as it
// stages them). ∂W has a kernel of its own below.
//
// The epilogue: conv2d writes Y; conv2d_relu writes relu(Y) and where the gradient passes;
// conv2d_relu_max_pool2d writes the rounded Y of the tile back to shared memory and pools relu(Y)
// there (max_pool2d_window.h's scan, exactly as the separate ops do), writing the max, its index in
// Y's plane and whether the gradient passes at it. Tiles start at even rows and columns, so every
// 2×2 window lies in one tile.
//
// Indices are 32-bit wherever fits_int32 allows it (launch.cuh), 64-bit otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <limits>

#include "../max_pool2d_window.h"
#include "../relu.h"
#include "../shapes.h"
#include "conv2d.cuh"
#include "launch.cuh"

namespace torchcnn {
namespace {

using TORCHCNN_CUDA_SHARED::ForwardRoute;
using TORCHCNN_CUDA_SHARED::TiledEpilogue;

constexpr int kTileH = 8, kTileW = 16, kTileK = 16;
constexpr int kPixelsPerThread = 4, kChannelsPerThread = 8;
constexpr int kColumnGroups = kTileW / kPixelsPerThread;                             // 4
constexpr int kTiledThreads = kTileH * kColumnGroups * (kTileK / kChannelsPerThread);  // 64
// Shared memory one chunk of input channels may take (the rest of the 48 KiB is left so that
// several blocks share a multiprocessor).
constexpr int64_t kChunkBytes = 16 * 1024;

// What the host works out once per launch: the chunking of the input channels and the grid.
struct TiledPlan {
  int64_t chunk;                    // input channels per shared-memory stage
  int64_t patch_h, patch_w;         // the input rows and columns a tile reads
  int64_t tiles_h, tiles_w, tiles_k;
  int64_t tiles;                    // N · groups · tiles_k · tiles_h · tiles_w
  int64_t shared_bytes;
  // The filters are a forward's, read turned around: ∂L/∂X's convolution (conv2d_tiled_grad_input).
  bool turned = false;
};

// Knobs for the tests (process-wide): a forward route forced wherever it applies, and 64-bit
// indices forced for every kernel (fits_int32, launch.cuh).
std::atomic<int> forced_route{-1};
std::atomic<bool> force_64bit{false};

int64_t patch_extent(int64_t tile, int64_t stride, int64_t kernel, int64_t dilation) {
  return (tile - 1) * stride + dilated_extent(kernel, dilation);
}

int64_t shared_bytes_per_channel(const Conv2dGeometry& g, int64_t acc_size) {
  const int64_t patch = patch_extent(kTileH, g.stride_h, g.kernel_h, g.dilation_h) *
      patch_extent(kTileW, g.stride_w, g.kernel_w, g.dilation_w);
  return (patch + g.kernel_h * g.kernel_w * kTileK) * acc_size;
}

TiledPlan tiled_plan(const Conv2dGeometry& g, int64_t acc_size, bool pools) {
  TiledPlan plan;
  const int64_t per_channel = shared_bytes_per_channel(g, acc_size);
  plan.chunk = std::max<int64_t>(1, std::min(g.in_channels_per_group(), kChunkBytes / per_channel));
  plan.patch_h = patch_extent(kTileH, g.stride_h, g.kernel_h, g.dilation_h);
  plan.patch_w = patch_extent(kTileW, g.stride_w, g.kernel_w, g.dilation_w);
  plan.tiles_h = (g.out_height + kTileH - 1) / kTileH;
  plan.tiles_w = (g.out_width + kTileW - 1) / kTileW;
  plan.tiles_k = (g.out_channels_per_group() + kTileK - 1) / kTileK;
  plan.tiles = g.batch * g.groups * plan.tiles_k * plan.tiles_h * plan.tiles_w;
  // The pool's epilogue reuses the patch's memory for the tile of Y.
  const int64_t tile_of_y = pools ? int64_t{kTileK} * kTileH * kTileW * acc_size : 0;
  plan.shared_bytes = std::max(plan.chunk * per_channel, tile_of_y);
  return plan;
}

// The tile of Y in shared memory, read at Y's own (h, w) (max_pool2d_window.h's window_max_of).
template <typename acc_t>
struct TileAt {
  const acc_t* tile;
  int64_t h0, w0, width;

  C10_HOST_DEVICE acc_t operator()(int64_t h, int64_t w) const { return tile[(h - h0) * width + w - w0]; }
};

template <typename scalar_t, typename index_t, TiledEpilogue epilogue>
__global__ void __launch_bounds__(kTiledThreads) conv2d_tiled_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, int64_t* __restrict__ indices, bool* __restrict__ passes, Conv2dGeometry geometry,
    Window2d pool, TiledPlan plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = geometry.channels, H = geometry.height, W = geometry.width;
  const index_t K = geometry.out_channels, OH = geometry.out_height, OW = geometry.out_width;
  const index_t KH = geometry.kernel_h, KW = geometry.kernel_w;
  const index_t sh = geometry.stride_h, sw = geometry.stride_w, dh = geometry.dilation_h, dw = geometry.dilation_w;
  const index_t groups = geometry.groups, cg = C / groups, mg = K / groups;
  const index_t patch_h = plan.patch_h, patch_w = plan.patch_w, taps = KH * KW;
  const index_t tiles_h = plan.tiles_h, tiles_w = plan.tiles_w, tiles_k = plan.tiles_k;

  acc_t* patch = shared_memory<acc_t>();                     // chunk × patch_h × patch_w
  acc_t* filters = patch + plan.chunk * patch_h * patch_w;  // chunk × KH × KW × kTileK
  acc_t* tile_of_y = patch;                                  // kTileK × kTileH × kTileW (pool only)

  const int t = threadIdx.x;
  const int columns = t % kColumnGroups * kPixelsPerThread;  // the thread's first column in the tile
  const int row = t / kColumnGroups % kTileH;
  const int channels = t / (kColumnGroups * kTileH) * kChannelsPerThread;  // its first channel

  for (index_t tile = blockIdx.x; tile < static_cast<index_t>(plan.tiles); tile += gridDim.x) {
    const index_t ow0 = tile % tiles_w * kTileW;
    const index_t oh0 = tile / tiles_w % tiles_h * kTileH;
    index_t rest = tile / (tiles_w * tiles_h);
    const index_t kt = rest % tiles_k;
    rest /= tiles_k;
    const index_t group = rest % groups;
    const index_t n = rest / groups;
    const index_t k0 = group * mg + kt * kTileK;  // the tile's first output channel
    const index_t k_count = mg - kt * kTileK < kTileK ? mg - kt * kTileK : kTileK;
    const index_t ih0 = oh0 * sh - static_cast<index_t>(geometry.pad_h);
    const index_t iw0 = ow0 * sw - static_cast<index_t>(geometry.pad_w);

    acc_t sums[kPixelsPerThread][kChannelsPerThread];
    for (int i = 0; i < kChannelsPerThread; ++i) {
      const index_t k = channels + i;
      const acc_t b = bias != nullptr && k < k_count ? static_cast<acc_t>(bias[k0 + k]) : acc_t(0);
      for (int j = 0; j < kPixelsPerThread; ++j) {
        sums[j][i] = b;
      }
    }

    for (index_t c0 = 0; c0 < cg; c0 += plan.chunk) {
      const index_t chunk = cg - c0 < plan.chunk ? cg - c0 : static_cast<index_t>(plan.chunk);
      const scalar_t* xc = x + (n * C + group * cg + c0) * H * W;
      for (index_t e = t; e < chunk * patch_h * patch_w; e += kTiledThreads) {
        const index_t c = e / (patch_h * patch_w);
        const index_t h = ih0 + e / patch_w % patch_h;
        const index_t w = iw0 + e % patch_w;
        const bool inside = h >= 0 && h < H && w >= 0 && w < W;
        patch[e] = inside ? static_cast<acc_t>(xc[(c * H + h) * W + w]) : acc_t(0);
      }
      for (index_t e = t; e < chunk * taps * kTileK; e += kTiledThreads) {
        const index_t k = e % kTileK;
        const index_t c = e / (taps * kTileK);
        const index_t tap = e / kTileK % taps;
        // Turned: this convolution's input channel c0 + c is the forward's output channel and its
        // output k0 + k the forward's input channel, in the same group; the taps run backwards.
        const index_t from = plan.turned ? ((group * cg + c0 + c) * mg + k0 + k - group * mg) * taps + taps - 1 - tap
                                         : ((k0 + k) * cg + c0 + c) * taps + tap;
        filters[e] = k < k_count ? static_cast<acc_t>(weight[from]) : acc_t(0);
      }
      __syncthreads();
      for (index_t c = 0; c < chunk; ++c) {
        for (index_t p = 0; p < KH; ++p) {
          const acc_t* x_row = patch + (c * patch_h + row * sh + p * dh) * patch_w + columns * sw;
          const acc_t* f_row = filters + (c * taps + p * KW) * kTileK + channels;
          for (index_t q = 0; q < KW; ++q) {
            acc_t xs[kPixelsPerThread], fs[kChannelsPerThread];
            for (int j = 0; j < kPixelsPerThread; ++j) {
              xs[j] = x_row[j * sw + q * dw];
            }
            for (int i = 0; i < kChannelsPerThread; ++i) {
              fs[i] = f_row[q * kTileK + i];
            }
            for (int j = 0; j < kPixelsPerThread; ++j) {
              for (int i = 0; i < kChannelsPerThread; ++i) {
                sums[j][i] += xs[j] * fs[i];
              }
            }
          }
        }
      }
      __syncthreads();  // before the next chunk (or the pool's tile) overwrites the patch
    }

    const index_t oh = oh0 + row;
    if constexpr (epilogue != TiledEpilogue::kReluMaxPool) {
      for (int i = 0; i < kChannelsPerThread; ++i) {
        for (int j = 0; j < kPixelsPerThread; ++j) {
          const index_t ow = ow0 + columns + j;
          if (channels + i < k_count && oh < OH && ow < OW) {
            const index_t o = ((n * K + k0 + channels + i) * OH + oh) * OW + ow;
            const scalar_t y = static_cast<scalar_t>(sums[j][i]);
            if constexpr (epilogue == TiledEpilogue::kRelu) {
              const bool pass = relu_passes(static_cast<acc_t>(y));
              out[o] = pass ? y : scalar_t(0);
              passes[o] = pass;
            } else {
              out[o] = y;
            }
          }
        }
      }
    } else {
      for (int i = 0; i < kChannelsPerThread; ++i) {
        for (int j = 0; j < kPixelsPerThread; ++j) {
          tile_of_y[((channels + i) * kTileH + row) * kTileW + columns + j] =
              static_cast<acc_t>(static_cast<scalar_t>(sums[j][i]));
        }
      }
      __syncthreads();
      constexpr int kPooledH = kTileH / 2, kPooledW = kTileW / 2;
      const index_t POH = pool.out_height, POW = pool.out_width;
      for (int e = t; e < kTileK * kPooledH * kPooledW; e += kTiledThreads) {
        const index_t k = e / (kPooledH * kPooledW);
        const index_t ph = oh0 / 2 + e / kPooledW % kPooledH;
        const index_t pw = ow0 / 2 + e % kPooledW;
        if (k < k_count && ph < POH && pw < POW) {
          const TileAt<acc_t> y_at{tile_of_y + k * kTileH * kTileW, oh0, ow0, kTileW};
          scalar_t value;
          int64_t index;
          window_max_of(y_at, pool, ph, pw, value, index, Relu{});
          const index_t o = ((n * K + k0 + k) * POH + ph) * POW + pw;
          out[o] = value;
          indices[o] = index;
          passes[o] = relu_passes(y_at(index / OW, index % OW));
        }
      }
      __syncthreads();  // before the next tile's patch overwrites the tile of Y
    }
  }
}

// ∂L/∂W as one product over the whole batch, without columns in memory:
//   ∂W[k, c, p, q] = Σ_n Σ_i Σ_j ∂L/∂Y[n, k, i, j] · X[n, c, i·s + p·d − pad, j·s + q·d − pad],
// a GEMM of M = K/g channels by N = C/g·KH·KW taps, summed over the R = N·OH·OW output pixels. A
// block computes kWeightTileM × kWeightTileN of it over one slice of the pixels, staging
// kWeightTileR pixels at a time: the ∂L/∂Y rows as they are, the X entries gathered (the im2col
// entries, built in shared memory only). Each thread sums 4 channels × 2 taps. The slices' partial
// sums go to a buffer that one sum over the slices reduces, in a fixed order: deterministic on one
// GPU model (the number of slices follows its multiprocessor count).
constexpr int kWeightTileM = 16, kWeightTileN = 32, kWeightTileR = 32;
constexpr int kWeightRowStride = kWeightTileR + 1;  // padded: the threads of a warp hit distinct banks
constexpr int kWeightThreads = 64;                  // (16 / 4) × (32 / 2)

struct WeightPlan {
  int64_t tiles_m, tiles_n, slices, slice_pixels, tiles;
};

// The plan of a non-empty batch.
WeightPlan weight_plan(const Conv2dGeometry& g) {
  WeightPlan plan;
  plan.tiles_m = (g.out_channels_per_group() + kWeightTileM - 1) / kWeightTileM;
  plan.tiles_n = (g.group_kernel_size() + kWeightTileN - 1) / kWeightTileN;
  const int64_t pixels = g.batch * g.out_plane();
  const int64_t stages = (pixels + kWeightTileR - 1) / kWeightTileR;
  const int64_t tiles = g.groups * plan.tiles_m * plan.tiles_n;
  // Enough slices to give the grid max_blocks() blocks, each of at least one stage.
  plan.slices = std::max<int64_t>(1, std::min(stages, max_blocks() / tiles));
  plan.slice_pixels = (stages + plan.slices - 1) / plan.slices * kWeightTileR;
  plan.slices = (pixels + plan.slice_pixels - 1) / plan.slice_pixels;  // none left empty
  plan.tiles = tiles * plan.slices;
  return plan;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWeightThreads) conv2d_tiled_grad_weight_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ x,
    at::opmath_type<scalar_t>* __restrict__ partial, Conv2dGeometry geometry, WeightPlan plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = geometry.channels, H = geometry.height, W = geometry.width, K = geometry.out_channels;
  const index_t OW = geometry.out_width, plane = geometry.out_height * geometry.out_width;
  const index_t KW = geometry.kernel_w, taps = geometry.kernel_h * geometry.kernel_w;
  const index_t sh = geometry.stride_h, sw = geometry.stride_w, dh = geometry.dilation_h, dw = geometry.dilation_w;
  const index_t ph = geometry.pad_h, pw = geometry.pad_w;
  const index_t groups = geometry.groups, cg = C / groups, mg = K / groups, columns = cg * taps;
  const index_t pixels = geometry.batch * plane, slices = plan.slices;
  const index_t tiles_m = plan.tiles_m, tiles_n = plan.tiles_n;

  acc_t* dy_tile = shared_memory<acc_t>();                         // kWeightTileM rows of pixels
  acc_t* x_tile = dy_tile + kWeightTileM * kWeightRowStride;       // kWeightTileN rows of pixels
  const int t = threadIdx.x;
  const int m_part = t % (kWeightTileM / 4) * 4;  // the thread's 4 channels
  const int n_part = t / (kWeightTileM / 4) * 2;  // … and 2 taps

  for (index_t tile = blockIdx.x; tile < static_cast<index_t>(plan.tiles); tile += gridDim.x) {
    const index_t slice = tile % slices;
    const index_t nt = tile / slices % tiles_n;
    const index_t mt = tile / (slices * tiles_n) % tiles_m;
    const index_t group = tile / (slices * tiles_n * tiles_m);
    const index_t k0 = group * mg + mt * kWeightTileM;
    const index_t k_count = mg - mt * kWeightTileM < kWeightTileM ? mg - mt * kWeightTileM : kWeightTileM;
    const index_t col0 = nt * kWeightTileN;
    const index_t col_count = columns - col0 < kWeightTileN ? columns - col0 : kWeightTileN;
    const index_t r_begin = slice * static_cast<index_t>(plan.slice_pixels);
    const index_t r_end = pixels - r_begin < plan.slice_pixels ? pixels : r_begin + static_cast<index_t>(plan.slice_pixels);

    acc_t sums[4][2] = {};
    for (index_t r0 = r_begin; r0 < r_end; r0 += kWeightTileR) {
      for (int e = t; e < kWeightTileM * kWeightTileR; e += kWeightThreads) {
        const int m = e / kWeightTileR, r = e % kWeightTileR;
        const index_t pixel = r0 + r;
        acc_t value = 0;
        if (m < k_count && pixel < r_end) {
          const index_t n = pixel / plane;
          value = static_cast<acc_t>(grad_output[(n * K + k0 + m) * plane + pixel % plane]);
        }
        dy_tile[m * kWeightRowStride + r] = value;
      }
      for (int e = t; e < kWeightTileN * kWeightTileR; e += kWeightThreads) {
        const int col = e / kWeightTileR, r = e % kWeightTileR;
        const index_t pixel = r0 + r;
        acc_t value = 0;
        if (col < col_count && pixel < r_end) {
          const index_t n = pixel / plane, ij = pixel % plane;
          const index_t c = (col0 + col) / taps, tap = (col0 + col) % taps;
          const index_t h = ij / OW * sh - ph + tap / KW * dh;
          const index_t w = ij % OW * sw - pw + tap % KW * dw;
          if (h >= 0 && h < H && w >= 0 && w < W) {
            value = static_cast<acc_t>(x[((n * C + group * cg + c) * H + h) * W + w]);
          }
        }
        x_tile[col * kWeightRowStride + r] = value;
      }
      __syncthreads();
      for (int r = 0; r < kWeightTileR; ++r) {
        acc_t a[4], b[2];
        for (int i = 0; i < 4; ++i) {
          a[i] = dy_tile[(m_part + i) * kWeightRowStride + r];
        }
        for (int j = 0; j < 2; ++j) {
          b[j] = x_tile[(n_part + j) * kWeightRowStride + r];
        }
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 2; ++j) {
            sums[i][j] += a[i] * b[j];
          }
        }
      }
      __syncthreads();  // before the next stage overwrites the tiles
    }
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 2; ++j) {
        if (m_part + i < k_count && n_part + j < col_count) {
          partial[(slice * K + k0 + m_part + i) * columns + col0 + n_part + j] = sums[i][j];
        }
      }
    }
  }
}

// Its tensors (Y's size before any pool) and the tile counter of its grid-stride loop: a forward's,
// or ∂X's turned convolution's.
bool tiled_fits_int32(const Conv2dGeometry& g, const TiledPlan& plan) {
  return TORCHCNN_CUDA_SHARED::fits_int32(g, {g.batch * g.channels * g.in_plane(),
                                              g.out_channels * g.group_kernel_size(),
                                              g.batch * g.out_channels * g.out_plane(), plan.tiles + max_blocks()});
}

template <TiledEpilogue epilogue>
void launch_tiled(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                  int64_t* indices, bool* passes, const Conv2dGeometry& g, const Window2d& pool, bool turned = false) {
  const auto acc_size = at::elementSize(at::toOpMathType(input.scalar_type()));
  TiledPlan plan = tiled_plan(g, acc_size, epilogue == TiledEpilogue::kReluMaxPool);
  plan.turned = turned;
  if (plan.tiles == 0) {
    return;
  }
  const auto blocks = static_cast<unsigned int>(std::min(plan.tiles, max_blocks()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::conv2d_tiled", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    with_index_type(tiled_fits_int32(g, plan), [&](auto i) {
      launch_shared(conv2d_tiled_kernel<scalar_t, decltype(i), epilogue>, blocks, kTiledThreads, plan.shared_bytes,
                    input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
                    out.mutable_data_ptr<scalar_t>(), indices, passes, g, pool, plan);
    });
  });
}

const char* const kRouteNames[] = {"direct", "tiled", "gemm"};

// torch.ops.torchcnn._cuda_conv2d_force_route(name) -> the previous one: the CUDA forward takes
// route `name` ("direct", "tiled" or "gemm") wherever it applies, or follows the rule ("").
std::string force_route(const std::string& name) {
  int wanted = -1;
  for (int i = 0; i < 3; ++i) {
    wanted = name == kRouteNames[i] ? i : wanted;
  }
  TORCH_CHECK_VALUE(wanted >= 0 || name.empty(), "_cuda_conv2d_force_route: expected name to be 'direct', "
                    "'tiled', 'gemm' or '' (the rule) but got '", name, "'");
  const int previous = forced_route.exchange(wanted);
  return previous < 0 ? "" : kRouteNames[previous];
}

// torch.ops.torchcnn._cuda_force_64bit_indices(on) -> the previous setting (tests only).
bool set_force_64bit(bool on) { return force_64bit.exchange(on); }

}  // namespace

namespace TORCHCNN_CUDA_SHARED {

// launch.cuh says what it checks.
bool fits_int32(const Window2d& g, std::initializer_list<int64_t> counts) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  return !force_64bit.load() &&
      std::all_of(counts.begin(), counts.end(), [&](int64_t count) { return count <= limit; }) &&
      g.height + 2 * g.pad_h <= limit && g.width + 2 * g.pad_w <= limit && g.stride_h <= limit &&
      g.stride_w <= limit && g.dilation_h <= limit && g.dilation_w <= limit &&
      dilated_extent(g.kernel_h, g.dilation_h) <= limit && dilated_extent(g.kernel_w, g.dilation_w) <= limit;
}

ForwardRoute forward_route(const Conv2dGeometry& g, at::ScalarType dtype) {
  const int64_t acc_size = at::elementSize(at::toOpMathType(dtype));
  const bool direct = g.in_channels_per_group() == 1;
  const bool tiled = shared_bytes_per_channel(g, acc_size) <= static_cast<int64_t>(kMaxSharedBytes);
  const int forced = forced_route.load();
  if (forced == static_cast<int>(ForwardRoute::kGemm) || (forced == static_cast<int>(ForwardRoute::kDirect) && direct) ||
      (forced == static_cast<int>(ForwardRoute::kTiled) && tiled)) {
    return static_cast<ForwardRoute>(forced);
  }
  // One input channel and fewer output channels than a tile holds per group (depthwise): a thread
  // per output, nothing to stage.
  if (direct && g.out_channels_per_group() < kTileK) {
    return ForwardRoute::kDirect;
  }
  // A thin product (C/g · KH · KW ≤ 512, the MNIST model's layers, the first layers of most
  // models): tiles in shared memory, no columns. A deeper one: im2col and cuBLAS, whose tiles pay
  // for the columns' round trip. An estimate, until a GPU times both.
  if (tiled && g.group_kernel_size() <= 512) {
    return ForwardRoute::kTiled;
  }
  return ForwardRoute::kGemm;
}

void conv2d_tiled(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const Conv2dGeometry& g, TiledEpilogue epilogue, at::Tensor& out, at::Tensor* indices,
                  at::Tensor* passes, const Window2d* pool) {
  const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  bool* passes_data = passes != nullptr ? passes->mutable_data_ptr<bool>() : nullptr;
  switch (epilogue) {
    case TiledEpilogue::kNone:
      launch_tiled<TiledEpilogue::kNone>(x, w, b, out, nullptr, nullptr, g, g);
      break;
    case TiledEpilogue::kRelu:
      launch_tiled<TiledEpilogue::kRelu>(x, w, b, out, nullptr, passes_data, g, g);
      break;
    case TiledEpilogue::kReluMaxPool:
      launch_tiled<TiledEpilogue::kReluMaxPool>(x, w, b, out, indices->mutable_data_ptr<int64_t>(), passes_data, g,
                                                *pool);
      break;
  }
}

bool conv2d_tiled_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                             at::Tensor& grad_input) {
  const int64_t reach_h = g.dilation_h * (g.kernel_h - 1), reach_w = g.dilation_w * (g.kernel_w - 1);
  if (g.stride_h != 1 || g.stride_w != 1 || g.pad_h > reach_h || g.pad_w > reach_w) {
    return false;
  }
  Conv2dGeometry t = g;  // ∂L/∂Y (N, K, OH, OW) ⋆ W' → ∂L/∂X (N, C, H, W)
  t.channels = g.out_channels;
  t.height = g.out_height;
  t.width = g.out_width;
  t.pad_h = reach_h - g.pad_h;
  t.pad_w = reach_w - g.pad_w;
  t.out_channels = g.channels;
  t.out_height = g.height;
  t.out_width = g.width;
  // The same rule as every forward, on this convolution's own depth (K/g · KH · KW) and outputs.
  if (forward_route(t, grad_output.scalar_type()) != ForwardRoute::kTiled) {
    return false;
  }
  // W' is W read turned around by the kernel itself: no copy, no launch.
  launch_tiled<TiledEpilogue::kNone>(grad_output.contiguous(), weight.contiguous(), at::Tensor(), grad_input, nullptr,
                                     nullptr, t, t, /*turned=*/true);
  return true;
}

at::Tensor conv2d_tiled_grad_weight(const at::Tensor& grad_output_, const at::Tensor& input_, const Conv2dGeometry& g) {
  const auto acc_type = at::toOpMathType(input_.scalar_type());
  const auto options = input_.options().dtype(acc_type);
  if (g.batch == 0) {
    return at::zeros({g.out_channels, g.group_kernel_size()}, options);
  }
  const WeightPlan plan = weight_plan(g);
  const auto grad_output = grad_output_.contiguous();
  const auto input = input_.contiguous();
  auto partial = at::empty({plan.slices, g.out_channels, g.group_kernel_size()}, options);
  const auto blocks = static_cast<unsigned int>(std::min(plan.tiles, max_blocks()));
  const size_t shared_bytes = (kWeightTileM + kWeightTileN) * kWeightRowStride * at::elementSize(acc_type);
  // The tile counter of the grid-stride loop, and the pixel counter of the stage loop (which may
  // step past the end by a stage), with the tensors.
  const bool small = fits_int32(g, {input.numel(), grad_output.numel(), partial.numel(), plan.tiles + max_blocks(),
                                    g.batch * g.out_plane() + kWeightTileR});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::conv2d_tiled_grad_weight",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(small, [&](auto i) {
      launch_shared(conv2d_tiled_grad_weight_kernel<scalar_t, decltype(i)>, blocks, kWeightThreads, shared_bytes,
                    grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                    partial.mutable_data_ptr<acc_t>(), g, plan);
    });
  });
  return plan.slices == 1 ? partial[0] : partial.sum(0);
}

}  // namespace TORCHCNN_CUDA_SHARED

namespace {

// torch.ops.torchcnn._cuda_conv2d_route(input, weight, stride, padding, dilation, groups): the
// route the forward takes for these arguments now ("direct", "tiled", "tiled64" — the tiled kernel
// on 64-bit indices — or "gemm"), for the tests and benchmarks.
std::string route_of(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry("_cuda_conv2d_route", input, weight, std::nullopt, stride, padding, dilation, groups);
  const auto route = TORCHCNN_CUDA_SHARED::forward_route(g, input.scalar_type());
  if (route == ForwardRoute::kTiled) {
    const auto acc_size = at::elementSize(at::toOpMathType(input.scalar_type()));
    return tiled_fits_int32(g, tiled_plan(g, acc_size, false)) ? "tiled" : "tiled64";
  }
  return kRouteNames[static_cast<int>(route)];
}

}  // namespace

TORCHCNN_LIBRARY_FRAGMENT(m) {
  m.def("_cuda_conv2d_route(Tensor input, Tensor weight, int[] stride, int[] padding, int[] dilation, int groups) "
        "-> str", &route_of);
  m.def("_cuda_conv2d_force_route(str name) -> str", &force_route);
  m.def("_cuda_force_64bit_indices(bool on) -> bool", &set_force_64bit);
}

}  // namespace torchcnn
