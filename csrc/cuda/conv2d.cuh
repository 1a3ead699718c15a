// What csrc/cuda/conv2d.cu shares with the other CUDA files: the convolution itself, for the ops
// that start with one (conv2d_relu.cu).
#pragma once

#include <torch/all.h>

#include <optional>

#include "../registration.h"
#include "../shapes.h"

namespace torchcnn::TORCHCNN_CUDA_SHARED {

// Y = X ⋆ W + b on arguments conv2d_geometry has checked: contiguous NCHW, in the input's dtype,
// by the route forward_route picks.
at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const Conv2dGeometry& g);

// How the forward computes Y (conv2d_tiled.cu's forward_route is the rule; ∂W follows the forward's
// route, and ∂X of a stride-1 convolution its turned convolution's):
// - kDirect: a thread per output (conv2d.cu), for one input channel per group;
// - kTiled: conv2d_tiled.cu's kernel, the ReLU and the pool in its epilogue;
// - kGemm: im2col and cuBLAS (conv2d.cu).
enum class ForwardRoute { kDirect = 0, kTiled = 1, kGemm = 2 };

ForwardRoute forward_route(const Conv2dGeometry& g, at::ScalarType dtype);

// What the tiled kernel writes: Y; relu(Y) and `passes`; or the 2×2 max pool of relu(Y), its
// `indices` in Y's plane and `passes` (with `pool` the pool's geometry).
enum class TiledEpilogue { kNone, kRelu, kReluMaxPool };

// The tiled kernel into `out` (and `indices`, `passes`, as the epilogue writes them), all
// contiguous NCHW of the epilogue's shape.
void conv2d_tiled(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const Conv2dGeometry& g, TiledEpilogue epilogue, at::Tensor& out, at::Tensor* indices,
                  at::Tensor* passes, const Window2d* pool);

// ∂L/∂X of a stride-1 convolution on the tiled kernel, into `grad_input` (contiguous NCHW): the
// convolution of ∂L/∂Y with the filters turned around, their channels and outputs swapped within
// each group. For c in group γ (c' = c − γ·C/g its place there):
//   ∂L/∂X[n, c, h, w] = Σ_{k in γ} Σ_p Σ_q ∂L/∂Y[n, k, h + pad − p·d, w + pad − q·d] · W[k, c', p, q]
//                     = (∂L/∂Y ⋆ W')[n, c, h, w],   W'[c, k − γ·K/g, p, q] = W[k, c', KH−1−p, KW−1−q],
// with padding d·(KH−1) − pad. False, with nothing written, where that does not apply: a stride
// above 1, padding beyond d·(KH−1), or a convolution forward_route sends elsewhere (judged on its
// own depth, K/g·KH·KW); the caller takes the columns.
bool conv2d_tiled_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                             at::Tensor& grad_input);

// ∂L/∂W of the convolution as one tiled product over the whole batch (conv2d_tiled.cu), in the
// op-math type, (K, C/g · KH · KW): the backward of the forward's tiled route.
at::Tensor conv2d_tiled_grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g);

}  // namespace torchcnn::TORCHCNN_CUDA_SHARED
