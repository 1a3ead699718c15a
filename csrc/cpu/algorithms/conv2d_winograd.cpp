// conv2d by Winograd's minimal filtering F(2×2, 3×3), for 3×3, stride-1, undilated, ungrouped
// convolutions (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//
// The output is cut into 2×2 tiles; tile t reads the 4×4 input patch d_c starting at its top-left
// pixel minus the padding. With the constant matrices
//   Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1],  G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],
//   Aᵀ = [1 1 1 0; 0 1 −1 −1],
// the tile of output channel k is
//   Y_k = Aᵀ [ Σ_c (G W_kc Gᵀ) ⊙ (Bᵀ d_c B) ] A (+ b_k),
// exactly the design notes' 3×3 sum (an algebraic identity; only rounding differs). Written per
// position ξ of the 4×4 transformed tile, the channel sum is a matrix product:
//   M[ξ] (K × tiles) = U[ξ] (K × C) · V[ξ] (C × tiles),   U = G W Gᵀ,   V = Bᵀ d B,
// 16 GEMMs with 16·K·C multiply-adds per tile where im2col needs 36·K·C for its four pixels: 2.25×
// fewer. Threads take contiguous ranges of images, in blocks small enough for the transformed tiles
// to stay in cache between the transforms and the GEMMs.
//
// ∂L/∂X is itself a 3×3, stride-1 convolution: of ∂L/∂Y, padded by 2 − pad, with the filters
// flipped and their channels swapped, W'[c, k, p, q] = W[k, c, 2 − p, 2 − q]. ∂L/∂W is the exact
// adjoint of the forward: ∂L/∂U[ξ] = Σ_t ∂L/∂M[ξ][·][t] · V[ξ][·][t]ᵀ with ∂L/∂M = A ∂L/∂Y Aᵀ per
// tile, then ∂L/∂W = Gᵀ ∂L/∂U G.
// With inf or NaN inputs the transforms mix values that the direct sum keeps apart (inf − inf):
// outputs that should be ±inf can come out NaN, as with every Winograd implementation.
#include <torch/all.h>


#include <vector>

#include "../conv2d_algorithms.h"
#include "gemm.h"
#include "../simd.h"

namespace torchcnn::cpu {
namespace {

constexpr int64_t kTile = 2;    // output pixels per tile side
constexpr int64_t kPoints = 16; // positions ξ of a transformed tile

// row[ξ][c] = (G W_kc Gᵀ)[ξ] for one output channel's filters wk (C, 3, 3), all channels at once:
// vectorised across c (gathering each filter's taps).
template <typename T>
[[gnu::always_inline]] inline void filter_row(const T* __restrict wk, int64_t channels, T* __restrict row) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const T* g = wk + 9 * c;
    T a[4][3];  // G · g
    for (int j = 0; j < 3; ++j) {
      a[0][j] = g[j];
      a[1][j] = (g[j] + g[3 + j] + g[6 + j]) * T(0.5);
      a[2][j] = (g[j] - g[3 + j] + g[6 + j]) * T(0.5);
      a[3][j] = g[6 + j];
    }
    for (int r = 0; r < 4; ++r) {  // (G · g) · Gᵀ
      row[(4 * r + 0) * channels + c] = a[r][0];
      row[(4 * r + 1) * channels + c] = (a[r][0] + a[r][1] + a[r][2]) * T(0.5);
      row[(4 * r + 2) * channels + c] = (a[r][0] - a[r][1] + a[r][2]) * T(0.5);
      row[(4 * r + 3) * channels + c] = a[r][2];
    }
  }
}

TORCHCNN_TIERED(filter_row_tiered, filter_row, (const float* wk, int64_t channels, float* row), (wk, channels, row))
TORCHCNN_TIERED(filter_row_tiered, filter_row, (const double* wk, int64_t channels, double* row), (wk, channels, row))

