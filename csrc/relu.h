// The design notes' ReLU on one value, written once for the CPU and the CUDA kernels
// (C10_HOST_DEVICE): A = max(0, Z), and ∂L/∂Z = ∂L/∂A where Z ≥ 0, 0 where Z < 0 — at exactly
// Z = 0 the gradient passes (torch's ReLU gives a zero gradient there). −0 stays −0; NaN
// propagates and passes its gradient, as torch.threshold (in-place relu) does.
#pragma once

#include <c10/macros/Macros.h>

namespace torchcnn {

template <typename T>
C10_HOST_DEVICE inline bool relu_passes(T z) {
  return !(z < T(0));
}

template <typename T>
C10_HOST_DEVICE inline T relu(T z) {
  return relu_passes(z) ? z : T(0);
}

// relu as a window map (max_pool2d_window.h): the fused pool takes the max of relu(Z).
struct Relu {
  template <typename T>
  C10_HOST_DEVICE T operator()(T z) const { return relu(z); }
};

}  // namespace torchcnn
