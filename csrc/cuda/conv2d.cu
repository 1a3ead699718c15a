// conv2d on CUDA: batched im2col feeding cuBLAS, and two forward routes without columns, picked by
// forward_route (conv2d_tiled.cu): a direct kernel for one input channel per group and few outputs
// (depthwise convs), where a GEMM with K = KH·KW = 9 would be all overhead, and the tiled kernel of
// conv2d_tiled.cu for thin products. Float32 GEMMs call cuBLAS directly (launch.cuh's bmm_float), so
// that TF32 follows torch.backends.cudnn.allow_tf32 as torch's convolutions do; the other dtypes go
// through at::bmm on the current stream. The kernels of our own compute float32 in float32.
//
// For a chunk of B images, im2col lays every receptive field out as a column:
//   cols[n, (c, p, q), (i, j)] = X[n, c, i·s + p·d − pad, j·s + q·d − pad]   (0 outside the image)
// and the design notes' sums become three batched products of the same matrices, per group:
//   Y_n = W · cols_n (+ b),    ∂L/∂cols_n = Wᵀ · ∂L/∂Y_n (then col2im),    ∂L/∂W = Σ_n ∂L/∂Y_n · cols_nᵀ.
// (∂X of a stride-1 convolution and ∂W of a tiled one skip the columns: conv2d_tiled.cu.)
// The chunks are as large as half the GPU's L2 cache allows, so that the columns im2col writes are
// still in L2 when the GEMM reads them, instead of a round trip through device memory (the 32→64
// MNIST conv's columns are 58 MB at batch 256 in float32; an H100's L2 is 50 MB).
// Half types go to cuBLAS as they are; every product that is summed further (the columns of
// ∂L/∂X before col2im, the per-image parts of ∂L/∂W) comes back in at::opmath_type (float), and
// the bias enters the GEMM as its C operand, so each result is rounded to the half type once, as
// ATen's own kernels do — provided cuBLAS itself sums in float: torch lets it round partial sums
// of half-type GEMMs to the half type unless torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
// and allow_bf16_reduced_precision_reduction are set to False (both default to True; the tests
// turn them off). Nothing uses atomics: every result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include <algorithm>
#include <atomic>

#include "../shapes.h"
#include "conv2d.cuh"
#include "launch.cuh"

namespace torchcnn {
namespace {

// One thread per (image, channel, output pixel); it writes that pixel's KH·KW column entries.
// Consecutive threads take consecutive output pixels, so the writes of each tap are coalesced.
// index_t: int32_t wherever grid_fits_int32 allows it (launch.cuh), as in every kernel below.
template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols, index_t total,
                              Conv2dGeometry g) {
  const index_t C = g.channels, H = g.height, W = g.width, OW = g.out_width, OH = g.out_height;
  const index_t KH = g.kernel_h, KW = g.kernel_w, plane = OH * OW;
  const index_t sh = g.stride_h, sw = g.stride_w, ph = g.pad_h, pw = g.pad_w, dh = g.dilation_h, dw = g.dilation_w;
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t ow = t % OW;
    const index_t oh = t / OW % OH;
    const index_t nc = t / plane;  // n · C + c
    const scalar_t* xc = x + nc * H * W;
    scalar_t* col = cols + nc * KH * KW * plane + oh * OW + ow;
    for (index_t p = 0; p < KH; ++p) {
      const index_t h = oh * sh - ph + p * dh;
      for (index_t q = 0; q < KW; ++q) {
        const index_t w = ow * sw - pw + q * dw;
        const bool inside = h >= 0 && h < H && w >= 0 && w < W;
        *col = inside ? xc[h * W + w] : scalar_t(0);
        col += plane;
      }
    }
  }
}

// The adjoint of im2col, gathered: one thread per input pixel (image, c, h, w) sums the column
// entries that were read from it, ∂L/∂X[n, c, h, w] = Σ_{p, q : h = i·s − pad + p·d, w = j·s − pad + q·d}
// ∂L/∂cols[n, (c, p, q), (i, j)]. Each pixel is written once, so no atomics and no zeroing.
template <typename scalar_t, typename index_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void col2im_kernel(const acc_t* __restrict__ cols, scalar_t* __restrict__ dx, index_t total,
                              Conv2dGeometry g) {
  const index_t H = g.height, W = g.width, OW = g.out_width, OH = g.out_height;
  const index_t KH = g.kernel_h, KW = g.kernel_w, plane = OH * OW;
  const index_t sh = g.stride_h, sw = g.stride_w, ph = g.pad_h, pw = g.pad_w, dh = g.dilation_h, dw = g.dilation_w;
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t w = t % W;
    const index_t h = t / W % H;
    const index_t nc = t / (H * W);  // n · C + c
    const acc_t* col = cols + nc * KH * KW * plane;
    acc_t sum = 0;
    for (index_t p = 0; p < KH; ++p) {
      const index_t ih = h + ph - p * dh;  // = oh · stride_h
      if (ih < 0 || ih % sh != 0 || ih / sh >= OH) {
        continue;
      }
      const index_t oh = ih / sh;
      for (index_t q = 0; q < KW; ++q) {
        const index_t iw = w + pw - q * dw;
        if (iw < 0 || iw % sw != 0 || iw / sw >= OW) {
          continue;
        }
        sum += col[(p * KW + q) * plane + oh * OW + iw / sw];
      }
    }
    dx[t] = static_cast<scalar_t>(sum);
  }
}