// U[ξ][k][c] = (G W_kc Gᵀ)[ξ] for output channels [k0, k1) of weights (K, C, 3, 3). One output
// channel's 16 rows are built in `row` (16 × C) and copied out whole: written directly, the 16
// rows K·C apart would evict one another from cache.
template <typename T>
void transform_filters(const T* w, int64_t out_channels, int64_t channels, int64_t k0, int64_t k1, T* row, T* u) {
  for (int64_t k = k0; k < k1; ++k) {
    filter_row_tiered(w + 9 * k * channels, channels, row);
    for (int64_t xi = 0; xi < kPoints; ++xi) {
      std::copy(row + xi * channels, row + (xi + 1) * channels, u + (xi * out_channels + k) * channels);
    }
  }
}

// Where the tiles of one image lie: tiles_h × tiles_w tiles; tile (ty, tx) reads the 4×4 patch
// whose top-left input pixel is (2·ty − pad_h, 2·tx − pad_w) and writes the 2×2 output pixels
// from (2·ty, 2·tx) (those inside the output).
struct Tiling {
  int64_t channels, height, width, pad_h, pad_w;  // input (one image)
  int64_t out_channels, out_height, out_width;
  int64_t tiles_h, tiles_w;

  int64_t per_image() const { return tiles_h * tiles_w; }
  // The padded plane the tiles read: every patch inside it, zeros around the image, and rows long
  // enough for the vectorised transform's 16-tile loads.
  int64_t padded_h() const { return kTile * tiles_h + 2; }
  int64_t padded_w() const { return kTile * ((tiles_w + 15) / 16 * 16) + 2; }
  // The same for a plane of ∂L/∂Y (2·tiles_h rows).
  int64_t grad_w() const { return kTile * ((tiles_w + 15) / 16 * 16); }
};

// The transforms of one plane's tiles, written as loops over the tiles of a row so that the
// compiler vectorises them across tiles; compiled once per tier (simd.h's TORCHCNN_TIERED).

// V[ξ][t] (ξ ≥ 0 rows `step` apart) = (Bᵀ d_t B)[ξ] for the tiles t = ty·tiles_w + tx of a padded
// plane with rows `wp` apart.
template <typename T>
[[gnu::always_inline]] inline void input_tiles(const T* __restrict padded, int64_t wp, int64_t tiles_h,
                                               int64_t tiles_w, T* __restrict v, int64_t step) {
  for (int64_t ty = 0; ty < tiles_h; ++ty) {
    const T* r0 = padded + kTile * ty * wp;
    const T* r1 = r0 + wp;
    const T* r2 = r1 + wp;
    const T* r3 = r2 + wp;
    T* out = v + ty * tiles_w;
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      const int64_t x = kTile * tx;
      T r[4][4];  // Bᵀ · d, column by column
      for (int j = 0; j < 4; ++j) {
        r[0][j] = r0[x + j] - r2[x + j];
        r[1][j] = r1[x + j] + r2[x + j];
        r[2][j] = r2[x + j] - r1[x + j];
        r[3][j] = r1[x + j] - r3[x + j];
      }
      for (int i = 0; i < 4; ++i) {  // (Bᵀ · d) · B
        out[(4 * i + 0) * step + tx] = r[i][0] - r[i][2];
        out[(4 * i + 1) * step + tx] = r[i][1] + r[i][2];
        out[(4 * i + 2) * step + tx] = r[i][2] - r[i][1];
        out[(4 * i + 3) * step + tx] = r[i][1] - r[i][3];
      }
    }
  }
}

