// conv2d as im2col feeding GEMMs (gemm.h), images split between threads.
//
// For one image, im2col lays the receptive field of every output pixel out as a column:
//   cols[(c, p, q), (i, j)] = X[c, i·s + p·d − pad, j·s + q·d − pad]   (0 outside the image)
// so the design notes' sum Y_k[i, j] = Σ_c Σ_p Σ_q X_c[…] · W_k,c[p, q] + b_k becomes, per group,
//   Y = W (M/g × C/g·KH·KW) · cols (C/g·KH·KW × OH·OW) + b.
// The gradients are the two other products of the same three matrices:
//   ∂L/∂cols = Wᵀ · ∂L/∂Y, scattered back by col2im;   ∂L/∂W = Σ_n ∂L/∂Y · colsᵀ.
// A product over one image has N = OH·OW columns: plenty for a 26×26 plane, hopeless for a 4×4
// one (N = 16). There the columns of B images sit side by side, cols (C/g·KH·KW × B·OH·OW), and
// one product serves them all; Y and ∂L/∂Y are moved between (B, M, OH·OW) and (M, B·OH·OW) on
// the way. B comes from the rule in conv2d.cpp. Threads take groups of images, or, when B is the
// whole batch, share each product (gemm.h).
#include <torch/all.h>

#include <cstring>
#include <vector>

#include "../conv2d_algorithms.h"
#include "gemm.h"

namespace torchcnn::cpu {
namespace {

// One image (C, H, W) → its columns, C·KH·KW rows of OH·OW entries, row r at cols + r·ld (ld ≥
// OH·OW leaves room for other images' columns beside them). Rows are written whole, zeros
// included, so the buffer can be reused without clearing.
template <typename T>
void im2col(const T* x, const Conv2dGeometry& g, T* cols, int64_t ld) {
  const int64_t ow_n = g.out_width;
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* xc = x + c * g.in_plane();
    for (int64_t p = 0; p < g.kernel_h; ++p) {
      for (int64_t q = 0; q < g.kernel_w; ++q) {
        T* row = cols + ((c * g.kernel_h + p) * g.kernel_w + q) * ld;
        const int64_t w_off = q * g.dilation_w - g.pad_w;
        const auto [lo, hi] = valid_range(w_off, g.stride_w, g.width, ow_n);
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          T* dst = row + oh * ow_n;
          const int64_t ih = oh * g.stride_h - g.pad_h + p * g.dilation_h;
          if (ih < 0 || ih >= g.height) {
            std::fill(dst, dst + ow_n, T(0));
            continue;
          }
          const T* src = xc + ih * g.width + w_off;
          if (ow_n < 16) {  // short rows: element by element beats three calls per row
            for (int64_t ow = 0; ow < ow_n; ++ow) {
              dst[ow] = ow >= lo && ow < hi ? src[ow * g.stride_w] : T(0);
            }
            continue;
          }
          std::fill(dst, dst + lo, T(0));
          if (g.stride_w == 1) {
            std::memcpy(dst + lo, src + lo, sizeof(T) * (hi - lo));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) {
              dst[ow] = src[ow * g.stride_w];
            }
          }
          std::fill(dst + hi, dst + ow_n, T(0));
        }
      }
    }
  }
}

// The adjoint of im2col: every column entry is added back onto the pixel it was read from.
// dx must be zeroed by the caller. Sequential within an image, hence deterministic.
template <typename T>
void col2im(const T* cols, int64_t ld, const Conv2dGeometry& g, T* dx) {
  const int64_t ow_n = g.out_width;
  for (int64_t c = 0; c < g.channels; ++c) {
    T* dxc = dx + c * g.in_plane();
    for (int64_t p = 0; p < g.kernel_h; ++p) {
      for (int64_t q = 0; q < g.kernel_w; ++q) {
        const T* row = cols + ((c * g.kernel_h + p) * g.kernel_w + q) * ld;
        const int64_t w_off = q * g.dilation_w - g.pad_w;
        const auto [lo, hi] = valid_range(w_off, g.stride_w, g.width, ow_n);
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          const int64_t ih = oh * g.stride_h - g.pad_h + p * g.dilation_h;
          if (ih < 0 || ih >= g.height) {
            continue;
          }
          const T* src = row + oh * ow_n;
          T* dst = dxc + ih * g.width + w_off;
          for (int64_t ow = lo; ow < hi; ++ow) {
            dst[ow * g.stride_w] += src[ow];
          }
        }
      }
    }
  }
}