// Direct convolution for one input channel per group: one thread per output pixel (n, k, i, j)
// computes Y = b[k] + Σ_p Σ_q X[n, c, i·s + p·d − pad, j·s + q·d − pad] · W[k, 0, p, q], with
// c = k / (K / C) the input channel of output channel k's group.
template <typename scalar_t, typename index_t>
__global__ void conv2d_depthwise_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                        const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, index_t total,
                                        Conv2dGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = g.channels, H = g.height, W = g.width, K = g.out_channels, OW = g.out_width, OH = g.out_height;
  const index_t KH = g.kernel_h, KW = g.kernel_w, plane = OH * OW, outputs_per_input = K / C;
  const index_t sh = g.stride_h, sw = g.stride_w, ph = g.pad_h, pw = g.pad_w, dh = g.dilation_h, dw = g.dilation_w;
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t ow = t % OW;
    const index_t oh = t / OW % OH;
    const index_t k = t / plane % K;
    const index_t n = t / (plane * K);
    const scalar_t* xn = x + (n * C + k / outputs_per_input) * H * W;
    const scalar_t* wk = weight + k * KH * KW;
    acc_t sum = bias != nullptr ? static_cast<acc_t>(bias[k]) : acc_t(0);
    for (index_t p = 0; p < KH; ++p) {
      const index_t h = oh * sh - ph + p * dh;
      if (h < 0 || h >= H) {
        continue;
      }
      for (index_t q = 0; q < KW; ++q) {
        const index_t w = ow * sw - pw + q * dw;
        if (w >= 0 && w < W) {
          sum += static_cast<acc_t>(xn[h * W + w]) * static_cast<acc_t>(wk[p * KW + q]);
        }
      }
    }
    y[t] = static_cast<scalar_t>(sum);
  }
}

// The most bytes of column buffers one chunk may take, when set (the tests lower it to force many
// chunks); 0: half the L2 cache (launch.cuh's l2_cache_bytes), 16 MiB at least.
std::atomic<int64_t> chunk_budget{0};

// Images per chunk: as many as keep the chunk's buffers (`bytes_per_image` each) within the
// budget (at least one).
int64_t chunk_images(const Conv2dGeometry& g, int64_t bytes_per_image) {
  const int64_t set = chunk_budget.load();
  // At least 16 MiB: on a GPU with a small L2 (4 MiB on a T4) chunks of a few images would cost
  // more in launches and thin GEMMs than the round trip they save.
  const int64_t budget = set > 0 ? set : std::max<int64_t>(l2_cache_bytes() / 2, int64_t{16} << 20);
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, budget / std::max<int64_t>(bytes_per_image, 1)));
}

// torch.ops.torchcnn._cuda_set_chunk_budget(bytes) -> the previous budget, 0 meaning half the L2
// cache (tests only).
int64_t set_chunk_budget(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "_cuda_set_chunk_budget: expected bytes to be at least 0 (0: half the L2 cache) but got ",
                    bytes);
  return chunk_budget.exchange(bytes);
}

// Bytes of one image's im2col columns, (C·KH·KW) × (OH·OW) entries of `element_size` bytes.
int64_t column_bytes(const Conv2dGeometry& g, int64_t element_size) {
  return g.channels * g.kernel_h * g.kernel_w * g.out_plane() * element_size;
}

// im2col of images [n0, n0 + b) into cols (b, C·KH·KW, OH·OW), or the input itself when pointwise.
at::Tensor columns(const at::Tensor& input, int64_t n0, int64_t b, const Conv2dGeometry& g) {
  const int64_t k = g.channels * g.kernel_h * g.kernel_w;
  if (g.is_pointwise()) {
    return input.narrow(0, n0, b).view({b, k, g.out_plane()});
  }
  auto cols = at::empty({b, k, g.out_plane()}, input.options());
  const int64_t total = b * g.channels * g.out_plane();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::im2col_cuda", [&] {
    with_index_type(grid_fits_int32(g, total, {b * g.channels * g.in_plane(), cols.numel()}), [&](auto i) {
      using index_t = decltype(i);
      launch(im2col_kernel<scalar_t, index_t>, blocks_for(total), kThreads,
             input.const_data_ptr<scalar_t>() + n0 * g.channels * g.in_plane(), cols.mutable_data_ptr<scalar_t>(),
             static_cast<index_t>(total), g);
    });
  });
  return cols;
}

