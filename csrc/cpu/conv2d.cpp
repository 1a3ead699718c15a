// conv2d on the CPU: im2col feeding BLAS GEMMs (at::mm, MKL/OpenBLAS), images in parallel.
//
// For one image, im2col lays the receptive field of every output pixel out as a column:
//   cols[(c, p, q), (i, j)] = X[c, i·s + p·d − pad, j·s + q·d − pad]   (0 outside the image)
// so the design notes' sum Y_k[i, j] = Σ_c Σ_p Σ_q X_c[…] · W_k,c[p, q] + b_k becomes, per group,
//   Y = W (M/g × C/g·KH·KW) · cols (C/g·KH·KW × OH·OW) + b.
// The gradients are the two other products of the same three matrices:
//   ∂L/∂cols = Wᵀ · ∂L/∂Y, scattered back by col2im;   ∂L/∂W = Σ_n ∂L/∂Y · colsᵀ.
// Reduced-precision inputs are computed in float32 and rounded once at the end.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../shapes.h"

namespace torchcnn {
namespace {

// Output columns ow whose tap ow·stride + offset falls inside [0, width): [lo, hi).
inline std::pair<int64_t, int64_t> valid_range(int64_t offset, int64_t stride, int64_t width, int64_t out) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t hi = width - offset <= 0 ? 0 : (width - offset + stride - 1) / stride;
  const int64_t clamped_hi = std::min(hi, out);
  return {std::min(lo, clamped_hi), clamped_hi};
}

// One image (C, H, W) → cols (C·KH·KW, OH·OW). Rows are written whole, zeros included, so the
// buffer can be reused between images without clearing.
template <typename T>
void im2col(const T* x, const Conv2dGeometry& g, T* cols) {
  const int64_t ow_n = g.out_width;
  const int64_t plane = g.out_plane();
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* xc = x + c * g.in_plane();
    for (int64_t p = 0; p < g.kernel_h; ++p) {
      for (int64_t q = 0; q < g.kernel_w; ++q) {
        T* row = cols + ((c * g.kernel_h + p) * g.kernel_w + q) * plane;
        const int64_t w_off = q * g.dilation_w - g.pad_w;
        const auto [lo, hi] = valid_range(w_off, g.stride_w, g.width, ow_n);
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          T* dst = row + oh * ow_n;
          const int64_t ih = oh * g.stride_h - g.pad_h + p * g.dilation_h;
          if (ih < 0 || ih >= g.height) {
            std::fill(dst, dst + ow_n, T(0));
            continue;
          }
          std::fill(dst, dst + lo, T(0));
          const T* src = xc + ih * g.width + w_off;
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
void col2im(const T* cols, const Conv2dGeometry& g, T* dx) {
  const int64_t ow_n = g.out_width;
  const int64_t plane = g.out_plane();
  for (int64_t c = 0; c < g.channels; ++c) {
    T* dxc = dx + c * g.in_plane();
    for (int64_t p = 0; p < g.kernel_h; ++p) {
      for (int64_t q = 0; q < g.kernel_w; ++q) {
        const T* row = cols + ((c * g.kernel_h + p) * g.kernel_w + q) * plane;
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

// out[k, l] += b[k] over an (M, OH·OW) output, while it is still in cache after its GEMM.
template <typename T>
void add_bias(T* out, const T* bias, int64_t channels, int64_t plane) {
  for (int64_t k = 0; k < channels; ++k) {
    T* row = out + k * plane;
    const T b = bias[k];
    for (int64_t l = 0; l < plane; ++l) {
      row[l] += b;
    }
  }
}

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// Images [begin, end) of the batch, split into at most one chunk per thread. The split depends
// only on the batch size and the thread count, so reductions over chunks are reproducible.
// The body runs ATen ops on worker threads, which do not inherit the caller's dispatch state:
// the guard keeps autograd out of them (this is a kernel, below autograd).
int64_t image_chunks(int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, at::get_num_threads()));
}

template <typename F>
void for_each_image_chunk(int64_t batch, F&& body) {
  const int64_t chunks = image_chunks(batch);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = c0; c < c1; ++c) {
      body(c, batch * c / chunks, batch * (c + 1) / chunks);
    }
  });
}

// The im2col matrix of image n: a view of the input itself for pointwise convs, else `buffer`
// filled by im2col.
at::Tensor image_columns(const at::Tensor& input, int64_t n, const Conv2dGeometry& g, at::Tensor& buffer) {
  if (g.is_pointwise()) {
    return input[n].view({g.channels, g.out_plane()});
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "torchcnn::im2col", [&] {
    im2col<scalar_t>(input.const_data_ptr<scalar_t>() + n * g.channels * g.in_plane(), g,
                     buffer.mutable_data_ptr<scalar_t>());
  });
  return buffer;
}

at::Tensor column_buffer(const at::Tensor& like, const Conv2dGeometry& g) {
  if (g.is_pointwise()) {
    return at::Tensor();
  }
  return at::empty({g.channels * g.kernel_h * g.kernel_w, g.out_plane()}, like.options());
}

at::Tensor conv2d_cpu(
    const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry("conv2d", input_, weight_, bias_, stride, padding, dilation, groups);
  if (is_reduced(input_)) {
    std::optional<at::Tensor> bias32;
    if (bias_.has_value() && bias_->defined()) {
      bias32 = bias_->to(at::kFloat);
    }
    return conv2d_cpu(input_.to(at::kFloat), weight_.to(at::kFloat), bias32, stride, padding, dilation, groups)
        .to(input_.scalar_type());
  }
  const auto input = input_.contiguous();
  const auto weight = weight_.contiguous().view({g.out_channels, g.group_kernel_size()});
  const bool has_bias = bias_.has_value() && bias_->defined();
  auto output = at::empty(g.output_sizes(), input.options());
  if (g.batch == 0) {
    return output.contiguous(conv2d_memory_format(input_, weight_));
  }
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();
  const auto bias = has_bias ? bias_->contiguous() : at::Tensor();

  for_each_image_chunk(g.batch, [&](int64_t, int64_t begin, int64_t end) {
    auto buffer = column_buffer(input, g);
    for (int64_t n = begin; n < end; ++n) {
      const auto cols = image_columns(input, n, g, buffer);
      auto out_n = output[n].view({g.out_channels, g.out_plane()});
      for (int64_t k = 0; k < g.groups; ++k) {
        auto out_g = out_n.narrow(0, k * mg, mg);
        at::mm_out(out_g, weight.narrow(0, k * mg, mg), cols.narrow(0, k * kg, kg));
      }
      if (has_bias) {
        AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "torchcnn::conv2d_bias", [&] {
          add_bias<scalar_t>(out_n.mutable_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                             g.out_channels, g.out_plane());
        });
      }
    }
  });
  return output.contiguous(conv2d_memory_format(input_, weight_));
}

at::Tensor conv2d_backward_input_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_input";
  const auto g = conv2d_backward_geometry(op, grad_output_, input_, weight_, stride, padding, dilation, groups);
  if (is_reduced(input_)) {
    return conv2d_backward_input_cpu(grad_output_.to(at::kFloat), input_.to(at::kFloat), weight_.to(at::kFloat),
                                     stride, padding, dilation, groups)
        .to(input_.scalar_type());
  }
  const auto grad_output = grad_output_.contiguous();
  const auto weight = weight_.contiguous().view({g.out_channels, g.group_kernel_size()});
  auto grad_input = at::zeros({g.batch, g.channels, g.height, g.width}, input_.options());
  if (g.batch == 0) {
    return grad_input.contiguous(conv2d_memory_format(input_, weight_));
  }
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();

  for_each_image_chunk(g.batch, [&](int64_t, int64_t begin, int64_t end) {
    auto buffer = column_buffer(grad_input, g);
    for (int64_t n = begin; n < end; ++n) {
      const auto go_n = grad_output[n].view({g.out_channels, g.out_plane()});
      // Pointwise: ∂L/∂X is Wᵀ · ∂L/∂Y itself; otherwise the columns go through col2im.
      auto cols = g.is_pointwise() ? grad_input[n].view({g.channels, g.out_plane()}) : buffer;
      for (int64_t k = 0; k < g.groups; ++k) {
        auto cols_g = cols.narrow(0, k * kg, kg);
        at::mm_out(cols_g, weight.narrow(0, k * mg, mg).t(), go_n.narrow(0, k * mg, mg));
      }
      if (!g.is_pointwise()) {
        AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "torchcnn::col2im", [&] {
          col2im<scalar_t>(buffer.const_data_ptr<scalar_t>(), g,
                           grad_input.mutable_data_ptr<scalar_t>() + n * g.channels * g.in_plane());
        });
      }
    }
  });
  return grad_input.contiguous(conv2d_memory_format(input_, weight_));
}