// The 2·tiles_h × 2·tiles_w output plane `o` = Aᵀ M_t A + b for the tiles t of one plane, M[ξ][t]
// rows `step` apart.
template <typename T>
[[gnu::always_inline]] inline void output_tiles(const T* __restrict m, int64_t step, T bias, int64_t tiles_h,
                                                int64_t tiles_w, T* __restrict o) {
  const int64_t ow = kTile * tiles_w;
  for (int64_t ty = 0; ty < tiles_h; ++ty) {
    const T* mt = m + ty * tiles_w;
    T* o0 = o + kTile * ty * ow;
    T* o1 = o0 + ow;
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      T a[2][4];  // Aᵀ · M
      for (int j = 0; j < 4; ++j) {
        const T m0 = mt[j * step + tx], m1 = mt[(4 + j) * step + tx];
        const T m2 = mt[(8 + j) * step + tx], m3 = mt[(12 + j) * step + tx];
        a[0][j] = m0 + m1 + m2;
        a[1][j] = m1 - m2 - m3;
      }
      o0[2 * tx] = a[0][0] + a[0][1] + a[0][2] + bias;  // (Aᵀ · M) · A
      o0[2 * tx + 1] = a[0][1] - a[0][2] - a[0][3] + bias;
      o1[2 * tx] = a[1][0] + a[1][1] + a[1][2] + bias;
      o1[2 * tx + 1] = a[1][1] - a[1][2] - a[1][3] + bias;
    }
  }
}

TORCHCNN_TIERED(input_tiles_f, input_tiles,
                (const float* padded, int64_t wp, int64_t th, int64_t tw, float* v, int64_t step),
                (padded, wp, th, tw, v, step))
TORCHCNN_TIERED(input_tiles_d, input_tiles,
                (const double* padded, int64_t wp, int64_t th, int64_t tw, double* v, int64_t step),
                (padded, wp, th, tw, v, step))
TORCHCNN_TIERED(output_tiles_f, output_tiles, (const float* m, int64_t step, float bias, int64_t th, int64_t tw, float* o),
                (m, step, bias, th, tw, o))
TORCHCNN_TIERED(output_tiles_d, output_tiles,
                (const double* m, int64_t step, double bias, int64_t th, int64_t tw, double* o),
                (m, step, bias, th, tw, o))

#if TORCHCNN_X86_TIERS
// input_tiles for float with AVX-512, 16 tiles of a row at a time: the even and odd columns of
// a patch row, d_0 … d_3 for all 16 tiles, are two deinterleaved pairs of loads.
TORCHCNN_TARGET_AVX512 void input_tiles_avx512(const float* padded, int64_t wp, int64_t tiles_h,
                                                            int64_t tiles_w, float* v, int64_t step) {
  for (int64_t ty = 0; ty < tiles_h; ++ty) {
    const float* rows = padded + kTile * ty * wp;
    float* out = v + ty * tiles_w;
    for (int64_t tx = 0; tx < tiles_w; tx += 16) {
      const __mmask16 lanes = first_lanes(tiles_w - tx);
      __m512 d[4][4];
      for (int i = 0; i < 4; ++i) {
        const float* row = rows + i * wp + kTile * tx;
        const __m512 a = _mm512_loadu_ps(row), b = _mm512_loadu_ps(row + 16);
        const __m512 c = _mm512_loadu_ps(row + 2), e = _mm512_loadu_ps(row + 18);
        d[i][0] = even_entries_avx512(a, b);
        d[i][1] = odd_entries_avx512(a, b);
        d[i][2] = even_entries_avx512(c, e);
        d[i][3] = odd_entries_avx512(c, e);
      }
      __m512 r[4][4];  // Bᵀ · d
      for (int j = 0; j < 4; ++j) {
        r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
        r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
        r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
        r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
      }
      for (int i = 0; i < 4; ++i) {  // (Bᵀ · d) · B
        _mm512_mask_storeu_ps(out + (4 * i + 0) * step + tx, lanes, _mm512_sub_ps(r[i][0], r[i][2]));
        _mm512_mask_storeu_ps(out + (4 * i + 1) * step + tx, lanes, _mm512_add_ps(r[i][1], r[i][2]));
        _mm512_mask_storeu_ps(out + (4 * i + 2) * step + tx, lanes, _mm512_sub_ps(r[i][2], r[i][1]));
        _mm512_mask_storeu_ps(out + (4 * i + 3) * step + tx, lanes, _mm512_sub_ps(r[i][1], r[i][3]));
      }
    }
  }
}
#endif

