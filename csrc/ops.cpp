// The contract of every torchcnn op. Kernels live by backend in csrc/cpu (and csrc/cuda) and
// register themselves for their dispatch key; the autograd formulas and fake (meta) kernels
// for torch.compile live in torchcnn/_ops.py. The namespace is torchcnn, or torchcnn_emulated in
// the emulated-CUDA test library (registration.h).
#include <Python.h>
#include <torch/library.h>

#include "registration.h"

TORCHCNN_LIBRARY(m) {
  // Y[n, k, i, j] = Σ_c Σ_p Σ_q X[n, c, i·s + p·d − pad, j·s + q·d − pad] · W[k, c, p, q] + b[k]
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
        "int[2] dilation=1, int groups=1) -> Tensor");
  // ∂L/∂X: the transposed convolution of grad_output with W. `input` only supplies the shape.
  m.def("conv2d_backward_input(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // ∂L/∂W[k, c, p, q] = Σ_n Σ_i Σ_j ∂L/∂Y[n, k, i, j] · X[n, c, i·s + p·d − pad, j·s + q·d − pad].
  // `weight` only supplies the shape.
  m.def("conv2d_backward_weight(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // P[n, c, i, j] = max over the window, and the flat index h·W + w of that max in its plane.
  m.def("max_pool2d_with_indices(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding=0, "
        "int[2] dilation=1, bool ceil_mode=False) -> (Tensor, Tensor)");
  // Routes each output gradient to its argmax; `input` only supplies the shape.
  m.def("max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
}

// `import torchcnn._C` loads this library (and so runs the registrations above); the module
// itself is empty: the ops are reached through torch.ops.torchcnn.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
