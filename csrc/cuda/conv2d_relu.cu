// conv2d + bias + the design notes' ReLU (+ their 2×2 max pool) on CUDA, as one op each: on the
// tiled route (conv2d_tiled.cu) one kernel whose epilogue applies the ReLU (and pools); on the
// others, the convolution of conv2d.cu, then one epilogue kernel over its output. Neither relu(Y)
// nor a ReLU gradient is ever a tensor of its own. The results
// equal the composition of the separate ops exactly: the same Y in the input's dtype, the same
// window scan as max_pool2d (max_pool2d_window.h) on relu(Y) (relu.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include "../max_pool2d_window.h"
#include "../relu.h"
#include "../shapes.h"
#include "conv2d.cuh"
#include "launch.cuh"
#include "relu.cuh"

namespace torchcnn {
namespace {

namespace shared = TORCHCNN_CUDA_SHARED;

// One thread per pooled output (n, k, i, j): the max of relu(Y) over its window, the flat index of
// that max in Y's plane, and whether the gradient passes at it (Y there ≥ 0).
template <typename scalar_t, typename index_t>
__global__ void relu_max_pool2d_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                       int64_t* __restrict__ indices, bool* __restrict__ passes, index_t total,
                                       Window2d p) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t OW = p.out_width, OH = p.out_height, in_plane = p.height * p.width;
  for (index_t t = grid_start<index_t>(); t < total; t += grid_step<index_t>()) {
    const index_t ow = t % OW;
    const index_t oh = t / OW % OH;
    const scalar_t* plane = y + t / (OH * OW) * in_plane;
    int64_t index;
    window_max(plane, p, oh, ow, out[t], index, Relu{});
    indices[t] = index;
    passes[t] = relu_passes(static_cast<acc_t>(plane[index]));
  }
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry("conv2d_relu", input, weight, bias, stride, padding, dilation, groups);
  const DeviceGuard guard(input.device());
  const auto format = conv2d_memory_format(input, weight);
  if (shared::forward_route(g, input.scalar_type()) == shared::ForwardRoute::kTiled) {
    auto output = at::empty(g.output_sizes(), input.options());
    auto passes = at::empty(output.sizes(), output.options().dtype(at::kBool));
    shared::conv2d_tiled(input, weight, bias, g, shared::TiledEpilogue::kRelu, output, nullptr, &passes, nullptr);
    return {output.contiguous(format), passes.contiguous(format)};
  }
  auto output = shared::conv2d_forward(input, weight, bias, g);
  auto passes = at::empty(output.sizes(), output.options().dtype(at::kBool));
  const int64_t total = output.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "torchcnn::conv2d_relu_cuda", [&] {
      scalar_t* y = output.mutable_data_ptr<scalar_t>();
      launch(relu_kernel<scalar_t>, blocks_for(total), kThreads, y, y, passes.mutable_data_ptr<bool>(), total);
    });
  }
  return {output.contiguous(format), passes.contiguous(format)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool ceil_mode) {
  const auto g = conv2d_relu_max_pool2d_geometry("conv2d_relu_max_pool2d", input, weight, bias, stride, padding,
                                                 dilation, groups, ceil_mode);
  const DeviceGuard guard(input.device());
  const Window2d& p = g.pool;
  const auto format = conv2d_memory_format(input, weight);
  auto output = at::empty({p.batch, p.channels, p.out_height, p.out_width}, input.options());
  auto indices = at::empty(output.sizes(), input.options().dtype(at::kLong));
  auto passes = at::empty(output.sizes(), input.options().dtype(at::kBool));
  if (shared::forward_route(g.conv, input.scalar_type()) == shared::ForwardRoute::kTiled) {
    shared::conv2d_tiled(input, weight, bias, g.conv, shared::TiledEpilogue::kReluMaxPool, output, &indices, &passes,
                         &p);
    return {output.contiguous(format), indices.contiguous(format), passes.contiguous(format)};
  }
  const auto y = shared::conv2d_forward(input, weight, bias, g.conv);
  const int64_t total = output.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "torchcnn::conv2d_relu_max_pool2d_cuda",
                                    [&] {
      with_index_type(grid_fits_int32(p, total, {y.numel()}), [&](auto i) {
        using index_t = decltype(i);
        launch(relu_max_pool2d_kernel<scalar_t, index_t>, blocks_for(total), kThreads, y.const_data_ptr<scalar_t>(),
               output.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>(),
               passes.mutable_data_ptr<bool>(), static_cast<index_t>(total), p);
      });
    });
  }
  return {output.contiguous(format), indices.contiguous(format), passes.contiguous(format)};
}

}  // namespace

TORCHCNN_CUDA_KERNELS(m) {
  m.impl("conv2d_relu", &conv2d_relu_cuda);
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_cuda);
}

}  // namespace torchcnn
