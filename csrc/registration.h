// Which op library a translation unit registers into.
//
// The op schemas are defined in Python (torchcnn/_ops/schemas.py), so that the ops exist before
// anything is compiled; the libraries only register kernels. The real extension registers them for
// torchcnn::* (CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda under the CUDA dispatch key). The
// emulated-CUDA test library (torchcnn.testing.emulated_cuda_ops(), see csrc/cuda/emulation.h)
// compiles the very same csrc/cuda sources with a plain C++ compiler and -DTORCHCNN_EMULATE_CUDA:
// its kernels are for torchcnn_emulated::*, registered for CPU tensors, so both libraries live
// side by side in one process.
#pragma once

#include <torch/library.h>

//
// Functions one csrc/cuda file shares with another live in torchcnn::TORCHCNN_CUDA_SHARED, a
// namespace named differently in the two libraries, so their symbols never meet in one process.
#ifdef TORCHCNN_EMULATE_CUDA
#define TORCHCNN_NAMESPACE torchcnn_emulated
#define TORCHCNN_CUDA_KEY CPU
#define TORCHCNN_CUDA_SHARED cuda_kernels_emulated
#else
#define TORCHCNN_NAMESPACE torchcnn
#define TORCHCNN_CUDA_KEY CUDA
#define TORCHCNN_CUDA_SHARED cuda_kernels
#endif

// TORCH_LIBRARY pastes its arguments, which stops their expansion: one level of indirection.
#define TORCHCNN_FRAGMENT_EXPAND_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TORCHCNN_IMPL_EXPAND_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// Extra, private ops of one backend.
#define TORCHCNN_LIBRARY_FRAGMENT(m) TORCHCNN_FRAGMENT_EXPAND_(TORCHCNN_NAMESPACE, m)
// The CUDA kernels (csrc/cuda/*.cu): CUDA tensors, or CPU tensors when emulated.
#define TORCHCNN_CUDA_KERNELS(m) TORCHCNN_IMPL_EXPAND_(TORCHCNN_NAMESPACE, TORCHCNN_CUDA_KEY, m)