// body(i) for images i in [0, b): in parallel when called outside a parallel region (a group that
// is the whole batch, see for_each_image_group), else on this thread.
template <typename F>
void for_each_image(int64_t b, F&& body) {
  at::parallel_for(0, b, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      body(i);
    }
  });
}

// Per-image planes (b, M, P) ⇄ one matrix (M, b·P) with rows ld apart: image i's plane of
// channel k is row k's i-th run of P entries. `bias` (may be null) is added on the way to the planes.
template <typename T>
void planes_to_matrix(const T* planes, int64_t b, int64_t m, int64_t p, T* matrix, int64_t ld) {
  for_each_image(b, [&](int64_t i) {
    for (int64_t k = 0; k < m; ++k) {
      std::memcpy(matrix + k * ld + i * p, planes + (i * m + k) * p, sizeof(T) * p);
    }
  });
}

template <typename T>
void matrix_to_planes(const T* matrix, int64_t ld, const T* bias, int64_t b, int64_t m, int64_t p, T* planes) {
  for_each_image(b, [&](int64_t i) {
    for (int64_t k = 0; k < m; ++k) {
      const T* src = matrix + k * ld + i * p;
      T* dst = planes + (i * m + k) * p;
      const T add = bias ? bias[k] : T(0);
      for (int64_t l = 0; l < p; ++l) {
        dst[l] = src[l] + add;
      }
    }
  });
}

// The columns of images [n, n + b) as a (C·KH·KW, b·P) matrix: the input itself for one image of
// a pointwise conv, else `buffer` (this thread's workspace, taken on first use) filled by im2col.
at::Tensor columns(const at::Tensor& input, int64_t n, int64_t b, const Conv2dGeometry& g, at::Tensor& buffer) {
  const int64_t rows = g.channels * g.kernel_h * g.kernel_w, plane = g.out_plane();
  if (b == 1 && g.is_pointwise()) {
    return input[n].view({rows, plane});
  }
  if (!buffer.defined()) {
    buffer = workspace_tensor(Slot::kColumns, {rows, b * plane}, input);
  }
  auto cols = buffer.narrow(1, 0, b * plane);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::im2col", [&] {
    const auto* x = input.const_data_ptr<scalar_t>() + n * g.channels * g.in_plane();
    auto* out = buffer.mutable_data_ptr<scalar_t>();
    for_each_image(b, [&](int64_t i) {
      im2col<scalar_t>(x + i * g.channels * g.in_plane(), g, out + i * plane, buffer.size(1));
    });
  });
  return cols;
}

// ∂L/∂Y of images [n, n + b) as an (M, b·P) matrix: a view for one image, else gathered into `buffer`.
at::Tensor grad_matrix(const at::Tensor& grad_output, int64_t n, int64_t b, const Conv2dGeometry& g,
                       at::Tensor& buffer) {
  const int64_t plane = g.out_plane();
  if (b == 1) {
    return grad_output[n].view({g.out_channels, plane});
  }
  if (!buffer.defined()) {
    buffer = workspace_tensor(Slot::kGrads, {g.out_channels, b * plane}, grad_output);
  }
  auto matrix = buffer.narrow(1, 0, b * plane);
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "torchcnn::grad_matrix", [&] {
    planes_to_matrix(grad_output.const_data_ptr<scalar_t>() + n * g.out_channels * plane, b, g.out_channels,
                     plane, buffer.mutable_data_ptr<scalar_t>(), buffer.size(1));
  });
  return matrix;
}

}  // namespace

