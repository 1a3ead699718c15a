// Which op library a translation unit registers into.
//
// The real extension registers the ops as torchcnn::* (schemas in ops.cpp, CPU kernels in
// csrc/cpu, CUDA kernels in csrc/cuda under the CUDA dispatch key). The emulated-CUDA test library
// (torchcnn.testing.emulated_cuda_ops(), see csrc/cuda/emulation.h) compiles ops.cpp and the very
// same csrc/cuda sources with a plain C++ compiler and -DTORCHCNN_EMULATE_CUDA: its ops are
// torchcnn_emulated::*, with the "CUDA" kernels registered for CPU tensors, so both libraries
// live side by side in one process.
#pragma once

#include <torch/library.h>

#ifdef TORCHCNN_EMULATE_CUDA
#define TORCHCNN_NAMESPACE torchcnn_emulated
#define TORCHCNN_CUDA_KEY CPU
#else
#define TORCHCNN_NAMESPACE torchcnn
#define TORCHCNN_CUDA_KEY CUDA
#endif

// TORCH_LIBRARY pastes its arguments, which stops their expansion: one level of indirection.
#define TORCHCNN_LIBRARY_EXPAND_(ns, m) TORCH_LIBRARY(ns, m)
#define TORCHCNN_FRAGMENT_EXPAND_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TORCHCNN_IMPL_EXPAND_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// The op schemas (ops.cpp only).
#define TORCHCNN_LIBRARY(m) TORCHCNN_LIBRARY_EXPAND_(TORCHCNN_NAMESPACE, m)
// Extra, private ops of one backend.
#define TORCHCNN_LIBRARY_FRAGMENT(m) TORCHCNN_FRAGMENT_EXPAND_(TORCHCNN_NAMESPACE, m)
// The CUDA kernels (csrc/cuda/*.cu): CUDA tensors, or CPU tensors when emulated.
#define TORCHCNN_CUDA_KERNELS(m) TORCHCNN_IMPL_EXPAND_(TORCHCNN_NAMESPACE, TORCHCNN_CUDA_KEY, m)