// The adjoint of output_tiles: ∂L/∂M_t = A G_t Aᵀ for the 2×2 tiles G_t of a plane of ∂L/∂Y
// (`g`, 2·tiles_h × 2·tiles_w, zeros outside the output), into dm[ξ·step + t].
template <typename T>
[[gnu::always_inline]] inline void grad_tiles(const T* __restrict g, int64_t gw, int64_t tiles_h, int64_t tiles_w,
                                              T* __restrict dm, int64_t step) {
  for (int64_t ty = 0; ty < tiles_h; ++ty) {
    const T* g0 = g + kTile * ty * gw;
    const T* g1 = g0 + gw;
    T* out = dm + ty * tiles_w;
    for (int64_t tx = 0; tx < tiles_w; ++tx) {
      const T x0 = g0[2 * tx], y0 = g0[2 * tx + 1], x1 = g1[2 * tx], y1 = g1[2 * tx + 1];
      const T h[4][2] = {{x0, y0}, {x0 + x1, y0 + y1}, {x0 - x1, y0 - y1}, {-x1, -y1}};  // A · G
      for (int i = 0; i < 4; ++i) {  // (A · G) · Aᵀ
        out[(4 * i + 0) * step + tx] = h[i][0];
        out[(4 * i + 1) * step + tx] = h[i][0] + h[i][1];
        out[(4 * i + 2) * step + tx] = h[i][0] - h[i][1];
        out[(4 * i + 3) * step + tx] = -h[i][1];
      }
    }
  }
}

TORCHCNN_TIERED(grad_tiles_f, grad_tiles, (const float* g, int64_t gw, int64_t th, int64_t tw, float* dm, int64_t step),
                (g, gw, th, tw, dm, step))
TORCHCNN_TIERED(grad_tiles_d, grad_tiles, (const double* g, int64_t gw, int64_t th, int64_t tw, double* dm, int64_t step),
                (g, gw, th, tw, dm, step))

#if TORCHCNN_X86_TIERS

// grad_tiles for float with AVX-512, 16 tiles at a time (rows of `g` readable to 2·round_up(tiles_w, 16)).
TORCHCNN_TARGET_AVX512 void grad_tiles_avx512(const float* g, int64_t gw, int64_t tiles_h,
                                                           int64_t tiles_w, float* dm, int64_t step) {
  for (int64_t ty = 0; ty < tiles_h; ++ty) {
    const float* g0 = g + kTile * ty * gw;
    float* out = dm + ty * tiles_w;
    for (int64_t tx = 0; tx < tiles_w; tx += 16) {
      const __mmask16 lanes = first_lanes(tiles_w - tx);
      __m512 x[2], y[2];
      for (int i = 0; i < 2; ++i) {
        const float* row = g0 + i * gw + kTile * tx;
        const __m512 a = _mm512_loadu_ps(row), b = _mm512_loadu_ps(row + 16);
        x[i] = even_entries_avx512(a, b);
        y[i] = odd_entries_avx512(a, b);
      }
      const __m512 zero = _mm512_setzero_ps();
      const __m512 h[4][2] = {{x[0], y[0]},
                              {_mm512_add_ps(x[0], x[1]), _mm512_add_ps(y[0], y[1])},
                              {_mm512_sub_ps(x[0], x[1]), _mm512_sub_ps(y[0], y[1])},
                              {_mm512_sub_ps(zero, x[1]), _mm512_sub_ps(zero, y[1])}};
      for (int i = 0; i < 4; ++i) {
        _mm512_mask_storeu_ps(out + (4 * i + 0) * step + tx, lanes, h[i][0]);
        _mm512_mask_storeu_ps(out + (4 * i + 1) * step + tx, lanes, _mm512_add_ps(h[i][0], h[i][1]));
        _mm512_mask_storeu_ps(out + (4 * i + 2) * step + tx, lanes, _mm512_sub_ps(h[i][0], h[i][1]));
        _mm512_mask_storeu_ps(out + (4 * i + 3) * step + tx, lanes, _mm512_sub_ps(zero, h[i][1]));
      }
    }
  }
}