void gemm_forward(const at::Tensor& input, const at::Tensor& weight_, const at::Tensor& bias,
                  const Conv2dGeometry& g, int64_t images_per_product, at::Tensor& output) {
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size(), plane = g.out_plane();
  const auto weight = weight_.view({g.out_channels, kg});
  for_each_image_group(g.batch, images_per_product, [&](int64_t, int64_t begin, int64_t end) {
    at::Tensor cols_buffer, out_buffer;
    for (int64_t n = begin; n < end; n += images_per_product) {
      const int64_t b = std::min(images_per_product, end - n);
      const auto cols = columns(input, n, b, g, cols_buffer);
      // One image's product lands in its output plane; several images' in a matrix first.
      if (b > 1 && !out_buffer.defined()) {
        out_buffer = workspace_tensor(Slot::kProducts, {g.out_channels, images_per_product * plane}, output);
      }
      auto out = b == 1 ? output[n].view({g.out_channels, plane}) : out_buffer.narrow(1, 0, b * plane);
      for (int64_t k = 0; k < g.groups; ++k) {
        auto out_g = out.narrow(0, k * mg, mg);
        matmul(out_g, weight.narrow(0, k * mg, mg), cols.narrow(0, k * kg, kg));
      }
      AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "torchcnn::conv2d_gemm_output", [&] {
        const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        auto* planes = output.mutable_data_ptr<scalar_t>() + n * g.out_channels * plane;
        // In place when out is the output plane itself (b == 1): the bias is added while in cache.
        if (b > 1 || b_ptr) {
          matrix_to_planes<scalar_t>(out.const_data_ptr<scalar_t>(), out.stride(0), b_ptr, b, g.out_channels, plane,
                                     planes);
        }
      });
    }
  });
}

void gemm_backward_input(const at::Tensor& grad_output, const at::Tensor& weight_, const Conv2dGeometry& g,
                         int64_t images_per_product, at::Tensor& grad_input) {
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size(), plane = g.out_plane();
  const auto weight = weight_.view({g.out_channels, kg});
  for_each_image_group(g.batch, images_per_product, [&](int64_t, int64_t begin, int64_t end) {
    at::Tensor grad_buffer, cols_buffer;
    for (int64_t n = begin; n < end; n += images_per_product) {
      const int64_t b = std::min(images_per_product, end - n);
      const auto go = grad_matrix(grad_output, n, b, g, grad_buffer);
      // One pointwise image: ∂L/∂X is Wᵀ · ∂L/∂Y itself; otherwise the columns go through col2im.
      const bool direct = b == 1 && g.is_pointwise();
      if (!direct && !cols_buffer.defined()) {
        cols_buffer = workspace_tensor(Slot::kColumns, {g.groups * kg, images_per_product * plane}, grad_input);
      }
      auto cols = direct ? grad_input[n].view({g.channels, plane}) : cols_buffer.narrow(1, 0, b * plane);
      for (int64_t k = 0; k < g.groups; ++k) {
        auto cols_g = cols.narrow(0, k * kg, kg);
        matmul(cols_g, weight.narrow(0, k * mg, mg).t(), go.narrow(0, k * mg, mg));
      }
      if (!direct) {
        AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "torchcnn::col2im", [&] {
          const auto* src = cols_buffer.const_data_ptr<scalar_t>();
          auto* dx = grad_input.mutable_data_ptr<scalar_t>() + n * g.channels * g.in_plane();
          for_each_image(b, [&](int64_t i) {  // each image's ∂L/∂X zeroed here, while it goes into cache
            scalar_t* dx_i = dx + i * g.channels * g.in_plane();
            std::fill(dx_i, dx_i + g.channels * g.in_plane(), scalar_t(0));
            col2im<scalar_t>(src + i * plane, cols_buffer.size(1), g, dx_i);
          });
        });
      }
    }
  });
}

void gemm_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                          int64_t images_per_product, at::Tensor& grad_weight) {
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();
  // One partial sum per chunk of images, added up in chunk order: no races, same result every run.
  // A single chunk sums straight into ∂L/∂W.
  auto result = grad_weight.view({g.out_channels, kg});
  const int64_t chunks = images_per_product >= g.batch ? 1 : parallel_chunks(g.batch);
  auto partial = chunks == 1 ? result.unsqueeze(0) : at::empty({chunks, g.out_channels, kg}, input.options());
  for_each_image_group(g.batch, images_per_product, [&](int64_t chunk, int64_t begin, int64_t end) {
    at::Tensor cols_buffer, grad_buffer;
    auto acc = partial[chunk];
    for (int64_t n = begin; n < end; n += images_per_product) {
      const int64_t b = std::min(images_per_product, end - n);
      const auto cols = columns(input, n, b, g, cols_buffer);
      const auto go = grad_matrix(grad_output, n, b, g, grad_buffer);
      for (int64_t k = 0; k < g.groups; ++k) {
        auto acc_g = acc.narrow(0, k * mg, mg);
        matmul(acc_g, go.narrow(0, k * mg, mg), cols.narrow(0, k * kg, kg).t(), /*accumulate=*/n > begin);
      }
    }
  });
  if (chunks > 1) {
    at::sum_out(result, partial, 0);
  }
}

}  // namespace torchcnn::cpu
