// What csrc/cuda/conv2d.cu shares with the other CUDA files: the convolution itself, for the ops
// that start with one (conv2d_relu.cu).
#pragma once

#include <torch/all.h>

#include <optional>

#include "../registration.h"
#include "../shapes.h"

namespace torchcnn::TORCHCNN_CUDA_SHARED {

// Y = X ⋆ W + b on arguments conv2d_geometry has checked: contiguous NCHW, in the input's dtype.
at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const Conv2dGeometry& g);

}  // namespace torchcnn::TORCHCNN_CUDA_SHARED