// The same (M/g × K/g) matrix for every image of a chunk, as a stride-0 batch.
at::Tensor batched(const at::Tensor& matrix, int64_t b) {
  return matrix.unsqueeze(0).expand({b, matrix.size(0), matrix.size(1)});
}

// Whether float32 GEMMs may multiply in TF32 on tensor cores: torch.backends.cudnn.allow_tf32, the
// flag torch's own convolutions follow (on by default), not torch.backends.cuda.matmul's (off).
bool conv_allows_tf32() {
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// out = a · b (+ out, when `accumulate`), batched, with out in the inputs' dtype or (half types) in
// float: cuBLAS then hands back its float accumulator instead of rounding it.
void bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false) {
  if (a.scalar_type() == at::kFloat) {
    bmm_float(out, a, b, accumulate, conv_allows_tf32());
  } else if (accumulate) {
    out.baddbmm_(a, b);
  } else if (out.scalar_type() == a.scalar_type()) {
    at::bmm_out(out, a, b);
  } else {
    bmm_out_dtype(out, a, b);
  }
}

}  // namespace

namespace TORCHCNN_CUDA_SHARED {

at::Tensor conv2d_forward(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
                          const Conv2dGeometry& g) {
  const auto input = input_.contiguous();
  const auto weight = weight_.contiguous();
  const bool has_bias = bias_.has_value() && bias_->defined();
  auto output = at::empty(g.output_sizes(), input.options());
  if (g.batch == 0) {
    return output;
  }

  const ForwardRoute route = forward_route(g, input.scalar_type());
  if (route == ForwardRoute::kTiled) {
    conv2d_tiled(input, weight, bias_, g, TiledEpilogue::kNone, output, nullptr, nullptr, nullptr);
    return output;
  }
  if (route == ForwardRoute::kDirect) {
    const auto bias = has_bias ? bias_->contiguous() : at::Tensor();
    const int64_t total = output.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torchcnn::conv2d_direct", [&] {
      with_index_type(grid_fits_int32(g, total, {input.numel(), weight.numel()}), [&](auto i) {
        using index_t = decltype(i);
        launch(conv2d_depthwise_kernel<scalar_t, index_t>, blocks_for(total), kThreads,
               input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
               has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, output.mutable_data_ptr<scalar_t>(),
               static_cast<index_t>(total), g);
      });
    });
    return output;
  }

  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();
  const auto w = weight.view({g.out_channels, kg});
  if (has_bias) {  // the GEMMs below add W · cols to it (beta = 1): one rounding, in cuBLAS
    output.copy_(bias_->reshape({1, g.out_channels, 1, 1}).expand_as(output));
  }
  const int64_t chunk = chunk_images(g, column_bytes(g, input.element_size()));
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t b = std::min(chunk, g.batch - n0);
    const auto cols = columns(input, n0, b, g);
    auto out = output.narrow(0, n0, b).view({b, g.out_channels, g.out_plane()});
    for (int64_t k = 0; k < g.groups; ++k) {
      auto out_g = out.narrow(1, k * mg, mg);
      const auto w_g = batched(w.narrow(0, k * mg, mg), b);
      bmm_into(out_g, w_g, cols.narrow(1, k * kg, kg), /*accumulate=*/has_bias);
    }
  }
  return output;
}

}  // namespace TORCHCNN_CUDA_SHARED

namespace {

at::Tensor conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry("conv2d", input, weight, bias, stride, padding, dilation, groups);
  const DeviceGuard guard(input.device());
  return TORCHCNN_CUDA_SHARED::conv2d_forward(input, weight, bias, g).contiguous(conv2d_memory_format(input, weight));
}