at::Tensor conv2d_backward_weight_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_weight";
  const auto g = conv2d_backward_geometry(op, grad_output_, input_, weight_, stride, padding, dilation, groups);
  if (is_reduced(input_)) {
    return conv2d_backward_weight_cpu(grad_output_.to(at::kFloat), input_.to(at::kFloat), weight_.to(at::kFloat),
                                      stride, padding, dilation, groups)
        .to(input_.scalar_type());
  }
  const auto grad_output = grad_output_.contiguous();
  const auto input = input_.contiguous();
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();
  // One partial sum per chunk of images, added up in chunk order: no races, same result every run.
  auto partial = at::zeros({image_chunks(g.batch), g.out_channels, kg}, input.options());
  if (g.batch > 0) {
    for_each_image_chunk(g.batch, [&](int64_t chunk, int64_t begin, int64_t end) {
      auto buffer = column_buffer(input, g);
      auto acc = partial[chunk];
      for (int64_t n = begin; n < end; ++n) {
        const auto cols = image_columns(input, n, g, buffer);
        const auto go_n = grad_output[n].view({g.out_channels, g.out_plane()});
        for (int64_t k = 0; k < g.groups; ++k) {
          auto acc_g = acc.narrow(0, k * mg, mg);
          acc_g.addmm_(go_n.narrow(0, k * mg, mg), cols.narrow(0, k * kg, kg).t());
        }
      }
    });
  }
  return partial.sum(0).view(weight_.sizes()).contiguous(conv2d_memory_format(input_, weight_));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cpu);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cpu);
}

}  // namespace torchcnn
