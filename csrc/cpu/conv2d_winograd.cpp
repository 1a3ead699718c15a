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
// fewer. Threads take contiguous ranges of tiles (across images), in blocks small enough for the
// transformed tiles to stay in cache between the transforms and the GEMMs.
//
// ∂L/∂X is itself a 3×3, stride-1 convolution: of ∂L/∂Y, padded by 2 − pad, with the filters
// flipped and their channels swapped, W'[c, k, p, q] = W[k, c, 2 − p, 2 − q]. ∂L/∂W stays with the
// GEMM algorithm (conv2d.cpp).
#include <torch/all.h>

#include "conv2d_algorithms.h"

namespace torchcnn::cpu {
namespace {

constexpr int64_t kTile = 2;    // output pixels per tile side
constexpr int64_t kPatch = 4;   // input pixels per tile side
constexpr int64_t kPoints = 16; // positions ξ of a transformed tile

// U[ξ][k][c] = (G W_kc Gᵀ)[ξ] for weights (K, C, 3, 3).
template <typename T>
void transform_filters(const T* w, int64_t out_channels, int64_t channels, T* u) {
  const int64_t kc = out_channels * channels;
  for (int64_t i = 0; i < kc; ++i) {
    const T* g = w + 9 * i;
    T a[4][3];  // G · g
    for (int j = 0; j < 3; ++j) {
      a[0][j] = g[j];
      a[1][j] = (g[j] + g[3 + j] + g[6 + j]) / 2;
      a[2][j] = (g[j] - g[3 + j] + g[6 + j]) / 2;
      a[3][j] = g[6 + j];
    }
    for (int r = 0; r < 4; ++r) {  // (G · g) · Gᵀ
      u[(4 * r + 0) * kc + i] = a[r][0];
      u[(4 * r + 1) * kc + i] = (a[r][0] + a[r][1] + a[r][2]) / 2;
      u[(4 * r + 2) * kc + i] = (a[r][0] - a[r][1] + a[r][2]) / 2;
      u[(4 * r + 3) * kc + i] = a[r][2];
    }
  }
}

// Where the tiles of one image lie: tiles_h × tiles_w tiles, tile (ty, tx) reads the patch whose
// top-left input pixel is (2·ty − pad_h, 2·tx − pad_w).
struct Tiling {
  int64_t channels, height, width, pad_h, pad_w;  // input (one image)
  int64_t out_channels, out_height, out_width;
  int64_t tiles_h, tiles_w;

  int64_t per_image() const { return tiles_h * tiles_w; }
};

// V[ξ][c][t − t0] = (Bᵀ d B)[ξ] for the tiles t of [t0, t1) (numbered across images) of input x.
template <typename T>
void transform_inputs(const T* x, const Tiling& s, int64_t t0, int64_t t1, T* v) {
  const int64_t ld = t1 - t0, plane = s.height * s.width;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / s.per_image(), ty = (t % s.per_image()) / s.tiles_w, tx = t % s.tiles_w;
    const int64_t y0 = ty * kTile - s.pad_h, x0 = tx * kTile - s.pad_w;
    const bool inside = y0 >= 0 && x0 >= 0 && y0 + kPatch <= s.height && x0 + kPatch <= s.width;
    T* vt = v + (t - t0);
    for (int64_t c = 0; c < s.channels; ++c) {
      T d[4][4];
      const T* xc = x + (n * s.channels + c) * plane;
      if (inside) {
        const T* patch = xc + y0 * s.width + x0;
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 4; ++j) {
            d[i][j] = patch[i * s.width + j];
          }
        }
      } else {
        for (int64_t i = 0; i < 4; ++i) {
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t h = y0 + i, w = x0 + j;
            d[i][j] = h >= 0 && h < s.height && w >= 0 && w < s.width ? xc[h * s.width + w] : T(0);
          }
        }
      }
      T r[4][4];  // Bᵀ · d
      for (int j = 0; j < 4; ++j) {
        r[0][j] = d[0][j] - d[2][j];
        r[1][j] = d[1][j] + d[2][j];
        r[2][j] = d[2][j] - d[1][j];
        r[3][j] = d[1][j] - d[3][j];
      }
      T* out = vt + c * ld;
      const int64_t step = s.channels * ld;
      for (int i = 0; i < 4; ++i) {  // (Bᵀ · d) · B
        out[(4 * i + 0) * step] = r[i][0] - r[i][2];
        out[(4 * i + 1) * step] = r[i][1] + r[i][2];
        out[(4 * i + 2) * step] = r[i][2] - r[i][1];
        out[(4 * i + 3) * step] = r[i][1] - r[i][3];
      }
    }
  }
}