#endif

inline void input_tiles_any(const float* p, int64_t wp, int64_t th, int64_t tw, float* v, int64_t step) {
#if TORCHCNN_X86_TIERS
  if (avx512_tier()) {
    input_tiles_avx512(p, wp, th, tw, v, step);
    return;
  }
#endif
  input_tiles_f(p, wp, th, tw, v, step);
}
inline void input_tiles_any(const double* p, int64_t wp, int64_t th, int64_t tw, double* v, int64_t step) {
  input_tiles_d(p, wp, th, tw, v, step);
}
inline void grad_tiles_any(const float* g, int64_t gw, int64_t th, int64_t tw, float* dm, int64_t step) {
#if TORCHCNN_X86_TIERS
  if (avx512_tier()) {
    grad_tiles_avx512(g, gw, th, tw, dm, step);
    return;
  }
#endif
  grad_tiles_f(g, gw, th, tw, dm, step);
}
inline void grad_tiles_any(const double* g, int64_t gw, int64_t th, int64_t tw, double* dm, int64_t step) {
  grad_tiles_d(g, gw, th, tw, dm, step);
}
inline void output_tiles_any(const float* m, int64_t step, float b, int64_t th, int64_t tw, float* o) {
  output_tiles_f(m, step, b, th, tw, o);
}
inline void output_tiles_any(const double* m, int64_t step, double b, int64_t th, int64_t tw, double* o) {
  output_tiles_d(m, step, b, th, tw, o);
}

// Copies image plane x (height × width) into `padded` (padded_h × padded_w) at (pad_h, pad_w),
// zeros elsewhere.
template <typename T>
void pad_plane(const T* x, const Tiling& s, T* padded) {
  const int64_t hp = s.padded_h(), wp = s.padded_w();
  const int64_t rows = std::min(s.height, hp - s.pad_h), cols = std::min(s.width, wp - s.pad_w);
  std::fill(padded, padded + s.pad_h * wp, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    T* row = padded + (s.pad_h + i) * wp;
    std::fill(row, row + s.pad_w, T(0));
    std::copy(x + i * s.width, x + i * s.width + cols, row + s.pad_w);
    std::fill(row + s.pad_w + cols, row + wp, T(0));
  }
  std::fill(padded + (s.pad_h + rows) * wp, padded + hp * wp, T(0));
}

// V[c][ξ][t] for the tiles of images [n0, n1), t counted from image n0's first tile. (Channel-major:
// the 16 rows one channel's transform writes lie together; ξ-major, they would be C·tiles apart,
// often a multiple of 4 KiB, and evict one another from cache.)
// `ld` is the block's tile count, `first` the block column of image n0's first tile.
template <typename T>
void transform_inputs(const T* x, const Tiling& s, int64_t n0, int64_t n1, int64_t ld, int64_t first, T* padded,
                      T* v) {
  const int64_t plane = s.height * s.width;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < s.channels; ++c) {
      pad_plane(x + (n * s.channels + c) * plane, s, padded);
      input_tiles_any(padded, s.padded_w(), s.tiles_h, s.tiles_w,
                      v + c * kPoints * ld + first + (n - n0) * s.per_image(), ld);
    }
  }
}

// Y[n, k] for images [n0, n1) from M[ξ][k][t].
template <typename T>
void transform_outputs(const T* m, const T* bias, const Tiling& s, int64_t n0, int64_t n1, int64_t ld, int64_t first,
                       T* scratch, T* y) {
  const int64_t plane = s.out_height * s.out_width;
  const int64_t sw = kTile * s.tiles_w;
  const bool exact = s.out_width == sw && s.out_height == kTile * s.tiles_h;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < s.out_channels; ++k) {
      T* yk = y + (n * s.out_channels + k) * plane;
      T* o = exact ? yk : scratch;
      output_tiles_any(m + k * ld + first + (n - n0) * s.per_image(), s.out_channels * ld, bias ? bias[k] : T(0),
                       s.tiles_h, s.tiles_w, o);
      if (!exact) {  // the plane's odd last row or column falls outside the output
        for (int64_t i = 0; i < s.out_height; ++i) {
          std::copy(scratch + i * sw, scratch + i * sw + s.out_width, yk + i * s.out_width);
        }
      }
    }
  }
}