at::Tensor conv2d_backward_input_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_input";
  const auto g = conv2d_backward_geometry(op, grad_output_, input_, weight_, stride, padding, dilation, groups);
  const DeviceGuard guard(input_.device());
  const auto grad_output = grad_output_.contiguous();
  const auto weight = weight_.contiguous();  // once: a channels-last weight is copied here
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();
  const auto w = weight.view({g.out_channels, kg});
  auto grad_input = at::empty({g.batch, g.channels, g.height, g.width}, input_.options());
  if (g.batch == 0) {
    return grad_input.contiguous(conv2d_memory_format(input_, weight_));
  }
  if (TORCHCNN_CUDA_SHARED::conv2d_tiled_grad_input(grad_output, weight, g, grad_input)) {
    return grad_input.contiguous(conv2d_memory_format(input_, weight_));
  }
  // The columns are summed again by col2im, so they stay in the op-math type.
  const auto acc_options = grad_output.options().dtype(at::toOpMathType(grad_output.scalar_type()));
  const int64_t chunk = chunk_images(g, column_bytes(g, acc_options.dtype().itemsize()));
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t b = std::min(chunk, g.batch - n0);
    const auto go = grad_output.narrow(0, n0, b).view({b, g.out_channels, g.out_plane()});
    // Pointwise: ∂L/∂X is Wᵀ · ∂L/∂Y itself; otherwise the columns go through col2im.
    auto cols = g.is_pointwise() ? grad_input.narrow(0, n0, b).view({b, g.channels, g.out_plane()})
                                 : at::empty({b, g.channels * g.kernel_h * g.kernel_w, g.out_plane()}, acc_options);
    for (int64_t k = 0; k < g.groups; ++k) {
      auto cols_g = cols.narrow(1, k * kg, kg);
      bmm_into(cols_g, batched(w.narrow(0, k * mg, mg).t(), b), go.narrow(1, k * mg, mg));
    }
    if (!g.is_pointwise()) {
      const int64_t total = b * g.channels * g.in_plane();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "torchcnn::col2im_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_index_type(grid_fits_int32(g, total, {cols.numel()}), [&](auto i) {
          using index_t = decltype(i);
          launch(col2im_kernel<scalar_t, index_t, acc_t>, blocks_for(total), kThreads, cols.const_data_ptr<acc_t>(),
                 grad_input.mutable_data_ptr<scalar_t>() + n0 * g.channels * g.in_plane(),
                 static_cast<index_t>(total), g);
        });
      });
    }
  }
  return grad_input.contiguous(conv2d_memory_format(input_, weight_));
}

at::Tensor conv2d_backward_weight_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_weight";
  const auto g = conv2d_backward_geometry(op, grad_output_, input_, weight_, stride, padding, dilation, groups);
  const DeviceGuard guard(input_.device());
  const auto grad_output = grad_output_.contiguous();
  const auto input = input_.contiguous();
  namespace shared = TORCHCNN_CUDA_SHARED;
  if (shared::forward_route(g, input.scalar_type()) == shared::ForwardRoute::kTiled) {
    return shared::conv2d_tiled_grad_weight(grad_output, input, g).to(input.scalar_type()).view(weight_.sizes())
        .contiguous(conv2d_memory_format(input_, weight_));
  }
  const int64_t mg = g.out_channels_per_group(), kg = g.group_kernel_size();
  // Per-image products ∂L/∂Y_n · cols_nᵀ in the op-math type, summed over the images in a fixed
  // order (chunk by chunk, then at::sum): deterministic, and rounded to the input's dtype once.
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor grad_weight;  // the first chunk's sum, then each further chunk's added
  const int64_t acc_size = acc_options.dtype().itemsize();
  const int64_t chunk = chunk_images(g, column_bytes(g, input.element_size()) + g.out_channels * kg * acc_size);
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t b = std::min(chunk, g.batch - n0);
    const auto cols = columns(input, n0, b, g);
    const auto go = grad_output.narrow(0, n0, b).view({b, g.out_channels, g.out_plane()});
    auto per_image = at::empty({b, g.out_channels, kg}, acc_options);
    for (int64_t k = 0; k < g.groups; ++k) {
      auto per_image_g = per_image.narrow(1, k * mg, mg);
      bmm_into(per_image_g, go.narrow(1, k * mg, mg), cols.narrow(1, k * kg, kg).transpose(1, 2));
    }
    if (grad_weight.defined()) {
      grad_weight.add_(per_image.sum(0));
    } else {
      grad_weight = per_image.sum(0);
    }
  }
  if (!grad_weight.defined()) {  // an empty batch
    grad_weight = at::zeros({g.out_channels, kg}, acc_options);
  }
  return grad_weight.to(input.scalar_type()).view(weight_.sizes()).contiguous(conv2d_memory_format(input_, weight_));
}

}  // namespace

TORCHCNN_CUDA_KERNELS(m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cuda);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cuda);
}

// A knob for the tests, outside the op contract (torchcnn/_ops/schemas.py): it exists wherever the
// CUDA kernels do.
TORCHCNN_LIBRARY_FRAGMENT(m) {
  m.def("_cuda_set_chunk_budget(int bytes) -> int", &set_chunk_budget);
#ifdef TORCHCNN_EMULATE_CUDA
  // The grids the emulated library has launched so far (benchmarks/gpu_model.py).
  m.def("_emulated_launches() -> int", [] { return static_cast<int64_t>(emulation::launches().load()); });
#endif
}

}  // namespace torchcnn