// Y tile = Aᵀ M A (+ b) for the tiles [t0, t1), from M[ξ][k][t − t0]; tiles on the bottom or right
// edge of an odd-sized output write only their pixels inside it.
template <typename T>
void transform_outputs(const T* m, const T* bias, const Tiling& s, int64_t t0, int64_t t1, T* y) {
  const int64_t ld = t1 - t0, plane = s.out_height * s.out_width, step = s.out_channels * ld;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / s.per_image(), ty = (t % s.per_image()) / s.tiles_w, tx = t % s.tiles_w;
    const int64_t oy = ty * kTile, ox = tx * kTile;
    const int64_t rows = std::min<int64_t>(kTile, s.out_height - oy), cols = std::min<int64_t>(kTile, s.out_width - ox);
    T* yn = y + n * s.out_channels * plane + oy * s.out_width + ox;
    for (int64_t k = 0; k < s.out_channels; ++k) {
      const T* mk = m + k * ld + (t - t0);
      T a[2][4];  // Aᵀ · M
      for (int j = 0; j < 4; ++j) {
        const T m0 = mk[j * step], m1 = mk[(4 + j) * step], m2 = mk[(8 + j) * step], m3 = mk[(12 + j) * step];
        a[0][j] = m0 + m1 + m2;
        a[1][j] = m1 - m2 - m3;
      }
      const T add = bias ? bias[k] : T(0);
      T out[2][2];  // (Aᵀ · M) · A
      for (int i = 0; i < 2; ++i) {
        out[i][0] = a[i][0] + a[i][1] + a[i][2] + add;
        out[i][1] = a[i][1] - a[i][2] - a[i][3] + add;
      }
      T* yk = yn + k * plane;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          yk[i * s.out_width + j] = out[i][j];
        }
      }
    }
  }
}

// Tiles per block: the block's transformed inputs and products, 16·(C + K) values a tile, within
// about 1 MiB (this machine's L2 per core), at least 16 tiles so the GEMMs stay wide.
int64_t block_tiles(const Tiling& s, int64_t element_size) {
  const int64_t per_tile = kPoints * (s.channels + s.out_channels) * element_size;
  return std::max<int64_t>(16, (int64_t{1} << 20) / per_tile);
}

// Y (N, K, OH, OW) = X (N, C, H, W) ⋆ W (K, C, 3, 3) + b with padding (pad_h, pad_w).
void winograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, int64_t pad_h,
              int64_t pad_w, at::Tensor& output) {
  Tiling s{input.size(1), input.size(2), input.size(3), pad_h, pad_w,
           output.size(1), output.size(2), output.size(3), 0, 0};
  s.tiles_h = (s.out_height + kTile - 1) / kTile;
  s.tiles_w = (s.out_width + kTile - 1) / kTile;
  const int64_t batch = input.size(0), tiles = batch * s.per_image();
  auto u = at::empty({kPoints, s.out_channels, s.channels}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::winograd_filters", [&] {
    transform_filters<scalar_t>(weight.const_data_ptr<scalar_t>(), s.out_channels, s.channels,
                                u.mutable_data_ptr<scalar_t>());
  });
  const int64_t block = block_tiles(s, input.element_size());
  for_each_chunk(tiles, [&](int64_t, int64_t begin, int64_t end) {
    auto v = at::empty({kPoints, s.channels, std::min(block, end - begin)}, input.options());
    auto m = at::empty({kPoints, s.out_channels, std::min(block, end - begin)}, input.options());
    for (int64_t t0 = begin; t0 < end; t0 += block) {
      const int64_t t1 = std::min(end, t0 + block);
      auto v_block = v.view(-1).narrow(0, 0, kPoints * s.channels * (t1 - t0)).view({kPoints, s.channels, t1 - t0});
      auto m_block =
          m.view(-1).narrow(0, 0, kPoints * s.out_channels * (t1 - t0)).view({kPoints, s.out_channels, t1 - t0});
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::winograd_inputs", [&] {
        transform_inputs<scalar_t>(input.const_data_ptr<scalar_t>(), s, t0, t1, v_block.mutable_data_ptr<scalar_t>());
      });
      at::bmm_out(m_block, u, v_block);
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::winograd_outputs", [&] {
        transform_outputs<scalar_t>(m_block.const_data_ptr<scalar_t>(),
                                    bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, s, t0, t1,
                                    output.mutable_data_ptr<scalar_t>());
      });
    }
  });
}

}  // namespace

void winograd_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                      const Conv2dGeometry& g, at::Tensor& output) {
  winograd(input, weight, bias, g.pad_h, g.pad_w, output);
}

void winograd_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                             at::Tensor& grad_input) {
  const auto flipped = weight.flip({2, 3}).transpose(0, 1).contiguous();
  winograd(grad_output, flipped, at::Tensor(), 2 - g.pad_h, 2 - g.pad_w, grad_input);
}

}  // namespace torchcnn::cpu