// ∂L/∂M[k][ξ][t] for images [n0, n1) from ∂L/∂Y (the adjoint of transform_outputs); `padded`
// holds one plane of ∂L/∂Y, 2·tiles_h × grad_w(), zeros outside the output.
template <typename T>
void transform_grads(const T* dy, const Tiling& s, int64_t n0, int64_t n1, int64_t ld, int64_t first, T* padded,
                     T* dm) {
  const int64_t plane = s.out_height * s.out_width, gw = s.grad_w();
  std::fill(padded, padded + kTile * s.tiles_h * gw, T(0));
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < s.out_channels; ++k) {
      const T* src = dy + (n * s.out_channels + k) * plane;
      for (int64_t i = 0; i < s.out_height; ++i) {
        std::copy(src + i * s.out_width, src + (i + 1) * s.out_width, padded + i * gw);
      }
      grad_tiles_any(padded, gw, s.tiles_h, s.tiles_w, dm + k * kPoints * ld + first + (n - n0) * s.per_image(), ld);
    }
  }
}

// ∂L/∂W[k][c] = Gᵀ ∂L/∂U[·][k][c] G (the adjoint of transform_filters) for output channels [k0, k1).
template <typename T>
void filter_grads(const T* du, int64_t out_channels, int64_t channels, int64_t k0, int64_t k1, T* dw) {
  const int64_t kc = out_channels * channels;
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t c = 0; c < channels; ++c) {
      const T* u = du + k * channels + c;
      T a[3][4];  // Gᵀ · ∂U
      for (int j = 0; j < 4; ++j) {
        const T u0 = u[j * kc], u1 = u[(4 + j) * kc], u2 = u[(8 + j) * kc], u3 = u[(12 + j) * kc];
        a[0][j] = u0 + (u1 + u2) / 2;
        a[1][j] = (u1 - u2) / 2;
        a[2][j] = (u1 + u2) / 2 + u3;
      }
      T* out = dw + 9 * (k * channels + c);
      for (int i = 0; i < 3; ++i) {  // (Gᵀ · ∂U) · G
        out[3 * i + 0] = a[i][0] + (a[i][1] + a[i][2]) / 2;
        out[3 * i + 1] = (a[i][1] - a[i][2]) / 2;
        out[3 * i + 2] = (a[i][1] + a[i][2]) / 2 + a[i][3];
      }
    }
  }
}

// Images per block: enough for about 64 tiles, so that the GEMMs are wide enough to run at speed,
// and no more than keep the block's transformed inputs and products, 16·(C + K) values a tile,
// within about 4 MiB; at least one image.
int64_t block_images(const Tiling& s, int64_t element_size) {
  const int64_t per_image = kPoints * (s.channels + s.out_channels) * s.per_image() * element_size;
  const int64_t wide = (64 + s.per_image() - 1) / s.per_image();
  return std::max<int64_t>(1, std::min(wide, (int64_t{4} << 20) / per_image));
}

// Whether ∂W is computed over the whole batch at once — every tile transformed first, then the 16
// products split between the threads — rather than image chunk by chunk, each with its own partial
// ∂U (16·K·C values) to be added up: when the partial sums would be larger than all the tiles.
bool whole_batch(const Tiling& s, int64_t batch) {
  const int64_t tiles = batch * s.per_image() * (s.channels + s.out_channels);
  const int64_t partials = parallel_chunks(batch) * s.channels * s.out_channels;
  return parallel_chunks(batch) > 1 && partials > tiles;
}

