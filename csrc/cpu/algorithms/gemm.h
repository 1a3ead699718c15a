// The matrix products of the CPU convolutions.
//
// BLAS (at::mm: MKL or OpenBLAS) is not equally fast everywhere: MKL runs its AVX2 code on AMD
// CPUs even where they have AVX-512, half the rate oneDNN's convolutions reach there. At the
// avx512 tier (simd.h), float32 products therefore go to torchcnn's own GEMM (gemm.cpp: packed
// panels of B, an 8 × 32 register-blocked AVX-512 kernel); everything else goes to at::mm. Called inside a
// parallel region (the convolutions split their work between threads), a product runs on the
// calling thread; called outside one, a large product splits its rows or columns between the
// threads.
#pragma once

#include <torch/all.h>

#include <string>

namespace torchcnn::cpu {

// A strided matrix in memory: element (i, j) at data[i·rs + j·cs].
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, rs, cs;
};

// c = a · b, or c += a · b when `accumulate`; 2-D tensors of one dtype, any strides.
void matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// The same on matrices in memory, float or double: no tensor is made on the AVX-512 path, so
// loops of many small products (Winograd's 16 per block) cost no dispatcher calls.
template <typename T>
void matmul(const Matrix<T>& c, const Matrix<const T>& a, const Matrix<const T>& b, bool accumulate = false);

// Which GEMM float32 products take: "avx512" (at the avx512 tier) or "blas". Returns the
// previous choice (a knob for the tests and benchmarks: torch.ops.torchcnn._cpu_set_gemm).
std::string set_gemm(const std::string& name);

}  // namespace torchcnn::cpu