Tiling tiling(int64_t channels, int64_t height, int64_t width, int64_t pad_h, int64_t pad_w, int64_t out_channels,
              int64_t out_height, int64_t out_width) {
  Tiling s{channels, height, width, pad_h, pad_w, out_channels, out_height, out_width, 0, 0};
  s.tiles_h = (s.out_height + kTile - 1) / kTile;
  s.tiles_w = (s.out_width + kTile - 1) / kTile;
  return s;
}

int64_t scratch_size(const Tiling& s) {
  return std::max({s.padded_h() * s.padded_w(), kTile * s.tiles_h * kTile * s.tiles_w, kTile * s.tiles_h * s.grad_w()});
}

// M[ξ] (K × t) = U[ξ] (K × C) · V[ξ] (C × t) for ξ in [xi0, xi1); V is (C, 16, t), M (16, K, t).
template <typename T>
void products(const T* u, const T* v, const Tiling& s, int64_t t, int64_t xi0, int64_t xi1, T* m) {
  const int64_t c = s.channels, k = s.out_channels;
  for (int64_t xi = xi0; xi < xi1; ++xi) {
    matmul<T>({m + xi * k * t, k, t, t, 1}, {u + xi * k * c, k, c, c, 1}, {v + xi * t, c, t, kPoints * t, 1});
  }
}

// ∂U[ξ] (K × C) [+]= ∂M[ξ] (K × t) · V[ξ]ᵀ (t × C) for ξ in [xi0, xi1); ∂M is (K, 16, t).
template <typename T>
void weight_products(const T* dm, const T* v, const Tiling& s, int64_t t, int64_t xi0, int64_t xi1, bool accumulate,
                     T* du) {
  const int64_t c = s.channels, k = s.out_channels;
  for (int64_t xi = xi0; xi < xi1; ++xi) {
    matmul<T>({du + xi * k * c, k, c, c, 1}, {dm + xi * t, k, t, kPoints * t, 1}, {v + xi * t, t, c, 1, kPoints * t},
              accumulate);
  }
}

// Y (N, K, OH, OW) = X (N, C, H, W) ⋆ W (K, C, 3, 3) + b with padding (pad_h, pad_w).
template <typename T>
void winograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, int64_t pad_h,
              int64_t pad_w, at::Tensor& output) {
  const Tiling s = tiling(input.size(1), input.size(2), input.size(3), pad_h, pad_w, output.size(1), output.size(2),
                          output.size(3));
  const int64_t batch = input.size(0);
  auto u_ = at::empty({kPoints, s.out_channels, s.channels}, weight.options());
  const T* x = input.const_data_ptr<T>();
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* u = u_.mutable_data_ptr<T>();
  T* y = output.mutable_data_ptr<T>();
  for_each_chunk(s.out_channels, [&](int64_t, int64_t k0, int64_t k1) {
    std::vector<T> row(kPoints * s.channels);
    transform_filters<T>(weight.const_data_ptr<T>(), s.out_channels, s.channels, k0, k1, row.data(), u);
  });
  const int64_t block = block_images(s, input.element_size());
  for_each_chunk(batch, [&](int64_t, int64_t begin, int64_t end) {
    const int64_t tiles = std::min(block, end - begin) * s.per_image();
    T* v = workspace<T>(Slot::kColumns, s.channels * kPoints * tiles);
    T* m = workspace<T>(Slot::kProducts, kPoints * s.out_channels * tiles);
    T* scratch = workspace<T>(Slot::kScratch, scratch_size(s));
    for (int64_t n0 = begin; n0 < end; n0 += block) {
      const int64_t n1 = std::min(end, n0 + block), t = (n1 - n0) * s.per_image();
      // The block's first C·16·t entries of v, (C, 16, t), and K·16·t of m, (16, K, t).
      transform_inputs<T>(x, s, n0, n1, t, 0, scratch, v);
      products<T>(u, v, s, t, 0, kPoints, m);
      transform_outputs<T>(m, b, s, n0, n1, t, 0, scratch, y);
    }
  });
}

template <typename T>
void winograd_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                     at::Tensor& grad_weight) {
  const Tiling s = tiling(g.channels, g.height, g.width, g.pad_h, g.pad_w, g.out_channels, g.out_height, g.out_width);
  const T* x = input.const_data_ptr<T>();
  const T* dy = grad_output.const_data_ptr<T>();
  const int64_t kc = s.out_channels * s.channels;
  at::Tensor du_;
  if (whole_batch(s, g.batch)) {
    const int64_t t = g.batch * s.per_image();
    T* v = workspace<T>(Slot::kColumns, s.channels * kPoints * t);
    T* dm = workspace<T>(Slot::kGrads, s.out_channels * kPoints * t);
    for_each_chunk(g.batch, [&](int64_t, int64_t n0, int64_t n1) {
      T* scratch = workspace<T>(Slot::kScratch, scratch_size(s));
      transform_inputs<T>(x, s, n0, n1, t, n0 * s.per_image(), scratch, v);
      transform_grads<T>(dy, s, n0, n1, t, n0 * s.per_image(), scratch, dm);
    });
    du_ = at::empty({kPoints, s.out_channels, s.channels}, input.options());
    T* du = du_.mutable_data_ptr<T>();
    for_each_chunk(kPoints, [&](int64_t, int64_t xi0, int64_t xi1) {
      weight_products<T>(dm, v, s, t, xi0, xi1, /*accumulate=*/false, du);
    });
  } else {
    // ∂L/∂U[ξ] = Σ_t ∂L/∂M[ξ][·][t] · V[ξ][·][t]ᵀ, one partial sum per chunk of images, added up
    // in chunk order: no races, the same result every run.
    const int64_t block = block_images(s, input.element_size());
    auto partial = at::empty({parallel_chunks(g.batch), kPoints, s.out_channels, s.channels}, input.options());
    T* partial_ = partial.mutable_data_ptr<T>();
    for_each_chunk(g.batch, [&](int64_t chunk, int64_t begin, int64_t end) {
      const int64_t tiles = std::min(block, end - begin) * s.per_image();
      T* v = workspace<T>(Slot::kColumns, s.channels * kPoints * tiles);
      T* dm = workspace<T>(Slot::kGrads, s.out_channels * kPoints * tiles);
      T* scratch = workspace<T>(Slot::kScratch, scratch_size(s));
      for (int64_t n0 = begin; n0 < end; n0 += block) {
        const int64_t n1 = std::min(end, n0 + block), t = (n1 - n0) * s.per_image();
        transform_inputs<T>(x, s, n0, n1, t, 0, scratch, v);
        transform_grads<T>(dy, s, n0, n1, t, 0, scratch, dm);
        weight_products<T>(dm, v, s, t, 0, kPoints, /*accumulate=*/n0 > begin,
                           partial_ + chunk * kPoints * kc);
      }
    });
    du_ = partial.sum(0);
  }
  for_each_chunk(s.out_channels, [&](int64_t, int64_t k0, int64_t k1) {
    filter_grads<T>(du_.const_data_ptr<T>(), s.out_channels, s.channels, k0, k1, grad_weight.mutable_data_ptr<T>());
  });
}

}  // namespace

void winograd_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                      const Conv2dGeometry& g, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::winograd_forward", [&] {
    winograd<scalar_t>(input, weight, bias, g.pad_h, g.pad_w, output);
  });
}

void winograd_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                              at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::winograd_backward_weight", [&] {
    winograd_weight<scalar_t>(grad_output, input, g, grad_weight);
  });
}

void winograd_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                             at::Tensor& grad_input) {
  const auto flipped = weight.flip({2, 3}).transpose(0, 1).contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "torchcnn::winograd_backward_input", [&] {
    winograd<scalar_t>(grad_output, flipped, at::Tensor(), 2 - g.pad_h, 2 - g.pad_w, grad_input);
  });
}

}  // namespace torchcnn::cpu
